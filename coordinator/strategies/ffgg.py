"""Partially personalized FL, "FFGG" (Mishchenko, Islamov, Gorbunov, Horváth, TMLR): global and private parameters by name.

Each round a device first fine-tunes its private parameters for `private_epochs` at the current
global parameters (the global part frozen), then trains the global part for `global_epochs`
with its private part frozen, and uploads the global part. The server averages the devices'
*changes* to the global part and steps with `server_lr`: with one local step this is a
(stochastic) gradient step on the global parameters at the devices' personalised optima, the
algorithm's core; more local steps give the local-steps variant. Because the server works with
changes, a stale update (computed from an older global model) is applied as what it is, which is
what the simulator's `ffgg.max_staleness` exercises.
"""

from __future__ import annotations

import re

import numpy as np
from pydantic import Field

from edge_sdk.models import ModelSpec
from edge_sdk.plan import SubmodelPlan, TensorPlan, TrainPhase
from edge_sdk.settings import Settings

from .base import Strategy
from .registry import register_strategy


class FFGGSettings(Settings):
    private: str = "head"        # "head" (the output layer) or a regex over tensor names
    private_epochs: int = Field(2, ge=1)
    global_epochs: int = Field(1, ge=1)
    server_lr: float = Field(1.0, gt=0)
    max_staleness: int = Field(0, ge=0)  # simulator: updates may come from a model this many rounds old


@register_strategy("ffgg", settings=FFGGSettings,
                   summary="partially personalized FL (FFGG): private parameters by name, server "
                           "steps on the mean change of the global part")
class FFGG(Strategy):
    settings: FFGGSettings
    aggregates = "delta"

    def __init__(self, spec: ModelSpec, settings: FFGGSettings | None = None, upload_dtype: str = "fp32",
                 seed: int = 0):
        super().__init__(spec, settings or FFGGSettings(), upload_dtype, seed)
        config = self.settings
        names = self.all_tensors()
        if config.private == "head":
            self.private = list(self.layers[-1])
        else:
            pattern = re.compile(config.private)
            self.private = [n for n in names if pattern.search(n)]
        self.shared = [n for n in names if n not in self.private]
        if not self.private or not self.shared:
            raise ValueError(f"ffgg.private={config.private!r} must select some but not all tensors "
                             f"of {spec.name} ({', '.join(names)})")

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        tensors = tuple([TensorPlan(n) for n in self.shared]
                        + [TensorPlan(n, upload=False, private=True) for n in self.private])
        phases = (TrainPhase(tuple(self.private), self.settings.private_epochs),
                  TrainPhase(tuple(self.shared), self.settings.global_epochs))
        return SubmodelPlan(device_index, round_number, self.spec, tensors,
                            aggregation_weight=float(num_samples), upload_dtype=self.upload_dtype,
                            phases=phases)

    def server_update(self, old: dict[str, np.ndarray], aggregated: dict[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
        """`aggregated` holds the mean change per entry (zero where nobody uploaded)."""
        return {name: (old[name] + self.settings.server_lr * aggregated[name]).astype(old[name].dtype)
                for name in old}
