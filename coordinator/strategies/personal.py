"""Shared body, private head: FedPer (Arivazhagan et al., 2019) and FedRep (Collins et al., 2021).

The head (the output layer, or the last `head_layers` layers) never leaves the device: it is not
uploaded and, once the device holds a copy, not sent down either. FedPer trains body and head
together; FedRep first trains the head with the body frozen (`head_epochs`), then the body with
the head frozen (`body_epochs`), which is what makes its representation shared.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_sdk.models import ModelSpec
from edge_sdk.plan import SubmodelPlan, TensorPlan, TrainPhase

from .base import Strategy


@dataclass(frozen=True)
class PersonalConfig:
    head_layers: int = 1
    head_epochs: int = 2   # FedRep only
    body_epochs: int = 1   # FedRep only


class FedPer(Strategy):
    name = "fedper"

    def __init__(self, spec: ModelSpec, config: PersonalConfig, upload_dtype: str = "fp32", seed: int = 0):
        super().__init__(spec, upload_dtype, seed)
        if not 1 <= config.head_layers < len(self.layers):
            raise ValueError(f"head_layers must be between 1 and {len(self.layers) - 1} for "
                             f"{spec.name}, got {config.head_layers}")
        self.config = config
        self.head = [n for layer in self.layers[-config.head_layers:] for n in layer]
        self.body = [n for layer in self.layers[:-config.head_layers] for n in layer]

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        tensors = tuple([TensorPlan(n) for n in self.body]
                        + [TensorPlan(n, upload=False, private=True) for n in self.head])
        return SubmodelPlan(device_index, round_number, self.spec, tensors,
                            aggregation_weight=float(num_samples), upload_dtype=self.upload_dtype,
                            phases=self.phases())

    def phases(self) -> tuple[TrainPhase, ...]:
        return ()


class FedRep(FedPer):
    name = "fedrep"

    def phases(self) -> tuple[TrainPhase, ...]:
        return (TrainPhase(tuple(self.head), self.config.head_epochs),
                TrainPhase(tuple(self.body), self.config.body_epochs))


class LocalOnly(Strategy):
    """Every device trains alone on its own data: nothing is uploaded or aggregated. The floor
    any federated method must beat, and what FFGG is compared with as heterogeneity grows."""

    name = "local"

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        return SubmodelPlan(device_index, round_number, self.spec,
                            tuple(TensorPlan(n, upload=False, private=True) for n in self.all_tensors()),
                            upload_dtype=self.upload_dtype)
