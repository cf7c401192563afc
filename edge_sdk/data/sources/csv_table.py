"""`source = "csv"`: a CSV file with a header row, one sample per row.

`label_column` names the label; `feature_columns` the features (default: every other column but
`user_column`). Read with the standard library's csv module as UTF-8 (a byte-order mark is
ignored, undecodable bytes become U+FFFD and so fail as numbers or labels, never as the file).
A row with another number of cells than the header, or a feature cell that is not a number, is
skipped; rows are numbered as a spreadsheet shows them (the header is row 1).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..locate import DataError
from .records import Record, Records, SkipLog
from .registry import POOLED_KEYS, Part, SourceKind
from .settings import DataSettings

_HELP = "a CSV file with a header row"


def _check(settings: DataSettings) -> None:
    if settings.label_column is None:
        raise ValueError("label_column: the csv source needs the name of the label's column")


def read(settings: DataSettings, part: Part, skips: SkipLog) -> Records | None:
    file = settings.path if part == "train" else settings.test_path
    if file is None:
        return None
    path = Path(file)
    try:
        handle = path.open(newline="", encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        raise DataError(f"CSV file {path} cannot be read ({exc.strerror or exc})") from None
    rows = csv.reader(handle)
    try:
        header = next(rows)
    except StopIteration:
        handle.close()
        raise DataError(f"CSV file {path}: empty; it needs a header row naming the columns") from None
    except csv.Error as exc:
        handle.close()
        raise DataError(f"CSV file {path}: the header row cannot be read ({exc})") from None
    names = [name.strip() for name in header]
    columns = _columns(path, names, settings)
    return Records(_records(path, handle, rows, names, columns, skips), f"CSV file {path}")


def _columns(path: Path, header: list[str], settings: DataSettings) -> tuple[list[int], int, int | None]:
    """(feature indices, label index, user index) from the header, or DataError naming them."""
    doubled = sorted({name for name in header if header.count(name) > 1})
    if doubled:
        raise DataError(f"CSV file {path}: column(s) {', '.join(map(repr, doubled))} appear more "
                        "than once in the header; name every column once")
    index = {name: i for i, name in enumerate(header)}
    shown = ", ".join(repr(name) for name in header[:20]) + (", ..." if len(header) > 20 else "")

    def find(name: str, key: str) -> int:
        if name not in index:
            raise DataError(f"CSV file {path}: data.{key} {name!r} is not a column; the columns "
                            f"are {shown}")
        return index[name]

    label = find(settings.label_column, "label_column")
    user = find(settings.user_column, "user_column") if settings.user_column is not None else None
    if settings.feature_columns is not None:
        features = [find(name, "feature_columns") for name in settings.feature_columns]
    else:
        features = [i for i in range(len(header)) if i not in (label, user)]
    if not features:
        raise DataError(f"CSV file {path}: no feature columns (the columns are {shown})")
    if label in features or (user is not None and user in features):
        raise DataError(f"CSV file {path}: data.feature_columns lists the label or user column")
    return features, label, user


def _records(path: Path, handle, rows, names: list[str],
             columns: tuple[list[int], int, int | None], skips: SkipLog) -> Iterator[Record]:
    features, label, user = columns
    width = len(names)
    with handle:
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as exc:  # an oversized field, a stray quote: this row only
                skips.skip("malformed_row", f"{path.name} row {rows.line_num}", str(exc)[:120])
                continue
            where = f"{path.name} row {rows.line_num}"
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line is no row
            if len(row) != width:
                skips.skip("wrong_columns", where, f"{len(row)} cells, the header has {width}")
                continue
            values = _numbers(row, features, names, where, skips)
            if values is None:
                continue
            yield Record(values, row[label], where, row[user] if user is not None else None)


def _numbers(row: list[str], features: list[int], names: list[str], where: str,
             skips: SkipLog) -> np.ndarray | None:
    """The row's features as numbers, or None (skipped, naming the first cell that is not one)."""
    values = np.empty(len(features), dtype=np.float32)
    for n, i in enumerate(features):
        try:
            values[n] = float(row[i])
        except (ValueError, OverflowError):
            cell = row[i].strip()
            skips.skip("not_numeric", where, f"column {names[i][:40]!r} is {cell[:40]!r}" if cell
                       else f"column {names[i][:40]!r} is empty")
            return None
    return values


KIND = SourceKind("csv", read, keys=POOLED_KEYS | {"label_column", "feature_columns", "user_column"},
                  path="required", path_type="file", path_help=_HELP, check=_check)
