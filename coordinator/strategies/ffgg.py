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

from edge_sdk.models import ModelSpec, SpecError, layer_tensor_names
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


def private_tensors(spec: ModelSpec, private: str) -> list[str]:
    """The output layer's tensors for "head" (the layer producing the logits, last in forward
    order: what is most personal in a classifier), else the tensors the regex finds."""
    layers = layer_tensor_names(spec)
    if private == "head":
        return list(layers[-1])
    try:
        pattern = re.compile(private)
    except re.error as exc:
        raise SpecError(f"ffgg.private = {private!r} is not a regular expression ({exc}); use "
                        "\"head\" or a regex over tensor names") from None
    return [n for layer in layers for n in layer if pattern.search(n)]


@register_strategy("ffgg", settings=FFGGSettings,
                   summary="partially personalized FL (FFGG): private parameters by name, server "
                           "steps on the mean change of the global part")
class FFGG(Strategy):
    settings: FFGGSettings
    aggregates = "delta"

    def __init__(self, spec: ModelSpec, settings: FFGGSettings | None = None, upload_dtype: str = "fp32",
                 seed: int = 0):
        super().__init__(spec, settings or FFGGSettings(), upload_dtype, seed)
        self.private = private_tensors(spec, self.settings.private)
        self.shared = [n for n in self.all_tensors() if n not in self.private]

    @classmethod
    def check_model(cls, spec: ModelSpec, settings: FFGGSettings | None = None) -> None:
        """The model must split into a private part and a global part, both non-empty."""
        private = (settings or FFGGSettings()).private
        names = [n for layer in layer_tensor_names(spec) for n in layer]
        chosen = private_tensors(spec, private)
        if not chosen or len(chosen) == len(names):
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            raise SpecError(f"ffgg.private = {private!r} must select some but not all tensors of "
                            f"model {spec.name!r}, it selects {len(chosen)} of {len(names)} "
                            f"({shown})")

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
