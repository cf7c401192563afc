"""Seeded fleets of catalogue devices, so simulations face realistic, repeatable heterogeneity.

Phones get their own network draw because that is where the real spread is: FLASH's
trace of 19 smartphones shows per-device throughput varying by an order of magnitude,
while Pi/Jetson/gateway links are catalogue assumptions with nothing to sample from.

Units: FLASH's trace is in "kb/s", and FLASH's simulator turns a model's byte size into
that "kb" with `/ 1024` before dividing by the speed, so we take 1 kb = 1024 bytes
(`FLASH_KB_BYTES`). Draws follow FLASH: Normal(mean, std) per device, redrawn while not
positive (FLASH redraws negatives; a zero speed would be a division by zero for us).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .catalogue import (
    CATALOGUE,
    FLASH_KB_BYTES,
    PHONE_CLASSES,
    CatalogueError,
    catalogue_profile,
    flash_network_traces,
)
from .profile import DeviceProfile, NetworkProfile

__all__ = ["parse_fleet_arg", "sample_fleet"]

# Every traced mean is positive, so redraws end almost at once; the cap turns a corrupt
# row (say a negative mean with a tiny std) into an error instead of a hang.
_MAX_REDRAWS = 10_000

_FLEET_ARG = re.compile(r"catalogue(?::(\d+))?")


def _positive_normal(rng: np.random.Generator, mean: float, std: float, what: str) -> float:
    for _ in range(_MAX_REDRAWS):
        value = float(rng.normal(mean, std))
        if value > 0:
            return value
    raise CatalogueError(f"{what}: Normal({mean}, {std}) gave no positive draw in {_MAX_REDRAWS} tries")


def _with_trace_network(
    base: DeviceProfile, name: str, trace: dict, rng: np.random.Generator
) -> DeviceProfile:
    guid = trace["device_guid"]
    down = _positive_normal(rng, trace["down_mean"], trace["down_std"], guid)
    up = _positive_normal(rng, trace["up_mean"], trace["up_std"], guid)
    network = NetworkProfile(
        uplink_bytes_per_s=up * FLASH_KB_BYTES,
        downlink_bytes_per_s=down * FLASH_KB_BYTES,
        source="trace",
    )
    source = (
        f"{base.source}; in this fleet the network is instead one draw from FLASH device {guid}: "
        f"down Normal({trace['down_mean']:.1f}, {trace['down_std']:.1f}) kb/s, "
        f"up Normal({trace['up_mean']:.1f}, {trace['up_std']:.1f}) kb/s, "
        f"negatives redrawn, 1 kb = {FLASH_KB_BYTES} bytes"
    )
    return base.model_copy(update={"name": name, "source": source, "network": network}, deep=True)


def sample_fleet(
    n: int, seed: int, names: list[str] | None = None, data_dir: str | Path | None = None
) -> list[DeviceProfile]:
    """Draw `n` devices, classes uniformly from `names` (default: the whole catalogue).

    Device i is named `<class>#<i>`, so names are unique within a fleet and stable under
    the seed. The same (n, seed, names) always gives the same fleet.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"fleet size must be a non-negative integer, got {n!r}")
    classes = list(CATALOGUE) if names is None else list(names)
    if not classes:
        raise ValueError("names is empty: give at least one catalogue class")
    unknown = [c for c in classes if c not in CATALOGUE]
    if unknown:
        raise CatalogueError(
            f"unknown device class(es) {', '.join(map(repr, unknown))}; "
            f"the catalogue has: {', '.join(CATALOGUE)}"
        )
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(classes), size=n)
    bases = {c: catalogue_profile(c, data_dir) for c in set(classes)}
    traces = flash_network_traces(data_dir) if any(c in PHONE_CLASSES for c in classes) else []
    fleet = []
    for i, pick in enumerate(picks):
        cls = classes[int(pick)]
        name = f"{cls}#{i}"
        if cls in PHONE_CLASSES:
            trace = traces[int(rng.integers(len(traces)))]
            fleet.append(_with_trace_network(bases[cls], name, trace, rng))
        else:
            fleet.append(bases[cls].model_copy(update={"name": name}, deep=True))
    return fleet


def parse_fleet_arg(value: str) -> int:
    """Seed from a `--fleet catalogue[:seed]` value: `catalogue` is seed 0."""
    match = _FLEET_ARG.fullmatch(value.strip())
    if match is None:
        raise ValueError(
            f"bad fleet {value!r}: expected 'catalogue' or 'catalogue:SEED' with SEED a "
            f"non-negative integer, e.g. 'catalogue:7'"
        )
    return int(match.group(1) or 0)
