"""Where data files live, and making sure they are the exact bytes we expect.

Every dataset file is pinned by sha256 so that experiments are reproducible and a
silently truncated or substituted file can never be trained on.
"""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from device_profiles.files import atomic_writer

__all__ = [
    "DataError",
    "resolve_data_dir",
    "ensure_file",
    "download_enabled_by_default",
    "user_cache_dir",
]

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0

# Hashing tens of MB on every load would dominate short simulations, so the
# digest is remembered per (path, size, mtime): any rewrite of the file changes
# the key and forces a fresh hash.
_digest_cache: dict[tuple[str, int, int], str] = {}
_digest_lock = threading.Lock()


class DataError(ValueError):
    """A data file is missing, corrupt, or cannot be fetched.

    Subclasses ValueError so callers that treat bad input generically still catch it.
    """


def download_enabled_by_default() -> bool:
    """Downloads are on unless FEDPRUNE_DOWNLOAD opts out (offline machines, CI)."""
    value = os.environ.get("FEDPRUNE_DOWNLOAD", "1").strip().lower()
    return value not in {"0", "false", "no", "off"}


def user_cache_dir() -> Path:
    """Last-resort location; downloads land here when no data dir is configured."""
    return Path.home() / ".cache" / "fedprune" / "data"


def _repo_shared_data() -> Path:
    # locate.py -> data -> edge_sdk -> repository root; shared/ sits beside the repo.
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    """Pick the data directory: explicit > $FEDPRUNE_DATA > ../shared/data (cwd,
    then repository root) > user cache dir (created).

    An explicit choice or the env var is honoured even if the directory does not
    exist yet, because it may be the intended download target.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("FEDPRUNE_DATA", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    for candidate in (Path.cwd().parent / "shared" / "data", _repo_shared_data()):
        if candidate.is_dir():
            return candidate.resolve()
    cache = user_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return cache.resolve()


def _sha256_of(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _digest_lock:
        cached = _digest_cache.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _digest_lock:
        _digest_cache[key] = digest
    return digest


def _remember_digest(path: Path, digest: str) -> None:
    st = path.stat()
    with _digest_lock:
        _digest_cache[(str(path.resolve()), st.st_size, st.st_mtime_ns)] = digest


def _download(url: str, target: Path, sha256: str) -> None:
    """Fetch to a temp file beside the target and rename only once verified, so an
    interrupted or wrong download never leaves a plausible-looking file behind."""
    h = hashlib.sha256()
    with atomic_writer(target) as out:  # an exception in the block leaves no file at all
        try:
            with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp:
                total = resp.headers.get("Content-Length")
                with tqdm(
                    total=int(total) if total and total.isdigit() else None,
                    unit="B",
                    unit_scale=True,
                    desc=target.name,
                    disable=None,
                    leave=False,
                ) as bar:
                    while chunk := resp.read(_CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DataError(
                f"could not download {url} to {target}: {exc}. "
                f"Place the file there by hand, or point --data-dir / FEDPRUNE_DATA "
                f"at a directory that already holds it."
            ) from exc
        actual = h.hexdigest()
        if actual != sha256:
            raise DataError(
                f"downloaded {url} but its sha256 is {actual}, expected {sha256}; "
                f"the file was discarded (not written to {target}). The server or mirror "
                f"(FEDPRUNE_MIRROR) serves different content: use another source."
            )
    _remember_digest(target, actual)


def ensure_file(data_dir: Path, rel_path: str, sha256: str, url: str | None, download: bool) -> Path:
    """Return the path of a verified data file, downloading it if allowed.

    Raises DataError with a message saying what to do when the file is corrupt,
    missing, or cannot be downloaded.
    """
    path = Path(data_dir) / rel_path
    if path.is_file():
        actual = _sha256_of(path)
        if actual != sha256:
            raise DataError(
                f"checksum mismatch for {path}: expected sha256 {sha256}, got {actual}. "
                f"The file is corrupt or a different version. Delete it so it can be "
                f"re-downloaded, replace it with a good copy, or point --data-dir / "
                f"FEDPRUNE_DATA at another data directory."
            )
        return path
    if download and url:
        _download(url, path, sha256)
        return path
    why = (
        "downloading is disabled (FEDPRUNE_DOWNLOAD=0 or download=False)"
        if url
        else "no download URL is known for it"
    )
    raise DataError(
        f"missing data file: expected {path} ({why}). Put the file at that path, "
        f"pass --data-dir / set FEDPRUNE_DATA to a directory containing '{rel_path}', "
        f"or allow downloading."
    )
