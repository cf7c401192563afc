"""`source = "npz"`: a NumPy .npz archive with arrays `x` (N, ...) and `y` (N,).

Read without pickle (an .npz that needs it is refused: loading a pickle runs code). `y` holds
integers (class indices) or strings (class names); `user_column` names an optional third array
of user ids. Row i is sample i; a row that is not finite or not of the input shape is skipped.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..locate import DataError
from .records import Record, Records, SkipLog
from .registry import POOLED_KEYS, Part, SourceKind
from .settings import DataSettings

_HELP = "a NumPy .npz file with arrays x and y (np.savez)"


def read(settings: DataSettings, part: Part, skips: SkipLog) -> Records | None:
    file = settings.path if part == "train" else settings.test_path
    if file is None:
        return None
    path = Path(file)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"npz file {path} cannot be read ({str(exc)[:200]}); it must be an "
                        "archive written by np.savez, without object arrays") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"npz file {path} holds one array, not an archive of x and y; write it "
                        "with np.savez(path, x=..., y=...)")
    with archive:
        names = list(archive.files)
        wanted = ["x", "y"] + ([settings.user_column] if settings.user_column else [])
        missing = [name for name in wanted if name not in names]
        if missing:
            raise DataError(f"npz file {path} has no array {missing[0]!r}; its arrays are "
                            f"{', '.join(names) or 'none'}")
        try:
            arrays = [archive[name] for name in wanted]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"npz file {path}: an array cannot be read ({str(exc)[:200]})") from None
    x, y = arrays[0], arrays[1]
    users = arrays[2] if len(arrays) > 2 else None
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y) or (users is not None and users.shape != y.shape):
        raise DataError(f"npz file {path}: x{x.shape}, y{y.shape}"
                        + (f", {settings.user_column}{users.shape}" if users is not None else "")
                        + ": x needs one row per sample and y (and the users) one value per row")
    return Records(_records(path.name, x, y, users), f"npz file {path}")


def _records(name: str, x: np.ndarray, y: np.ndarray, users: np.ndarray | None) -> Iterator[Record]:
    for i in range(len(y)):
        yield Record(x[i], y[i], f"{name} row {i}", None if users is None else users[i])


KIND = SourceKind("npz", read, keys=POOLED_KEYS | {"user_column"}, path="required",
                  path_type="file", path_help=_HELP)
