"""Submodel plans: what one device does with each tensor of the model in one round.

A plan is the contract between the coordinator's strategy and the device's trainer. It says per
tensor whether the device trains it, uploads it, or keeps its own copy (private), and how the
tensor is pruned on the way down (`download_keep`, realised by the sparse download itself) and
during local training (`local_keep`, a magnitude mask the device computes). Aggregation works in
the global model's flat index space, so later width-sliced submodels only add an index map here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .models.spec import ModelSpec
from .plan_features import build_features


@dataclass(frozen=True)
class TensorPlan:
    name: str
    train: bool = True
    upload: bool = True
    private: bool = False
    download_keep: float = 1.0
    local_keep: float = 1.0

    def __post_init__(self) -> None:
        for label, ratio in (("download_keep", self.download_keep), ("local_keep", self.local_keep)):
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"tensor {self.name}: {label} must be in (0, 1], got {ratio}")
        if self.upload and not self.train:
            raise ValueError(f"tensor {self.name}: uploading a tensor the device does not train "
                             "sends nothing new; set train=True or upload=False")


@dataclass(frozen=True)
class TrainPhase:
    """One stage of local training: only `tensors` train, for `epochs` passes over the data.

    FedRep trains the private head first with the body frozen, then the body; FFGG fine-tunes
    the private part at the current global parameters before computing the global part's update.
    A plan without phases trains every tensor marked `train` for the configured local epochs.
    """

    tensors: tuple[str, ...]
    epochs: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"a training phase needs at least one epoch, got {self.epochs}")


@dataclass(frozen=True)
class SubmodelPlan:
    device_index: int
    round: int
    spec: ModelSpec
    tensors: tuple[TensorPlan, ...]
    aggregation_weight: float = 1.0
    upload_dtype: str = "fp32"
    selected_layers: tuple[int, ...] = field(default_factory=tuple)
    phases: tuple[TrainPhase, ...] = ()
    # Device-side behaviours by name, with their parameters (edge_sdk/plan_features.py): FjORD's
    # "ordered_dropout", FedDP's "threshold_pruning", HideNseek's "supermask".
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The device's sizing (its planner decision): of each uploaded weight or kernel, send only
    # the `upload_keep` share of entries that changed most (biases and norms always whole); train
    # on at most `local_samples` samples this round (None: all the device holds).
    upload_keep: float = 1.0
    local_samples: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.upload_keep <= 1.0:
            raise ValueError(f"upload_keep must be in (0, 1], got {self.upload_keep}")
        if self.local_samples is not None and self.local_samples < 1:
            raise ValueError(f"local_samples must be at least 1, got {self.local_samples}")
        build_features(self.features)  # refuses an unknown feature or invalid parameters
        if self.upload_dtype not in ("fp32", "fp16", "sign1"):
            raise ValueError(f"upload_dtype must be fp32, fp16 or sign1, got {self.upload_dtype!r}")

    def tensor(self, name: str) -> TensorPlan:
        for entry in self.tensors:
            if entry.name == name:
                return entry
        raise KeyError(f"plan for client {self.device_index} has no tensor {name!r}")

    @property
    def uploaded(self) -> list[str]:
        return [t.name for t in self.tensors if t.upload]

    @property
    def trained(self) -> list[str]:
        return [t.name for t in self.tensors if t.train]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubmodelPlan:
        return cls(
            device_index=int(data["device_index"]),
            round=int(data["round"]),
            spec=ModelSpec.from_dict(data["spec"]),
            tensors=tuple(TensorPlan(**t) for t in data["tensors"]),
            aggregation_weight=float(data.get("aggregation_weight", 1.0)),
            upload_dtype=str(data.get("upload_dtype", "fp32")),
            selected_layers=tuple(data.get("selected_layers", ())),
            phases=tuple(TrainPhase(tuple(p["tensors"]), int(p["epochs"]))
                         for p in data.get("phases", ())),
            features=_features(data.get("features", {})),
            upload_keep=float(data.get("upload_keep", 1.0)),
            local_samples=None if data.get("local_samples") is None else int(data["local_samples"]),
        )


def _features(raw: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict) or not all(isinstance(params, dict) for params in raw.values()):
        raise ValueError("plan.features must map each feature name to an object of its parameters")
    return {str(name): dict(params) for name, params in raw.items()}
