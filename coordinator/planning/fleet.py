"""A planned fleet: every device's sampled profile, its budget plan, and its submodel per round.

`SubmodelViews` is where width slicing meets the round: for each width ratio it extracts the
sliced global state once per round (channels chosen by prefix, rolling window or magnitude),
encodes downloads from it, and maps uploads back to global indices for the aggregator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from device_profiles import DeviceProfile, parse_fleet_arg, sample_fleet
from edge_sdk import codec
from edge_sdk.budget import BudgetPlan
from edge_sdk.models import ModelSpec, tensor_shapes
from edge_sdk.plan import SubmodelPlan
from edge_sdk.slicing import extract, select_channels, slice_map, to_global, width_spec

from ..strategies import DownloadBuilder
from .memory import MemoryCoefficients
from .planner import PlannerSettings, plan_device


@dataclass(frozen=True)
class DeviceAssignment:
    client_id: int
    profile: DeviceProfile
    plan: BudgetPlan

    def to_dict(self) -> dict:
        return {"client": self.client_id, "device": self.profile.name,
                "width_ratio": self.plan.width_ratio,
                "predicted_peak_bytes": self.plan.predicted_peak_bytes,
                "budget_bytes": self.plan.budget_bytes, "fits": self.plan.fits,
                "physical_batch_size": self.plan.physical_batch_size,
                "local_samples": self.plan.local_samples, "reasons": self.plan.reasons}


def plan_fleet(fleet: str, base: ModelSpec, model_name: str, local_samples: list[int],
               settings: PlannerSettings) -> list[DeviceAssignment]:
    profiles = sample_fleet(len(local_samples), parse_fleet_arg(fleet))
    coefficients = MemoryCoefficients.load()
    return [DeviceAssignment(i, profile, plan_device(
                profile, base, model_name,
                dataclasses.replace(settings, local_samples=local_samples[i]), coefficients))
            for i, profile in enumerate(profiles)]


@dataclass
class SubmodelView:
    spec: ModelSpec
    shapes: dict[str, tuple[int, ...]]
    downloads: DownloadBuilder
    smap: Mapping[str, np.ndarray] | None  # None: the full model, global indices as they are
    ratio: float = 1.0

    def adapt(self, plan: SubmodelPlan) -> SubmodelPlan:
        """The strategy's plan on this width: its spec, and FjORD's levels made relative to it."""
        levels = plan.ordered_dropout
        if levels:
            ratio = self.ratio
            levels = tuple(p / ratio for p in levels if p <= ratio + 1e-9) or (1.0,)
        return dataclasses.replace(plan, spec=self.spec, ordered_dropout=levels)

    def to_global(self, update: dict[str, codec.SparseTensor]) -> dict[str, codec.SparseTensor]:
        return update if self.smap is None else to_global(update, self.smap)


class SubmodelViews:
    """One round's submodels, one per width ratio in use."""

    def __init__(self, base: ModelSpec, global_state: Mapping[str, np.ndarray],
                 value_dtype: codec.ValueDtype, method: str, round_number: int,
                 fixed_masks: Mapping[str, np.ndarray] | None = None):
        self.base, self.global_state, self.fixed_masks = base, global_state, fixed_masks
        self.value_dtype, self.method, self.round_number = value_dtype, method, round_number
        self._views: dict[float, SubmodelView] = {}

    def view(self, ratio: float) -> SubmodelView:
        if ratio not in self._views:
            if ratio >= 1.0:
                self._views[ratio] = SubmodelView(self.base, tensor_shapes(self.base),
                                                  DownloadBuilder(self.global_state, self.value_dtype,
                                                                  self.fixed_masks),
                                                  None, 1.0)
            else:
                kept = select_channels(self.base, self.global_state, ratio, self.method,
                                       self.round_number)
                smap = slice_map(self.base, kept)
                spec = width_spec(self.base, ratio)
                self._views[ratio] = SubmodelView(
                    spec, tensor_shapes(spec),
                    DownloadBuilder(extract(self.global_state, smap), self.value_dtype), smap, ratio)
        return self._views[ratio]
