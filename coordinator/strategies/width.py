"""Width-scaled submodels: HeteroFL (Diao et al., 2021), FedRolex (Alam et al., 2022), FjORD
(Horvath et al., 2021).

All three give each device a width (its planned width in a `--fleet`, else `width_levels` by
device index) and train the full plan of that submodel; they differ in which channels a width keeps
and in how the device trains it:
- HeteroFL keeps the first ceil(r x C) channels of every hidden layer (a static prefix);
- FedRolex keeps a window that rolls by one channel per round, so every channel is trained;
- FjORD keeps the prefix like HeteroFL and trains it with ordered dropout: each batch samples a
  width p from the levels up to the device's own and runs the nested p-prefix of its submodel.
Aggregation is the coverage-aware mean: each entry over the devices whose submodel holds it.
"""

from __future__ import annotations

import dataclasses

from edge_sdk.models import ModelSpec, SpecError
from edge_sdk.models.width import check_sliceable
from edge_sdk.plan import SubmodelPlan, TensorPlan
from edge_sdk.settings import Settings, WidthLevels

from .base import Strategy
from .registry import register_strategy


class FjORDSettings(Settings):
    # Widths (fractions of the full model) a device samples per batch, up to its own width.
    levels: WidthLevels = [1.0, 0.75, 0.5, 0.25]


@register_strategy("heterofl", summary="HeteroFL (Diao et al., 2021): nested width prefixes")
class HeteroFL(Strategy):
    slicing = "prefix"

    @classmethod
    def check_model(cls, spec: ModelSpec, settings: Settings | None = None) -> None:
        """Narrower submodels are the method: a model Torch-Pruning cannot prune is refused."""
        try:
            check_sliceable(spec.base)
        except SpecError as exc:
            raise SpecError(f"{cls.name} trains narrower submodels of the model, and {exc}") from None

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        return SubmodelPlan(device_index, round_number, self.spec,
                            tuple(TensorPlan(n) for n in self.all_tensors()),
                            aggregation_weight=float(num_samples), upload_dtype=self.upload_dtype)


@register_strategy("fedrolex", summary="FedRolex (Alam et al., 2022): a channel window that rolls each round")
class FedRolex(HeteroFL):
    slicing = "rolling"


@register_strategy("fjord", settings=FjORDSettings,
                   summary="FjORD (Horvath et al., 2021): width prefixes trained with ordered dropout")
class FjORD(HeteroFL):
    settings: FjORDSettings

    def __init__(self, spec: ModelSpec, settings: FjORDSettings | None = None, upload_dtype: str = "fp32",
                 seed: int = 0):
        super().__init__(spec, settings or FjORDSettings(), upload_dtype, seed)
        self.levels = tuple(sorted(set(self.settings.levels)))

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        # Levels are relative to the full model; the device maps them onto its own width.
        return SubmodelPlan(device_index, round_number, self.spec,
                            tuple(TensorPlan(n) for n in self.all_tensors()),
                            aggregation_weight=float(num_samples), upload_dtype=self.upload_dtype,
                            features={"ordered_dropout": {"levels": list(self.levels)}})

    def at_width(self, plan: SubmodelPlan, ratio: float) -> SubmodelPlan:
        """The levels up to the device's width, as fractions of its submodel."""
        levels = [p / ratio for p in self.levels if p <= ratio + 1e-9] or [1.0]
        return dataclasses.replace(plan, features={"ordered_dropout": {"levels": levels}})
