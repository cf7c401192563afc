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

from edge_sdk.models import ModelSpec, SpecError, structure
from edge_sdk.models.gates import gated_convs
from edge_sdk.models.network import meta_model
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

    @classmethod
    def check_model(cls, spec: ModelSpec, settings: FedDPSettings | None = None) -> None:
        """Without anything to prune, either variant would be FedAvg under another name."""
        settings = settings or FedDPSettings()
        model = meta_model(spec)
        if settings.variant == "gate":
            if not gated_convs(model, structure(spec.base).head):
                raise SpecError(
                    f"feddp variant 'gate' gates the output channels of 2-D convolutions "
                    f"(nn.Conv2d, not grouped or depthwise, not the output layer); model "
                    f"{spec.name!r} has none to gate: use feddp.variant = \"threshold\" or another "
                    "strategy")
        elif not any(p.dim() >= 3 for p in model.parameters()):
            raise SpecError(f"feddp variant 'threshold' prunes convolution kernels; model "
                            f"{spec.name!r} has no convolution: use another strategy (fedavg, "
                            "fedp3, hidenseek)")

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        features = {"threshold_pruning": {"threshold": self.settings.threshold}} \
            if self.settings.variant == "threshold" else {}
        return SubmodelPlan(device_index, round_number, self.spec,
                            tuple(TensorPlan(n) for n in self.all_tensors()),
                            aggregation_weight=float(num_samples), upload_dtype=self.upload_dtype,
                            features=features)
