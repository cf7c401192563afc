"""FedAvg on the full dense model: the reference every other method is measured against."""

from __future__ import annotations

from edge_sdk.plan import SubmodelPlan, TensorPlan

from .base import Strategy
from .registry import register_strategy


@register_strategy("fedavg", summary="FedAvg (McMahan et al., 2017) on the full dense model: the reference")
class FedAvg(Strategy):

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        tensors = tuple(TensorPlan(name) for layer in self.layers for name in layer)
        return SubmodelPlan(device_index, round_number, self.spec, tensors,
                            aggregation_weight=float(num_samples), upload_dtype=self.upload_dtype,
                            selected_layers=tuple(range(len(self.layers))))
