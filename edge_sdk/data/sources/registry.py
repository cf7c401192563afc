"""The data-source registry: a `[data] source` names a kind, and nothing else is ever imported.

Three kinds of names resolve:
- the built-in kinds: each module of this package with a `KIND` (adding a kind is one file);
- entry points in the group `fedprune.data_sources` of any installed package: a `SourceKind`,
  or a function returning a `torch.utils.data.Dataset` (one line in a user's pyproject.toml);
- a `package.module:function` reference returning a Dataset. It is imported with the config
  file's folder first on the import path, so a project's own `data.py` next to its config
  resolves as `data:load` without being installed.
A source name only ever comes from the process's own config file: data never arrives over the
wire, so nothing a peer sends can make a device import anything.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ...references import REFERENCE, ReferenceImportError, import_reference
from ..locate import DataError

if TYPE_CHECKING:
    from .loaded import DeviceData, FederatedData
    from .records import Records, SkipLog
    from .settings import DataSettings

ENTRY_POINT_GROUP = "fedprune.data_sources"

Part = Literal["train", "test"]
# read(settings, part, skips): the records of the train data, or of the test data (None: the
# source has no separate test data, and the train data is split).
Reader = Callable[["DataSettings", Part, "SkipLog"], "Records | None"]

# The keys every pooled source reads (a kind adds its own).
POOLED_KEYS = frozenset({"source", "path", "test_path", "classes", "input_shape", "mean", "std",
                         "test_share", "seed"})


@dataclass(frozen=True)
class SourceKind:
    """One kind of source. `read` yields records that the common rules (records.py) turn into
    samples; a kind with its own shards and test set (the benchmark) gives `device` and
    `federated` instead."""

    name: str
    read: Reader | None = None
    keys: frozenset[str] = POOLED_KEYS
    path: Literal["required", "optional", "refused"] = "optional"
    path_type: Literal["file", "folder", "any"] = "any"
    path_help: str = ""
    check: Callable[[DataSettings], None] | None = None  # raises ValueError naming the key
    device: Callable[[DataSettings], DeviceData] | None = None
    federated: Callable[[DataSettings, int, str, int], FederatedData] | None = None


_BUILT_IN: dict[str, SourceKind] = {}
_RESOLVED: dict[str, SourceKind] = {}  # entry points and references, once loaded


def _built_in() -> dict[str, SourceKind]:
    if not _BUILT_IN:
        package = sys.modules[__package__]
        for module in pkgutil.iter_modules(package.__path__):
            kind = getattr(importlib.import_module(f"{__package__}.{module.name}"), "KIND", None)
            if isinstance(kind, SourceKind):
                _BUILT_IN[kind.name] = kind
    return _BUILT_IN


def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def source_names() -> tuple[str, ...]:
    """Every name that resolves here without a reference: built-ins and installed entry points."""
    return tuple(dict.fromkeys([*sorted(_built_in()), *sorted(_entry_points())]))


def source_kind(name: str, config_dir: str | Path | None = None) -> SourceKind:
    """The kind `name` stands for, or DataError listing what does resolve."""
    from .function import function_kind

    if name in _built_in():
        return _built_in()[name]
    if name in _RESOLVED:
        return _RESOLVED[name]
    ep = _entry_points().get(name)
    if ep is not None:
        try:
            target = ep.load()  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is a clear error, not a crash
            raise DataError(f"data source {name!r} (entry point {ep.value}) fails to load: "  # type: ignore[attr-defined]
                            f"{type(exc).__name__}: {exc}") from None
        kind = target if isinstance(target, SourceKind) else function_kind(name, target)
    elif REFERENCE.match(name):
        try:
            target = import_reference(name, config_dir, "data source", "that returns a Dataset")
        except ReferenceImportError as exc:
            raise DataError(str(exc)) from None
        kind = function_kind(name, target)
    else:
        raise DataError(f"unknown data source {name!r}; this machine has {', '.join(source_names())}, "
                        f"or name a function as package.module:function (an entry point of the "
                        f"{ENTRY_POINT_GROUP!r} group is one too)")
    _RESOLVED[name] = kind
    return kind


