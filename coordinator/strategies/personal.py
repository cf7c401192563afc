"""Shared body, private head: FedPer (Arivazhagan et al., 2019) and FedRep (Collins et al., 2021).

The head (the output layer, or the last `head_layers` layers) never leaves the device: it is not
uploaded and, once the device holds a copy, not sent down either. FedPer trains body and head
together; FedRep first trains the head with the body frozen (`head_epochs`), then the body with
the head frozen (`body_epochs`), which is what makes its representation shared.
"""

from __future__ import annotations

from pydantic import Field

from edge_sdk.models import ModelSpec, SpecError, layer_tensor_names
from edge_sdk.plan import SubmodelPlan, TensorPlan, TrainPhase
from edge_sdk.settings import Settings

from .base import Strategy
from .registry import register_strategy


class PersonalSettings(Settings):
    head_layers: int = Field(1, ge=1)
    head_epochs: int = Field(2, ge=1)   # FedRep only
    body_epochs: int = Field(1, ge=1)   # FedRep only


@register_strategy("fedper", settings=PersonalSettings, section="personal",
                   summary="FedPer (Arivazhagan et al., 2019): shared body, private head")
class FedPer(Strategy):
    settings: PersonalSettings

    def __init__(self, spec: ModelSpec, settings: PersonalSettings | None = None,
                 upload_dtype: str = "fp32", seed: int = 0):
        super().__init__(spec, settings or PersonalSettings(), upload_dtype, seed)
        config = self.settings
        self.head = [n for layer in self.layers[-config.head_layers:] for n in layer]
        self.body = [n for layer in self.layers[:-config.head_layers] for n in layer]

    @classmethod
    def check_model(cls, spec: ModelSpec, settings: PersonalSettings | None = None) -> None:
        """The head is the last `head_layers` layers (the output layer last); a shared body must
        be left, or nothing would be federated."""
        layers = len(layer_tensor_names(spec))
        head_layers = (settings or PersonalSettings()).head_layers
        if layers < 2:
            raise SpecError(f"{cls.name} keeps the output layer on the device and shares the "
                            f"layers before it, and model {spec.name!r} has no layer before its "
                            "output layer; use another strategy")
        if head_layers >= layers:
            raise SpecError(f"personal.head_layers = {head_layers} leaves no shared body: model "
                            f"{spec.name!r} has {layers} layers (its parametrised modules in "
                            f"forward order, the output layer last); use 1 to {layers - 1}")

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        tensors = tuple([TensorPlan(n) for n in self.body]
                        + [TensorPlan(n, upload=False, private=True) for n in self.head])
        return SubmodelPlan(device_index, round_number, self.spec, tensors,
                            aggregation_weight=float(num_samples), upload_dtype=self.upload_dtype,
                            phases=self.phases())

    def phases(self) -> tuple[TrainPhase, ...]:
        return ()


@register_strategy("fedrep", settings=PersonalSettings, section="personal",
                   summary="FedRep (Collins et al., 2021): head first with the body frozen, then the body")
class FedRep(FedPer):

    def phases(self) -> tuple[TrainPhase, ...]:
        return (TrainPhase(tuple(self.head), self.settings.head_epochs),
                TrainPhase(tuple(self.body), self.settings.body_epochs))


@register_strategy("local", summary="every device trains alone: the floor a federated method must beat")
class LocalOnly(Strategy):
    """Every device trains alone on its own data: nothing is uploaded or aggregated. The floor
    any federated method must beat, and what FFGG is compared with as heterogeneity grows."""

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        return SubmodelPlan(device_index, round_number, self.spec,
                            tuple(TensorPlan(n, upload=False, private=True) for n in self.all_tensors()),
                            upload_dtype=self.upload_dtype)
