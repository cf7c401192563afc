"""The one way fedprune replaces a file or a folder, so that a crash or a power cut never
leaves half of one, and a secret is never readable by others, not even for a moment.

A rename is atomic, but it is durable only once the new file's bytes *and* the directory
entry are on disk: without fsyncing the file, a power cut can leave the renamed name pointing
at an empty file; without fsyncing the directory, it can leave the old name. So every writer
here writes a temp file beside the target, fsyncs it, renames it over the target and fsyncs
the directory. The temp file is created with O_CREAT|O_EXCL (never an existing file or a
planted symlink) and, for private files, with mode 0600 from the start: a chmod afterwards
would leave a window in which the secret is readable.

It lives in device_profiles, the package every other one may import, because the edge agent,
the exporter and the coordinator's provisioning all need it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o666  # narrowed by the process umask, as open() would
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(
    os, "O_CLOEXEC", 0)


def fsync_dir(directory: str | Path) -> None:
    """Make the renames and unlinks done in `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(directory: Path, name: str, private: bool) -> tuple[int, Path]:
    mode = PRIVATE_MODE if private else _PUBLIC_MODE
    while True:
        temp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(temp, _CREATE_FLAGS, mode), temp
        except FileExistsError:  # a leftover of a crash with the same random name: pick another
            continue


@contextlib.contextmanager
def atomic_writer(path: str | Path, *, private: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` when the block ends without an exception.

    For writers that stream (a download) rather than hold the bytes. If the
    block raises, the target is untouched and the temp file is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = _create_temp(target.parent, target.name, private)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write(path: str | Path, data: bytes, *, private: bool = False) -> None:
    """Replace `path` with `data`: after a crash it holds the old bytes or the new, never a mix.

    `private=True` creates the file with mode 0600 (keys, passwords, a device's ledger).
    """
    with atomic_writer(path, private=private) as handle:
        handle.write(data)


def atomic_publish_dir(staging: str | Path, target: str | Path) -> None:
    """Put the folder `staging` (same parent as `target`) in place of `target` as a whole.

    Every file in `staging` is fsynced first, so the published folder is complete on disk.
    POSIX has no atomic exchange of two folders, so the old one is moved aside to
    `<target>.old` first; `recover_dir(target)` puts it back if a crash came between the two
    renames, so a reader always finds the old folder or the new one.
    """
    staging, target = Path(staging), Path(target)
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        _fsync_file(file)
    fsync_dir(staging)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: str | Path) -> None:
    """Undo a publish interrupted between its two renames: the old folder comes back."""
    target = Path(target)
    old = target.with_name(target.name + ".old")
    if not target.exists() and old.is_dir():
        os.replace(old, target)
        fsync_dir(target.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
