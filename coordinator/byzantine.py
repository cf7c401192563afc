"""Simulated Byzantine devices: what a malicious device could send instead of its honest update.

Attacks act on the update's change from the model the device started from (its delta), which is
what moves the global model: sign flip sends -scale x delta, scaling sends scale x delta, noise
adds Gaussian noise of standard deviation `noise` to every uploaded value. The simulator applies
them to the chosen share of devices after honest local training, before aggregation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import Field

from edge_sdk.codec import SparseTensor
from edge_sdk.settings import Settings

Attack = Literal["sign_flip", "scale", "noise"]


class ByzantineSettings(Settings):
    """The simulator's `[byzantine]` section."""

    fraction: float = Field(0.0, ge=0, lt=1)
    attack: Attack = "sign_flip"
    scale: float = Field(4.0, gt=0)
    noise: float = Field(1.0, gt=0)

    def malicious(self, devices: int, seed: int) -> set[int]:
        """A fixed set of malicious device indices for the whole run (`seed`: the run's)."""
        count = int(round(self.fraction * devices))
        rng = np.random.default_rng([seed, 7919])
        return set(int(i) for i in rng.choice(devices, count, replace=False))


def attack(update: Mapping[str, SparseTensor], base: Mapping[str, np.ndarray],
           settings: ByzantineSettings, rng: np.random.Generator) -> dict[str, SparseTensor]:
    """The malicious version of `update`; `base` is the state the device started from."""
    out = {}
    for name, tensor in update.items():
        start = base[name].reshape(-1)
        start = start if tensor.indices is None else start[tensor.indices]
        delta = tensor.values - start
        if settings.attack == "sign_flip":
            values = start - settings.scale * delta
        elif settings.attack == "scale":
            values = start + settings.scale * delta
        else:
            values = tensor.values + rng.normal(0.0, settings.noise, size=tensor.values.shape)
        out[name] = SparseTensor(tensor.shape, tensor.indices, values.astype(np.float32))
    return out
