"""The round pipeline: the one place that turns (strategy, global state, a device's plan) into
the task that device is sent, and the one intake that turns its answer into an update over the
global model.

`fedprune simulate` and the coordinator service both drive a `RoundPipeline` per round; neither
builds a task, slices a model or decodes an update on its own, so what the planner decided for
a device (its width and channel selection, physical batch, local samples, download precision and
keep ratio, upload precision and keep ratio) is what the device receives in either, and the
model exported for it is sliced exactly as the model it trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_sdk import codec
from edge_sdk.sizing import DevicePlan
from edge_sdk.models import ModelSpec, build_model, tensor_shapes
from edge_sdk.plan import SubmodelPlan, TensorPlan
from edge_sdk.pruning import is_prunable
from edge_sdk.settings import DPSettings, TrainSettings

from .planning.planner import PlannerSettings
from .slicing import extract, to_global, width_slice
from .strategies import DownloadBuilder, Strategy


class UpdateRefused(ValueError):
    """An update the coordinator will not aggregate; the text, sent back in the ACK, says why."""


def dp_config(config: Any) -> DPSettings | None:
    """The run's DP-SGD settings, or None when the run trains without DP."""
    return config.dp if config.dp.enabled else None


def planner_settings(config: Any, strategy: Strategy, deadline_seconds: float) -> PlannerSettings:
    """What the planner sizes devices within, from the run's settings: its batch, epochs and DP,
    the strategy's slicing, the run's precisions as floors, and the strategy's own download keep
    on the weights a device does not upload as the ceiling of the device's (FedP3's
    `global_keep`)."""
    shapes = tensor_shapes(strategy.spec)
    keeps = [t.download_keep for t in strategy.plan(0, 1, 1).tensors
             if pruned_on_download(t, shapes[t.name])]
    return PlannerSettings(deadline_seconds=deadline_seconds, batch_size=config.train.batch_size,
                           local_epochs=config.train.local_epochs, dp=config.dp.enabled,
                           momentum=config.train.momentum, optimizer=config.train.optimizer,
                           slicing=strategy.slicing or config.slicing,
                           max_download_keep=min(keeps, default=1.0),
                           download_dtype=strategy.download_dtype or config.codec.download_dtype,
                           upload_dtype=config.codec.upload_dtype)


def device_key(device_id: str) -> int:
    """A service device's index for the round pipeline (FedP3's layer group, a width level), from
    its id: devices register in any order (the demo's in a race), and the
    plan a device gets must not depend on who connected first. A simulation's devices are
    their ordinals instead; both feed the same pipeline."""
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:4], "big")


def device_settings(settings: PlannerSettings, strategy: Strategy, device_index: int,
                    num_samples: int) -> PlannerSettings:
    """The run's planner settings for one device: its samples, and the transfer layout of its own
    plan (which tensors it uploads decides where the download and upload keep ratios apply)."""
    uploaded = frozenset(strategy.plan(device_index, 1, num_samples).uploaded)
    return dataclasses.replace(settings, local_samples=num_samples, uploaded=uploaded)


def pruned_on_download(tensor: TensorPlan, shape: tuple[int, ...]) -> bool:
    """Whether the device's download keep applies to this tensor: a weight or kernel it does not
    upload and does not keep privately (FedP3's Q_i; biases and norms always go whole)."""
    return not tensor.upload and not tensor.private and is_prunable(shape)


def _finer(a: str, b: str) -> str:
    """The lower of two precisions: a run configured for fp16 is never sent fp32, nor a device
    planned for fp16."""
    return "fp16" if "fp16" in (a, b) else a


@dataclass(frozen=True)
class Task:
    """What one device is sent for one round, and what its answer is checked against."""

    device_index: int
    plan: SubmodelPlan           # per tensor, at the device's width; upload precision and keep
    train: TrainSettings           # with the device's physical batch
    width_ratio: float
    slicing: str
    download_dtype: str
    download_keep: float         # the device's keep on the weights it does not upload

    def sizing(self) -> dict[str, Any]:
        """The device's sizing as this task carries it (for logs, results and status)."""
        return {"width_ratio": self.width_ratio, "slicing": self.slicing,
                "physical_batch_size": self.train.physical_batch_size,
                "local_samples": self.plan.local_samples,
                "download_dtype": self.download_dtype, "download_keep": self.download_keep,
                "upload_dtype": self.plan.upload_dtype, "upload_keep": self.plan.upload_keep}


@dataclass
class SubmodelView:
    """The global model at one width: its spec, its dense sliced state and the index map back."""

    spec: ModelSpec
    shapes: dict[str, tuple[int, ...]]
    state: Mapping[str, np.ndarray]
    smap: Mapping[str, np.ndarray] | None  # None: the full model, global indices as they are
    ratio: float
    fixed_masks: Mapping[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self._downloads: dict[str, DownloadBuilder] = {}

    def downloads(self, dtype: str) -> DownloadBuilder:
        if dtype not in self._downloads:
            self._downloads[dtype] = DownloadBuilder(self.state, codec.ValueDtype.from_name(dtype),
                                                     self.fixed_masks)
        return self._downloads[dtype]


    def to_global(self, update: dict[str, codec.SparseTensor]) -> dict[str, codec.SparseTensor]:
        return update if self.smap is None else to_global(update, self.smap)


class RoundPipeline:
    """One round of one global model: every task it sends, every update it takes back."""

    def __init__(self, strategy: Strategy, settings: Any, global_state: Mapping[str, np.ndarray],
                 round_number: int, train: TrainSettings, slicing_round: int | None = None):
        """`settings`: the run's LearningSettings. `slicing_round`: the round whose channel
        window the submodels use (FedRolex rolls it); by default this round (an asynchronous
        device that starts from an older model uses that model's round)."""
        self.strategy, self.settings, self.global_state = strategy, settings, global_state
        self.round_number, self.train = round_number, train
        self.slicing = strategy.slicing or settings.slicing
        self.download_dtype = strategy.download_dtype or settings.codec.download_dtype
        self.slicing_round = round_number if slicing_round is None else slicing_round
        self._views: dict[float, SubmodelView] = {}

    # --- widths ---------------------------------------------------------------------------
    def width_for(self, device_index: int, sizing: DevicePlan | None) -> float:
        """The planner's width for a planned device, else the run's `width_levels` tier."""
        if sizing is not None:
            return sizing.width_ratio
        levels = self.settings.width_levels
        return levels[device_index % len(levels)] if levels else 1.0

    def view(self, ratio: float) -> SubmodelView:
        if ratio not in self._views:
            spec = self.strategy.spec
            if ratio < 1.0 and not self.strategy.width_sliceable:
                raise ValueError(f"{self.strategy.name} runs at full width only (FedDP gates and "
                                 "HideNseek masks are not width-sliced); plan it without widths")
            if ratio >= 1.0:
                self._views[ratio] = SubmodelView(spec, tensor_shapes(spec), self.global_state,
                                                  None, 1.0, self.strategy.fixed_masks)
            else:
                cut = width_slice(spec, self.global_state, ratio, self.slicing, self.slicing_round)
                self._views[ratio] = SubmodelView(cut.spec, tensor_shapes(cut.spec), cut.state,
                                                  cut.smap, ratio)
        return self._views[ratio]

    # --- tasks ----------------------------------------------------------------------------
    def task(self, device_index: int, num_samples: int, sizing: DevicePlan | None = None) -> Task:
        """The device's task: the strategy's plan at the device's width, with its sizing applied.

        `num_samples`: what the device holds; with a sizing it trains at most the planned local
        samples, and strategies that weight by samples weight it by those.
        """
        ratio = self.width_for(device_index, sizing)
        view = self.view(ratio)
        trained = num_samples if sizing is None else max(1, min(num_samples, sizing.local_samples))
        plan = self.strategy.at_width(self.strategy.plan(device_index, self.round_number, trained), ratio)
        plan = dataclasses.replace(plan, spec=view.spec)
        train, download_dtype, download_keep = self.train, self.download_dtype, 1.0
        if sizing is not None:
            train = train.model_copy(update={"physical_batch_size": sizing.physical_batch_size})
            download_dtype = _finer(download_dtype, sizing.download_dtype)
            download_keep = sizing.download_keep
            if self.strategy.upload_known_indices is None:  # sign uploads at fixed indices: no keep
                plan = self._sized(plan, view, sizing, trained)
        return Task(device_index, plan, train, ratio, self.slicing, download_dtype, download_keep)

    @staticmethod
    def _sized(plan: SubmodelPlan, view: SubmodelView, sizing: DevicePlan,
               trained: int) -> SubmodelPlan:
        """FedP3's Q_i chosen per device: the device's download keep on the weights it does not
        upload (the strategy's own keep, e.g. `fedp3.global_keep`, is an upper bound; private
        tensors and biases are exempt); its upload precision and keep; its local samples."""
        tensors = tuple(
            dataclasses.replace(t, download_keep=min(t.download_keep, sizing.download_keep))
            if pruned_on_download(t, view.shapes[t.name]) else t
            for t in plan.tensors)
        return dataclasses.replace(plan, tensors=tensors,
                                   upload_dtype=_finer(plan.upload_dtype, sizing.upload_dtype),
                                   upload_keep=sizing.upload_keep, local_samples=trained)

    def download(self, task: Task, device_has_private_copy: bool) -> bytes:
        return self.view(task.width_ratio).downloads(task.download_dtype).payload(
            task.plan, device_has_private_copy)

    # --- updates --------------------------------------------------------------------------
    def intake(self, task: Task, payload: bytes) -> dict[str, codec.SparseTensor]:
        """The device's answer decoded once, against exactly the tensors its plan uploads (and no
        more bytes than they can take), checked, and mapped to global flat indices."""
        view = self.view(task.width_ratio)
        shapes = {name: view.shapes[name] for name in task.plan.uploaded}
        limit = codec.decoding_memory_limit(shapes, codec.ValueDtype.from_name(task.plan.upload_dtype))
        update = codec.decode(payload, expected_shapes=shapes, max_decoded_bytes=limit,
                              known_indices=self.strategy.upload_known_indices)
        if set(update) != set(task.plan.uploaded):
            raise UpdateRefused(f"update carries {sorted(update)}, the plan asked for "
                                f"{sorted(task.plan.uploaded)}")
        return view.to_global(update)

    # --- the model a device runs ----------------------------------------------------------
    def model_at(self, ratio: float) -> nn.Module:
        """The global model at `ratio`, sliced with the same channels as that width's tasks (the
        artifact a device is sent is the model it trains)."""
        view = self.view(ratio)
        weights = self.strategy.materialize(dict(self.global_state))
        state = weights if view.smap is None else extract(weights, view.smap)
        model = build_model(view.spec)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        return model.eval()
