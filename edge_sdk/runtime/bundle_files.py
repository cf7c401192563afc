"""Reading a bundle's files without trusting the names and sizes its manifest gives.

A bundle arrives from elsewhere (a copy, an archive, a coordinator), and its manifest names the
files to open. Every name is resolved (symlinks followed) and must land inside the bundle folder:
an absolute path, a `..` or a symlink out of the folder is refused. Only regular files are
opened (a FIFO would block the reader, a device such as /dev/zero never ends), the size the
file has is compared with the size the manifest declares before a byte is read, and no more than
that size is ever read, so a file that grows or lies costs nothing.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import zstandard

CHUNK = 1 << 20


class ManifestError(ValueError):
    """A bundle that cannot be used as is; the message names the file and what to do."""


def bundle_path(bundle_dir: Path, name: str) -> Path:
    """`bundle_dir / name` resolved, refused unless it is inside `bundle_dir` (resolved too)."""
    root = bundle_dir.resolve()
    if "\0" in name:
        raise ManifestError(f"the manifest names a file {name[:200]!r} with a NUL byte; re-export "
                            "the bundle")
    target = (root / name).resolve()
    if not target.is_relative_to(root) or target == root:
        raise ManifestError(f"the manifest names {name[:200]!r}, which resolves to "
                            f"{_shown(target)}, outside the bundle folder {root}; refused (a "
                            "bundle's files are plain names inside its folder: re-export it)")
    return target


def read_bundle_file(bundle_dir: Path, name: str, *, size: int | None = None,
                     limit: int | None = None) -> bytes:
    """The bytes of bundle file `name`: exactly `size` bytes if given (a file of any other size
    is refused before it is read), else at most `limit` bytes (a larger file is refused)."""
    path = bundle_path(bundle_dir, name)
    shown = _shown(path)
    try:
        _check_regular(shown, os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ManifestError(f"{shown} does not exist; the bundle is incomplete, re-export it") from None
    except OSError as exc:
        raise ManifestError(f"{shown} cannot be opened ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as file:
        found = _check_regular(shown, os.fstat(fd)).st_size  # the file opened, not a swapped name
        if size is not None and found != size:
            raise ManifestError(f"{shown} is {found:,} bytes, the manifest says {size:,}; the file "
                                "is truncated or replaced, re-export the bundle")
        most = size if size is not None else limit
        if most is not None and found > most:
            raise ManifestError(f"{shown} is {found:,} bytes; the limit is {most:,}")
        data = file.read(most + 1) if most is not None else file.read()
    if size is not None and len(data) != size:
        raise ManifestError(f"{shown} changed while it was read ({len(data):,} bytes, the manifest "
                            f"says {size:,}); re-export the bundle")
    if most is not None and len(data) > most:
        raise ManifestError(f"{shown} grew past {most:,} bytes while it was read; refused")
    return data


def _shown(path: Path) -> str:
    """`path` for a message: a name from a manifest can be a megabyte long."""
    text = str(path)
    return text if len(text) <= 300 else f"{text[:297]}..."


def _check_regular(path: str, status: os.stat_result) -> os.stat_result:
    if not stat.S_ISREG(status.st_mode):
        raise ManifestError(f"{path} cannot be read: it is not a regular file (a FIFO, device, "
                            "folder or socket), and is refused without reading it")
    return status


def unpack(packed: bytes, size: int, what: str) -> bytes:
    """`packed` decompressed, refused unless it is exactly `size` bytes. Streamed and stopped one
    byte past `size`: a frame whose header claims any size costs at most `size` + 1 bytes."""
    out, seen = [], 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(packed) as reader:
            while seen <= size and (chunk := reader.read(min(CHUNK, size + 1 - seen))):
                out.append(chunk)
                seen += len(chunk)
    except zstandard.ZstdError as exc:
        raise ManifestError(f"{what} is not a zstd frame ({exc}); re-export the bundle") from None
    if seen != size:
        found = f"more than {size:,}" if seen > size else f"{seen:,}"
        raise ManifestError(f"{what} decompresses to {found} bytes, the manifest says {size:,}; "
                            "re-export the bundle")
    return b"".join(out)
