"""The partitioner registry: every partition kind by name, how its parameters parse, and what it does.

A kind is one function registered with `@partitioner(name, parse=..., summary=...)`: the built-ins
are this package's modules (one file per kind, imported on first use), a user's own are entry
points of the `fedprune.partitioners` group named as the kind (the entry point's module registers
the kind when loaded, or the entry point names a `PartitionerKind`). Adding a kind is one file or
one entry point; `parse_partition` and `partition` (partition.py) dispatch through here, and the
error for a bad spec lists every kind's one-line summary, so the help can never go stale.

Every kind is deterministic: it draws only from the generator `partition` seeds with the run's
seed, so every server and every device derives the same shards from (spec, seed[, groups]).
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

import numpy as np

ENTRY_POINT_GROUP = "fedprune.partitioners"
NEEDS_FLEET = "needs the fleet's tiers: run it in a simulation with a fleet"


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed spec. The three named fields are the historical kinds' parameters (kept so their
    callers and tests stay as they were); any other kind keeps its parameters in `params`."""

    kind: str
    classes_per_client: int | None = None
    alpha: float | None = None
    min_size: int | None = None
    params: tuple[tuple[str, float], ...] = ()

    def param(self, name: str) -> float:
        return dict(self.params)[name]

    def __str__(self) -> str:
        if self.kind == "classes":
            return f"classes:{self.classes_per_client}"
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "niid-dirichlet":
            return f"niid-dirichlet:{self.alpha:g}:{self.min_size}"
        if self.params:
            return ":".join([self.kind, *(f"{value:g}" for _, value in self.params)])
        return self.kind


@dataclass(frozen=True)
class PartitionInput:
    """What a kind splits: validated labels, client count, class count, the seeded generator,
    and when known each sample's writer and each client's tier (`groups`, 0 = weakest)."""

    labels: np.ndarray
    num_clients: int
    num_classes: int
    rng: np.random.Generator
    writers: np.ndarray | None = None
    groups: np.ndarray | None = None


# parse(spec text as given, its parameters after the kind) -> PartitionSpec
Parser = Callable[[str, list[str]], PartitionSpec]
Splitter = Callable[[PartitionInput, PartitionSpec], list[np.ndarray]]


@dataclass(frozen=True)
class PartitionerKind:
    name: str
    parse: Parser
    summary: str          # one line, with an example: the error listing accepted kinds shows it
    split: Splitter
    needs_groups: bool = False  # a tier kind: refused without the fleet's tiers
    needs_writers: bool = False  # reads each sample's writer (a source must give its user column)


_BUILT_IN: dict[str, PartitionerKind] = {}
_LOADED = False
_PLUGINS: dict[str, PartitionerKind] = {}  # entry points, once loaded
_registering_plugin: list[bool] = [False]


def partitioner(name: str, *, parse: Parser, summary: str, needs_groups: bool = False,
                needs_writers: bool = False) -> Callable[[Splitter], Splitter]:
    """Register the decorated function as partition kind `name` (lower case, no ':')."""
    if not name or name != name.strip().lower() or ":" in name:
        raise ValueError(f"partition kind name {name!r} must be lower case, without ':' or spaces")

    def register(split: Splitter) -> Splitter:
        kind = PartitionerKind(name, parse, summary, split, needs_groups, needs_writers)
        table = _PLUGINS if _registering_plugin[0] else _BUILT_IN
        existing = _BUILT_IN.get(name) or _PLUGINS.get(name)
        if existing is not None and existing.split is not split:
            raise ValueError(f"partition kind {name!r} is registered twice "
                             f"({existing.split.__module__} and {split.__module__})")
        table[name] = kind
        return split

    return register


def _built_in() -> dict[str, PartitionerKind]:
    global _LOADED
    if not _LOADED:
        package = sys.modules[__package__]
        for module in pkgutil.iter_modules(package.__path__):
            if module.name != "registry":
                importlib.import_module(f"{__package__}.{module.name}")
        _LOADED = True
    return _BUILT_IN


def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load_plugin(name: str, ep) -> PartitionerKind:
    _registering_plugin[0] = True
    try:
        target = ep.load()
    except Exception as exc:  # noqa: BLE001 - a broken plug-in is a clear error, not a crash
        raise ValueError(f"partition kind {name!r} (entry point {ep.value} of "
                         f"{ENTRY_POINT_GROUP!r}) fails to load: {type(exc).__name__}: {exc}") from None
    finally:
        _registering_plugin[0] = False
    if isinstance(target, PartitionerKind):
        _PLUGINS[name] = target
    if name not in _PLUGINS:
        raise ValueError(f"entry point {name!r} of {ENTRY_POINT_GROUP!r} ({ep.value}) registers "
                         f"no partition kind named {name!r}: decorate its function with "
                         f"@partitioner({name!r}, ...) or point the entry point at a PartitionerKind")
    return _PLUGINS[name]


def kinds() -> dict[str, PartitionerKind]:
    """Every kind this machine has, built-ins first; entry points that fail to load are left out
    (naming one gives its load error)."""
    table = dict(_built_in())
    for name, ep in _entry_points().items():
        if name not in table:
            try:
                table[name] = _PLUGINS.get(name) or _load_plugin(name, ep)
            except ValueError:
                continue
    return table


def accepted() -> str:
    return "accepted partition specs: " + "; ".join(f"'{k.name}' ({k.summary})"
                                                    for k in kinds().values())


def bad_spec(spec: str, why: str) -> ValueError:
    return ValueError(f"bad partition spec {spec!r}: {why}; {accepted()}")


def partitioner_kind(name: str, spec: str | None = None) -> PartitionerKind:
    if name in _built_in():
        return _BUILT_IN[name]
    if name in _PLUGINS:
        return _PLUGINS[name]
    ep = _entry_points().get(name)
    if ep is None:
        raise bad_spec(spec if spec is not None else name, f"unknown kind {name!r}")
    return _load_plugin(name, ep)


def parse_partition(spec: str) -> PartitionSpec:
    if not isinstance(spec, str):
        raise bad_spec(repr(spec), "spec must be a string")
    parts = spec.strip().lower().split(":")
    return partitioner_kind(parts[0], spec).parse(spec, parts[1:])


# --- parameter parsers kinds share ------------------------------------------------------------


def parse_int(spec: str, text: str, what: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise bad_spec(spec, f"{what} must be an integer, got {text!r}") from None
    if value < minimum:
        raise bad_spec(spec, f"{what} must be >= {minimum}, got {value}")
    return value


def parse_number(spec: str, text: str, what: str, low: float, high: float = math.inf,
                 low_open: bool = True, high_open: bool = True) -> float:
    """A finite float in the stated range, or the bad-spec error saying which range."""
    try:
        value = float(text)
    except ValueError:
        raise bad_spec(spec, f"{what} must be a number, got {text!r}") from None
    inside = math.isfinite(value) and (value > low if low_open else value >= low) and \
        (value < high if high_open else value <= high)
    if not inside:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise bad_spec(spec, f"{what} must lie in {left}{low:g}, {high:g}{right}, got {text!r}")
    return value


def parse_alpha(spec: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise bad_spec(spec, f"ALPHA must be a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise bad_spec(spec, f"ALPHA must be a positive finite number, got {text!r}")
    return value


def no_params(spec: str, args: list[str]) -> PartitionSpec:
    kind = spec.strip().lower().split(":")[0]
    if args:
        raise bad_spec(spec, f"'{kind}' takes no parameters")
    return PartitionSpec(kind)


def one_param(name: str, what: str, **limits) -> Parser:
    """A parser for `kind:VALUE`, VALUE a number within `limits` (see parse_number)."""
    def parse(spec: str, args: list[str]) -> PartitionSpec:
        kind = spec.strip().lower().split(":")[0]
        if len(args) != 1:
            raise bad_spec(spec, f"'{kind}' needs exactly one parameter {what}")
        return PartitionSpec(kind, params=((name, parse_number(spec, args[0], what, **limits)),))
    return parse


# --- helpers tier kinds share ------------------------------------------------------------------


def tiers_of(data: PartitionInput, kind: str) -> np.ndarray:
    """The validated per-client tiers, or the error saying a tier kind needs the fleet."""
    if data.groups is None:
        raise ValueError(f"partition {kind!r} {NEEDS_FLEET}")
    return data.groups


def check_nonempty(parts: list[np.ndarray], kind: str) -> list[np.ndarray]:
    empty = [c for c, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(f"partition {kind!r} leaves client(s) {empty[:10]} without samples; "
                         f"use fewer clients or more data")
    return parts
