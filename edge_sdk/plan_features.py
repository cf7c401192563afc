"""Device-side behaviours a strategy asks for by name in its plan (`SubmodelPlan.features`).

A strategy that needs the device to train differently (FjORD's ordered dropout, FedDP's
threshold pruning, HideNseek's supermask) names a feature and its parameters; the device looks
the name up here. So `LocalClient.run_task` has no branch per method, and a new device-side
behaviour is one registered class:

    class MyParams(Settings):
        strength: float = Field(gt=0)

    @register_plan_feature("mine", MyParams)
    class Mine(PlanFeature):
        def hooks(self, model, rng): return TrainingHooks(before_batch=...)

A plan naming a feature this SDK does not have, or parameters that do not validate, is refused
with `PlanFeatureError` (the device answers `bad_task` with the reason).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from pydantic import Field, ValidationError

from .settings import Settings, WidthLevels
from .validation import describe

if TYPE_CHECKING:
    from torch import nn


class PlanFeatureError(ValueError):
    """A plan's feature that this device cannot run: unknown name or invalid parameters."""


@dataclass
class TrainingHooks:
    """Calls into local training: before every batch, after every epoch (with the pruning masks,
    which it may extend), and once training is over (to undo what the feature installed)."""

    before_batch: Callable[[], None] | None = None
    after_epoch: Callable[[dict[str, torch.Tensor]], None] | None = None
    remove: Callable[[], None] = lambda: None


class PlanFeature:
    name: ClassVar[str]
    params_model: ClassVar[type[Settings]]
    # True: the feature runs the whole task itself (`run`), instead of weight training with hooks.
    replaces_training: ClassVar[bool] = False

    def __init__(self, params: Settings):
        self.params = params

    def hooks(self, model: "nn.Module", rng: np.random.Generator) -> TrainingHooks:
        return TrainingHooks()

    def upload_mask(self, name: str, trained: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Which trained entries of tensor `name` to send (default: all the mask holds)."""
        return mask


_FEATURES: dict[str, type[PlanFeature]] = {}


def register_plan_feature(name: str, params: type[Settings]):
    def register(cls: type[PlanFeature]) -> type[PlanFeature]:
        cls.name, cls.params_model = name, params
        _FEATURES[name] = cls
        return cls
    return register


def plan_feature_names() -> tuple[str, ...]:
    return tuple(_FEATURES)


def build_features(requested: Mapping[str, Mapping[str, Any]]) -> list[PlanFeature]:
    """The plan's features, validated; PlanFeatureError names what is wrong."""
    features = []
    for name, params in requested.items():
        cls = _FEATURES.get(name)
        if cls is None:
            raise PlanFeatureError(f"the plan asks for feature {name!r}, which this device's SDK does "
                                   f"not have (it has {', '.join(_FEATURES) or 'none'}); upgrade "
                                   "the device's fedprune or plan without it")
        try:
            features.append(cls(cls.params_model.model_validate(params)))
        except ValidationError as exc:
            raise PlanFeatureError(f"plan feature {name!r}: {describe(exc, name)}") from None
    if sum(f.replaces_training for f in features) > 1:
        raise PlanFeatureError("a plan can name one feature that replaces training, not several")
    return features


class OrderedDropoutParams(Settings):
    # Widths to sample per batch, as fractions of the device's own submodel (the coordinator
    # maps the strategy's levels of the full model onto the device's width).
    levels: WidthLevels


@register_plan_feature("ordered_dropout", OrderedDropoutParams)
class OrderedDropout(PlanFeature):
    """FjORD: before each batch, keep only the first ceil(p x C) units of every hidden layer, p
    drawn from the levels."""

    def hooks(self, model: "nn.Module", rng: np.random.Generator) -> TrainingHooks:
        levels = self.params.levels
        active = {"p": 1.0}
        handles = []
        for layer in list(model.layers[:-1]):
            inner = getattr(layer, "conv", None) or getattr(layer, "linear", None)
            if inner is None:
                continue
            units = inner.out_channels if isinstance(inner, torch.nn.Conv2d) else inner.out_features

            def hook(module, inputs, output, units=units):
                keep = max(1, int(np.ceil(active["p"] * units)))
                if keep >= units:
                    return output
                mask = torch.zeros(units, dtype=output.dtype)
                mask[:keep] = 1
                return output * mask.view(1, -1, *([1] * (output.dim() - 2)))
            handles.append(layer.register_forward_hook(hook))

        def before_batch() -> None:
            active["p"] = float(rng.choice(levels))

        def remove() -> None:
            for handle in handles:
                handle.remove()
        return TrainingHooks(before_batch=before_batch, remove=remove)


class ThresholdPruningParams(Settings):
    threshold: float = Field(gt=0)


@register_plan_feature("threshold_pruning", ThresholdPruningParams)
class ThresholdPruning(PlanFeature):
    """FedDP (released code): after each local epoch, conv weights with |w| <= threshold become
    zero and stay zero for the rest of the task; zeroed entries are not uploaded."""

    def hooks(self, model: "nn.Module", rng: np.random.Generator) -> TrainingHooks:
        threshold = self.params.threshold
        convs = {name: p for name, p in model.named_parameters() if p.dim() == 4}

        def after_epoch(masks: dict[str, torch.Tensor]) -> None:
            for name, param in convs.items():
                keep = (param.detach().abs() > threshold).to(param.dtype)
                masks[name] = masks[name] * keep if name in masks else keep
        return TrainingHooks(after_epoch=after_epoch)

    def upload_mask(self, name: str, trained: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return mask & (trained != 0) if trained.ndim == 4 else mask


class SupermaskParams(Settings):
    init_seed: int  # both sides build the frozen weights from it; they never travel


@register_plan_feature("supermask", SupermaskParams)
class Supermask(PlanFeature):
    """HideNseek: train sign scores over frozen weights (edge_sdk/supermask.py) instead of the
    weights themselves, and upload one sign bit per kept weight."""

    replaces_training = True
