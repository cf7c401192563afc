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

A feature sees the built model and, as `self.spec`, the plan's model spec (what the model is: its
output layer, its channel groups), so it works on any registered network, not one layout.

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

    from .models.spec import ModelSpec


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

    def __init__(self, params: Settings, spec: "ModelSpec | None" = None):
        self.params = params
        self.spec = spec  # the plan's model; None where only the parameters are being checked

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


def build_features(requested: Mapping[str, Mapping[str, Any]],
                   spec: "ModelSpec | None" = None) -> list[PlanFeature]:
    """The plan's features for the model `spec`, validated; PlanFeatureError names what is wrong."""
    features = []
    for name, params in requested.items():
        cls = _FEATURES.get(name)
        if cls is None:
            raise PlanFeatureError(f"the plan asks for feature {name!r}, which this device's SDK does "
                                   f"not have (it has {', '.join(_FEATURES) or 'none'}); upgrade "
                                   "the device's fedprune or plan without it")
        try:
            features.append(cls(cls.params_model.model_validate(params), spec))
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
    """FjORD: before each batch, keep only the first ceil(p x C) channels of every layer but the
    output layer, p drawn from the levels.

    Any network: every convolution's and linear layer's output channels (the model's own, not
    FedDP's gates) and every normalisation's after them, so a dropped channel is zero downstream
    (a normalisation would otherwise turn a zeroed channel into its bias, and the next layer
    would read it); both sides of a residual add are cut at the same prefix."""

    def hooks(self, model: "nn.Module", rng: np.random.Generator) -> TrainingHooks:
        from torch import nn

        from .models.network import structure

        if self.spec is None:
            raise PlanFeatureError("ordered_dropout needs the plan's model spec to find the "
                                   "output layer; pass it to build_features")
        head = structure(self.spec.base).head
        levels = self.params.levels
        active = {"p": 1.0}
        norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm)
        handles = []
        for name, module in model.named_modules():
            if name == head or name.rsplit(".", 1)[-1] == "gate":
                continue
            if isinstance(module, nn.modules.conv._ConvNd):
                dim, units = 1, module.out_channels
            elif isinstance(module, nn.Linear):
                dim, units = -1, module.out_features
            elif isinstance(module, nn.GroupNorm):
                dim, units = 1, module.num_channels
            elif isinstance(module, norms):
                dim, units = 1, module.num_features
            else:
                continue

            def hook(module, inputs, output, units=units, dim=dim):
                keep = max(1, int(np.ceil(active["p"] * units)))
                if keep >= units:
                    return output
                mask = torch.zeros(units, dtype=output.dtype, device=output.device)
                mask[:keep] = 1
                shape = [1] * output.dim()
                shape[dim] = units
                return output * mask.view(shape)
            handles.append(module.register_forward_hook(hook))

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
    zero and stay zero for the rest of the task; zeroed entries are not uploaded. A convolution
    kernel is any weight of 3 or more dimensions (Conv1d, Conv2d, Conv3d)."""

    def hooks(self, model: "nn.Module", rng: np.random.Generator) -> TrainingHooks:
        threshold = self.params.threshold
        convs = {name: p for name, p in model.named_parameters() if p.dim() >= 3}

        def after_epoch(masks: dict[str, torch.Tensor]) -> None:
            for name, param in convs.items():
                keep = (param.detach().abs() > threshold).to(param.dtype)
                masks[name] = masks[name] * keep if name in masks else keep
        return TrainingHooks(after_epoch=after_epoch)

    def upload_mask(self, name: str, trained: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return mask & (trained != 0) if trained.ndim >= 3 else mask


class SupermaskParams(Settings):
    init_seed: int  # both sides build the frozen weights from it; they never travel


@register_plan_feature("supermask", SupermaskParams)
class Supermask(PlanFeature):
    """HideNseek: train sign scores over frozen weights (edge_sdk/supermask.py) instead of the
    weights themselves, and upload one sign bit per kept weight."""

    replaces_training = True
