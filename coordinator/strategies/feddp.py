"""Dynamic pruning, "FedDP" (Yu et al., CCGrid 2023), in two forms: the paper's and its released code's.

- `threshold`, the released code: FedAvg where each device zeroes conv weights with
  |w| <= `threshold` after every local epoch; pruned entries are not uploaded (the sparse codec
  drops them), which is where its communication saving comes from. Aggregation stays
  coverage-aware: an entry nobody uploaded keeps its global value.
- `gate`, the paper: every conv layer gets an FBS-style gate (global pooling, a small FC, top-k
  channels per sample, `gate` of them kept) that masks the rest in forward and backward; the
  gates are part of the model, so inference uses them too and its FLOPs drop
  (`edge_sdk.models.cost.inference_macs`). Gated models are exported and sliced at full width only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field

from edge_sdk.models import ModelSpec
from edge_sdk.plan import SubmodelPlan, TensorPlan
from edge_sdk.settings import Settings

from .base import Strategy
from .registry import register_strategy


class FedDPSettings(Settings):
    variant: Literal["threshold", "gate"] = "threshold"
    threshold: float = Field(1e-3, gt=0)
    gate: float = Field(0.5, gt=0, lt=1)


def gated(spec: ModelSpec, keep: float) -> ModelSpec:
    """The spec with a gate on every convolution (`edge_sdk/models/gates.py`)."""
    return replace(spec, gate=float(keep))


@register_strategy("feddp", settings=FedDPSettings,
                   summary="dynamic pruning, FedDP (Yu et al., 2023): magnitude threshold per epoch, "
                           "or learned channel gates")
class FedDP(Strategy):
    settings: FedDPSettings

    def __init__(self, spec: ModelSpec, settings: FedDPSettings | None = None, upload_dtype: str = "fp32",
                 seed: int = 0):
        settings = settings or FedDPSettings()
        if settings.variant == "gate":
            spec = gated(spec, settings.gate)
            self.width_sliceable = False
        super().__init__(spec, settings, upload_dtype, seed)

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        features = {"threshold_pruning": {"threshold": self.settings.threshold}} \
            if self.settings.variant == "threshold" else {}
        return SubmodelPlan(device_index, round_number, self.spec,
                            tuple(TensorPlan(n) for n in self.all_tensors()),
                            aggregation_weight=float(num_samples), upload_dtype=self.upload_dtype,
                            features=features)
