"""Partially personalized FL, "FFGG" (RESEARCH.md section 1): global and private parameters by name.

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
from dataclasses import dataclass

import numpy as np

from edge_sdk.models import ModelSpec
from edge_sdk.plan import SubmodelPlan, TensorPlan, TrainPhase

from .base import Strategy


@dataclass(frozen=True)
class FFGGConfig:
    private: str = "head"        # "head" (the output layer) or a regex over tensor names
    private_epochs: int = 2
    global_epochs: int = 1
    server_lr: float = 1.0
    max_staleness: int = 0       # simulator: updates may be computed on a model this many rounds old


class FFGG(Strategy):
    name = "ffgg"
    aggregates = "delta"

    def __init__(self, spec: ModelSpec, config: FFGGConfig, upload_dtype: str = "fp32", seed: int = 0):
        super().__init__(spec, upload_dtype, seed)
        if config.server_lr <= 0:
            raise ValueError(f"ffgg.server_lr must be > 0, got {config.server_lr}")
        self.config = config
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
        phases = (TrainPhase(tuple(self.private), self.config.private_epochs),
                  TrainPhase(tuple(self.shared), self.config.global_epochs))
        return SubmodelPlan(device_index, round_number, self.spec, tensors,
                            aggregation_weight=float(num_samples), upload_dtype=self.upload_dtype,
                            phases=phases)

    def server_update(self, old: dict[str, np.ndarray], aggregated: dict[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
        """`aggregated` holds the mean change per entry (zero where nobody uploaded)."""
        return {name: (old[name] + self.config.server_lr * aggregated[name]).astype(old[name].dtype)
                for name in old}
