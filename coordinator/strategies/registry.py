"""Strategy names to strategies, from the run configuration (shared by simulator and service)."""

from __future__ import annotations

from typing import Any

from edge_sdk.models import ModelSpec

from .base import Strategy
from .fedavg import FedAvg
from .feddp import FedDP, FedDPConfig
from .fedp3 import FedP3, FedP3Config
from .ffgg import FFGG, FFGGConfig
from .hidenseek import HideNseek, HideNseekConfig
from .personal import FedPer, FedRep, LocalOnly, PersonalConfig
from .width import FedRolex, FjORD, HeteroFL

STRATEGIES = ("fedavg", "fedp3", "fedper", "fedrep", "ffgg", "heterofl", "fedrolex", "fjord", "feddp",
              "local", "hidenseek")


def build_strategy(config: Any, spec: ModelSpec) -> Strategy:
    """`config` is a SimulationConfig or ServiceConfig (same section names)."""
    dtype, seed = config.codec.upload_dtype, config.seed
    name = config.strategy
    if name == "fedavg":
        return FedAvg(spec, dtype, seed)
    if name == "fedp3":
        return FedP3(spec, FedP3Config(**config.fedp3.model_dump()), dtype, seed)
    if name in ("fedper", "fedrep"):
        cls = FedPer if name == "fedper" else FedRep
        return cls(spec, PersonalConfig(**config.personal.model_dump()), dtype, seed)
    if name == "ffgg":
        return FFGG(spec, FFGGConfig(**config.ffgg.model_dump()), dtype, seed)
    if name == "heterofl":
        return HeteroFL(spec, dtype, seed)
    if name == "fedrolex":
        return FedRolex(spec, dtype, seed)
    if name == "fjord":
        return FjORD(spec, tuple(config.width_levels or (1.0, 0.75, 0.5, 0.25)), dtype, seed)
    if name == "hidenseek":
        return HideNseek(spec, HideNseekConfig(**config.hidenseek.model_dump()), dtype, seed)
    if name == "local":
        return LocalOnly(spec, dtype, seed)
    if name == "feddp":
        return FedDP(spec, FedDPConfig(**config.feddp.model_dump()), dtype, seed)
    raise ValueError(f"unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}")
