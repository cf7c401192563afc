"""A user's function as a source: it returns a `torch.utils.data.Dataset` of (x, y) items.

The function is named in the config (`source = "data:load"`) or installed as an entry point of
the `fedprune.data_sources` group. It is called with the `[data.options]` table as keyword
arguments, with `path=` when the config gives a path, and with `split="train"` or `"test"` when
it takes a `split` (its test split is then the test data; without one, the data is split). An
item is (x, y) or (x, y, user); x anything NumPy reads as numbers (a tensor, an array), y a
class index or name. A dataset with a `classes` list of names (torchvision's convention) gives
the class names its integer labels index. An item that raises, or is not such a tuple, is
skipped and counted like any bad sample; the function itself failing is a clear error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ..locate import DataError
from .records import Record, Records, SkipLog
from .registry import POOLED_KEYS, Part, SourceKind
from .settings import DataSettings

MAX_ITEMS = 2**31 - 1  # REGISTER's bound on a device's samples


def function_kind(name: str, function: Callable) -> SourceKind:
    if not callable(function):
        raise DataError(f"data source {name!r} is neither a SourceKind nor a function")
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature: called with what it is given
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

    def takes(parameter: str) -> bool:
        return takes_any or parameter in parameters

    def check(settings: DataSettings) -> None:
        if settings.path is not None and not takes("path"):
            raise ValueError(f"path: the function {name} takes no `path` argument")
        if settings.test_path is not None and not takes("path"):
            raise ValueError(f"test_path: the function {name} takes no `path` argument")
        if settings.test_path is not None and takes("split"):
            raise ValueError(f"test_path: the function {name} gives its own test split")

    def read(settings: DataSettings, part: Part, skips: SkipLog) -> Records | None:
        arguments: dict[str, Any] = dict(settings.options)
        if takes("split"):
            arguments["split"] = part
        elif part == "test" and settings.test_path is None:
            return None
        path = settings.path if part == "train" else settings.test_path
        if path is not None:
            arguments["path"] = path
        try:
            dataset = function(**arguments)
        except Exception as exc:  # noqa: BLE001 - the user's code: report it, in one line
            shown = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
            raise DataError(f"data source {name}({shown}) failed: {type(exc).__name__}: "
                            f"{str(exc)[:300]}") from None
        if dataset is None:
            raise DataError(f"data source {name} returned None, not a Dataset of (x, y) items")
        classes = getattr(dataset, "classes", None)
        names = tuple(classes) if isinstance(classes, (list, tuple)) and classes and \
            all(isinstance(c, str) for c in classes) else None
        return Records(_items(name, dataset, names, skips), f"data source {name} ({part})",
                       classes=names)

    return SourceKind(name, read, keys=POOLED_KEYS | {"options"}, path="optional", check=check)


def _items(name: str, dataset: Any, classes: tuple[str, ...] | None,
           skips: SkipLog) -> Iterator[Record]:
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        try:
            count = int(len(dataset))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"data source {name}: len() of its dataset failed: {exc}") from None
        items = (_item(dataset, i, skips) for i in range(min(count, MAX_ITEMS)))
    else:
        try:
            iterator = iter(dataset)
        except TypeError:
            raise DataError(f"data source {name} returned a {type(dataset).__name__}, not a "
                            "Dataset (len and indexing) nor an iterable of (x, y) items") from None
        items = _iterated(iterator, skips)
    for where, item in items:
        if item is None:
            continue
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            skips.skip("not_a_pair", where, f"a {type(item).__name__}, not (x, y) or (x, y, user)")
            continue
        label, index = item[1], _index(item[1])
        if classes is not None and index is not None and 0 <= index < len(classes):
            label = classes[index]
        yield Record(item[0], label, where, item[2] if len(item) == 3 else None)


def _item(dataset: Any, index: int, skips: SkipLog) -> tuple[str, Any]:
    where = f"item {index}"
    try:
        return where, dataset[index]
    except Exception as exc:  # noqa: BLE001 - one broken item is a bad sample
        skips.skip("unreadable_item", where, f"{type(exc).__name__}: {exc}"[:160])
        return where, None


def _iterated(iterator, skips: SkipLog) -> Iterator[tuple[str, Any]]:
    for index in range(MAX_ITEMS):
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - an iterator that fails ends there
            skips.skip("unreadable_item", f"item {index}", f"{type(exc).__name__}: {exc}"[:160])
            return
        yield f"item {index}", item


def _index(label: Any) -> int | None:
    """An integer label as an int (from a tensor or NumPy scalar too), else None."""
    if isinstance(label, torch.Tensor):
        label = label.item() if label.numel() == 1 else None
    if isinstance(label, np.integer):
        label = int(label)
    return label if isinstance(label, int) and not isinstance(label, bool) else None
