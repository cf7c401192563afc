"""Simulation backends: where `fedprune simulate`'s devices live and run their tasks.

`inprocess` (the default): every device in the driver's process. `ray`: Ray's pooled workers on a
Ray cluster, the devices' state in its object store (coordinator/backends/ray_backend.py); ray is
imported only when it is chosen. The driver loop in coordinator/simulation.py is the same for
both.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:  # the registry stays light: a backend's module is imported when it is opened
    from edge_sdk.data import ClientData

    from .base import FleetSetup, SimulationBackend

BackendName = Literal["inprocess", "ray"]

# name -> "module:class", imported when the backend is opened
_REGISTRY: dict[str, str] = {
    "inprocess": "coordinator.backends.inprocess:InProcessBackend",
    "ray": "coordinator.backends.ray_backend:RayBackend",
}
assert set(_REGISTRY) == set(get_args(BackendName)), "BackendName and _REGISTRY disagree"


def backend_names() -> list[str]:
    return list(_REGISTRY)


def open_backend(name: str, setup: FleetSetup, shards: Sequence[ClientData]) -> SimulationBackend:
    """The named backend with the run's devices built. `shards`: the driver's client data (the
    in-process backend uses them; a remote one loads its own on each node)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown simulation backend {name!r}; the backends are "
                         f"{', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(setup, shards)

