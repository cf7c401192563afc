"""The strategy registry: a strategy is one file that registers itself with its name, its settings
section and a one-line summary. The configuration schema, the CLI's choices and the README's
strategy table are all read from here, so nothing else needs to know a strategy exists.

    @register_strategy("mine", settings=MySettings, summary="what it does, after whom")
    class Mine(Strategy):
        def plan(self, device_index, round_number, num_samples): ...

Every module in this package is imported when the package is (see `__init__`), so a new file in
`coordinator/strategies/` is all it takes; a strategy defined elsewhere (a test, a plug-in)
registers when its module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_sdk.models import ModelSpec, SpecError
from edge_sdk.models.width import check_sliceable
from edge_sdk.settings import Settings

if TYPE_CHECKING:
    from .base import Strategy


@dataclass(frozen=True)
class StrategyEntry:
    name: str
    cls: type[Strategy]
    settings: type[Settings] | None   # the strategy's own section, if it has settings
    section: str | None               # that section's name in the configuration
    summary: str


_REGISTRY: dict[str, StrategyEntry] = {}


def register_strategy(name: str, *, settings: type[Settings] | None = None, section: str | None = None,
                      summary: str = ""):
    """Class decorator. `section` defaults to `name`; strategies that share settings name the same
    section (FedPer and FedRep read `[personal]`)."""

    def register(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY and _REGISTRY[name].cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"strategy {name!r} is already registered by {_REGISTRY[name].cls.__module__}")
        shared = section or name if settings is not None else None
        for other in _REGISTRY.values():
            if shared is not None and other.section == shared and other.settings is not settings \
                    and other.name != name:
                raise ValueError(f"section [{shared}] belongs to {other.name!r} with other settings")
        cls.name = name
        _REGISTRY[name] = StrategyEntry(name, cls, settings, shared, summary)
        return cls

    return register


def strategy_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def strategy_entry(name: str) -> StrategyEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; registered: {', '.join(_REGISTRY)}") from None


def strategy_sections() -> dict[str, type[Settings]]:
    """Section name -> settings model, for every registered strategy that has settings."""
    return {e.section: e.settings for e in _REGISTRY.values() if e.section is not None}


def check_strategy_name(name: str) -> str:
    """For the configuration's `strategy` key: a registered name, or an error listing them."""
    if name not in _REGISTRY:
        raise ValueError(f"{name!r} is not a registered strategy; use one of {', '.join(_REGISTRY)}")
    return name


def build_strategy(config: Any, spec: ModelSpec) -> Strategy:
    """`config`: a SimulationSettings or ServiceSettings (the same learning settings).

    A model the strategy cannot serve is refused here, before any round, with the reason
    (SpecError from the strategy's `check_model`, which its constructor calls); so are the run's
    `width_levels` below 1 when the strategy or the model cannot be width-sliced."""
    entry = strategy_entry(config.strategy)
    settings = getattr(config, entry.section) if entry.section is not None else None
    strategy = entry.cls(spec, settings, config.codec.upload_dtype, config.seed)
    levels = [r for r in getattr(config, "width_levels", None) or () if r < 1]
    if levels:
        if not strategy.width_sliceable:
            raise SpecError(f"{entry.name} runs every device at full width (FedDP's gates and "
                            f"HideNseek's masks are not width-sliced), and width_levels asks for "
                            f"{levels}; remove width_levels or use 1.0 only")
        try:
            check_sliceable(spec.base)
        except SpecError as exc:
            raise SpecError(f"width_levels {levels} ask for narrower submodels, and {exc}") from None
    return strategy


def strategy_table() -> str:
    """The README's table of strategies, in Markdown."""
    rows = ["| strategy | settings section | what it is |", "| --- | --- | --- |"]
    for entry in _REGISTRY.values():
        section = f"`[{entry.section}]`" if entry.section else "none"
        rows.append(f"| `{entry.name}` | {section} | {entry.summary} |")
    return "\n".join(rows)
