"""Dynamic pruning, "FedDP" (Yu et al., CCGrid 2023), in the two forms RESEARCH.md names.

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

from dataclasses import dataclass, replace
from typing import Literal

from edge_sdk.models import ModelSpec
from edge_sdk.plan import SubmodelPlan, TensorPlan

from .base import Strategy


@dataclass(frozen=True)
class FedDPConfig:
    variant: Literal["threshold", "gate"] = "threshold"
    threshold: float = 1e-3
    gate: float = 0.5


def gated(spec: ModelSpec, keep: float) -> ModelSpec:
    layers = tuple(replace(layer, gate=keep) if layer.kind == "conv" else layer for layer in spec.layers)
    return replace(spec, name=f"{spec.name}+gate{keep:g}", layers=layers)


class FedDP(Strategy):
    name = "feddp"

    def __init__(self, spec: ModelSpec, config: FedDPConfig, upload_dtype: str = "fp32", seed: int = 0):
        if config.variant == "gate":
            if not 0 < config.gate < 1:
                raise ValueError(f"feddp.gate must be in (0, 1), got {config.gate}")
            spec = gated(spec, config.gate)
        elif config.threshold <= 0:
            raise ValueError(f"feddp.threshold must be > 0, got {config.threshold}")
        super().__init__(spec, upload_dtype, seed)
        self.config = config

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        threshold = self.config.threshold if self.config.variant == "threshold" else None
        return SubmodelPlan(device_index, round_number, self.spec,
                            tuple(TensorPlan(n) for n in self.all_tensors()),
                            aggregation_weight=float(num_samples), upload_dtype=self.upload_dtype,
                            prune_threshold=threshold)
