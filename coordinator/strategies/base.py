"""What every strategy shares: turning a plan into the device's download, and its byte cost.

A strategy decides per device and round *what* each tensor is for (its plan); the download
follows mechanically from the plan: private tensors are sent only to a device that holds no copy
yet, prunable tensors with download_keep < 1 go down as magnitude top-k (FedP3's Q_i).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from edge_sdk import codec
from edge_sdk.models import ModelSpec, layer_tensor_names
from edge_sdk.plan import SubmodelPlan
from edge_sdk.settings import Settings
from edge_sdk.pruning import is_prunable, magnitude_mask


class Strategy(ABC):
    name: str = "base"  # set by @register_strategy
    # Width selection this method implies for width-sliced devices (None: the run's `slicing`).
    slicing: str | None = None
    # "values": uploads are averaged as they are; "delta": the server averages each device's
    # change from the model it started from and steps with `server_update`.
    aggregates: str = "values"
    # Fixed index sets (HideNseek's mask): downloads use them instead of magnitude pruning, and
    # uploads arrive without indices (the codec's KNOWN kind), decoded with `upload_known_indices`.
    fixed_masks: dict[str, np.ndarray] | None = None
    download_dtype: str | None = None  # overrides the run's codec.download_dtype
    upload_known_indices: dict[str, np.ndarray] | None = None
    # False: the model is not width-sliced (fixed masks, FedDP's gates): every device runs it
    # whole, and a planner width below 1 is refused.
    width_sliceable: bool = True
    # True: an upload cannot move the model by more than the method allows (HideNseek's signs),
    # so the service's max_update_norm does not apply.
    bounded_updates: bool = False

    def __init__(self, spec: ModelSpec, settings: Settings | None = None, upload_dtype: str = "fp32",
                 seed: int = 0):
        """`settings`: the strategy's own section of the run configuration (None if it has none).
        A model the strategy cannot serve is refused here (`check_model`), before any set-up."""
        self.check_model(spec, settings)
        self.spec = spec
        self.settings = settings
        self.upload_dtype = upload_dtype
        self.seed = seed
        self.layers = layer_tensor_names(spec)

    @classmethod
    def check_model(cls, spec: ModelSpec, settings: Settings | None = None) -> None:
        """Raise SpecError saying why this strategy cannot serve `spec` with `settings`.

        Called by every constructor (so by `build_strategy`, at configuration), and callable
        without building the strategy: a run is refused with the reason before any round, not
        by a device's failing task or, worse, by a method that quietly degenerates into another
        (gates on a model with nothing to gate are FedAvg). Every model has at least one layer,
        so the base strategy serves any model."""

    @abstractmethod
    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        """The device's plan for this round."""

    def at_width(self, plan: SubmodelPlan, ratio: float) -> SubmodelPlan:
        """The plan for a device running the model at `ratio` of its width (default: unchanged;
        FjORD maps its dropout levels onto the device's own width)."""
        return plan

    def server_update(self, old: dict[str, np.ndarray], aggregated: dict[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
        """The new global state from the aggregate (a mean of values, or of deltas)."""
        return aggregated

    def initial_state(self) -> dict[str, np.ndarray] | None:
        """The global state to start from, when it is not the seeded network's weights."""
        return None

    def materialize(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The network weights a global state stands for (the state itself, but for HideNseek)."""
        return state

    def all_tensors(self) -> list[str]:
        return [name for layer in self.layers for name in layer]


class DownloadBuilder:
    """Encodes downloads for one round of one global model, reusing identical ones.

    Many devices share a download (all of them under FedAvg, one per layer group under FedP3's
    OPU-k), so encoding once per distinct plan keeps a 100-device round cheap.
    """

    def __init__(self, global_state: Mapping[str, np.ndarray], value_dtype: codec.ValueDtype,
                 fixed_masks: Mapping[str, np.ndarray] | None = None):
        self.global_state = global_state
        self.value_dtype = value_dtype
        self.fixed_masks = fixed_masks or {}
        self._masks: dict[tuple[str, float], np.ndarray] = {}
        self._payloads: dict[tuple, bytes] = {}

    def payload(self, plan: SubmodelPlan, device_has_private_copy: bool) -> bytes:
        sent = tuple((t.name, t.download_keep) for t in plan.tensors
                     if not (t.private and device_has_private_copy))
        if sent not in self._payloads:
            tensors = {name: self._tensor(name, keep) for name, keep in sent}
            self._payloads[sent] = codec.encode(tensors, self.value_dtype)
        return self._payloads[sent]

    def _tensor(self, name: str, keep: float) -> codec.SparseTensor:
        values = self.global_state[name]
        if name in self.fixed_masks:
            return codec.SparseTensor.from_dense(values, self.fixed_masks[name])
        if keep >= 1.0 or not is_prunable(values.shape):
            return codec.SparseTensor.from_dense(values)
        if (name, keep) not in self._masks:
            self._masks[(name, keep)] = magnitude_mask(values, keep)
        return codec.SparseTensor.from_dense(values, self._masks[(name, keep)])
