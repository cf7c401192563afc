"""HideNseek (federated sign supermasks): prune at initialisation with SynFlow, then learn only signs.

Server side: SynFlow (Tanaka et al., 2020) scores |theta x dR/dtheta| with R the output of a
constant input through the network with absolute weights, linearised so that any network scores
(see `_INPUT_SCALE`); data-free, iterative with an exponential schedule (keep density^(k/n) after
iteration k of n), global scope over every weight matrix and kernel. The kept set is fixed for
the run; the initial weights come from a shared seed and never travel. The global state of a
prunable tensor is the aggregated sign of each kept weight (zero where pruned); devices train
sign scores (edge_sdk/supermask.py) and upload one bit per kept weight. The server combines
signs by majority vote (ties keep the old sign) or, with `aggregation = "mean"`, keeps the mean
sign as a soft value and sends it as fp16.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from edge_sdk.models import ModelSpec, SpecError, build_model, structure
from edge_sdk.plan import SubmodelPlan, TensorPlan
from edge_sdk.settings import Settings

from .base import Strategy
from .registry import register_strategy


class HideNseekSettings(Settings):
    density: float = Field(0.2, gt=0, le=1)
    synflow_iterations: int = Field(20, ge=1)
    aggregation: Literal["vote", "mean"] = "vote"


# SynFlow's score is the path norm R = 1^T (prod_l |W_l|) 1 of the network with absolute
# weights and linear activations: on a positive input a ReLU is the identity, but a saturating
# one is not (MobileNet's ReLU6 clips the growing signal at 6, a sigmoid flattens it), and
# normalisation divides the signal by its own statistics, which on the constant input zeroes it
# (Tanaka et al. score BatchNorm nets in eval mode, where fresh statistics make it the identity).
# So any network scores as its linearised self: normalisation and activation modules are
# bypassed, and for what a forward does functionally (F.relu6, a clamp) the signal is kept far
# below any threshold: biases are zero (R has none) and the all-ones input is scaled by
# _INPUT_SCALE, which scales every score alike in a linear network (float64 has the range).
_INPUT_SCALE = 1e-100
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
          nn.RMSNorm)


def _linearised(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or type(module).__module__ == nn.modules.activation.__name__


def _bypass(module: nn.Module, inputs: tuple, output):
    same = isinstance(output, torch.Tensor) and inputs and isinstance(inputs[0], torch.Tensor) \
        and inputs[0].shape == output.shape
    return inputs[0] if same else output


def synflow_masks(spec: ModelSpec, density: float, iterations: int, seed: int,
                  model: nn.Module | None = None) -> dict[str, np.ndarray]:
    """Kept entries per prunable weight tensor (dim >= 2), `density` of them overall.

    `model`: the seeded network (`build_model(spec, seed=seed)`), when the caller has it."""
    if not 0 < density <= 1:
        raise ValueError(f"hidenseek.density must be in (0, 1], got {density}")
    model = copy.deepcopy(model if model is not None else build_model(spec, seed=seed))
    model = model.double().eval()  # no dropout: the score is a function of the weights alone
    for module in model.modules():
        if _linearised(module):
            module.register_forward_hook(_bypass)
    prunable = {n: p for n, p in model.named_parameters() if p.dim() > 1}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rpartition(".")[2] == "bias":
                param.zero_()
            else:
                param.abs_()
    original = {n: p.detach().clone() for n, p in prunable.items()}
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable.items()}
    total = sum(p.numel() for p in prunable.values())
    ones = torch.full((1, *spec.input_shape), _INPUT_SCALE, dtype=torch.float64)
    for k in range(1, iterations + 1):
        with torch.no_grad():
            for name, param in prunable.items():
                param.copy_(original[name] * masks[name])
        model.zero_grad()
        model(ones).sum().backward()
        scores = {n: (p.grad * p).detach().abs() if p.grad is not None else torch.zeros_like(p)
                  for n, p in prunable.items()}
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        if not torch.isfinite(flat).all():
            raise SpecError(f"hidenseek cannot prune model {spec.name!r}: SynFlow's scores "
                            "are not finite (the network's output on a constant input with "
                            "absolute weights overflows); use another strategy")
        keep = max(1, int(round(density ** (k / iterations) * total)))
        threshold = torch.topk(flat, keep).values[-1]
        masks = {n: masks[n] & (scores[n] >= threshold) & (scores[n] > 0) for n in prunable}
    masks = {n: m.numpy() for n, m in masks.items()}
    unreached = [n for n, m in masks.items() if not m.any()]
    if unreached:
        raise SpecError(
            f"hidenseek cannot prune model {spec.name!r}: SynFlow scores every weight of "
            f"{', '.join(unreached[:6])}{' ...' if len(unreached) > 6 else ''} zero (no path "
            "from a constant input to the output goes through them: the forward cuts it, or "
            "saturates it), so the mask would cut them off; use another strategy")
    return masks


@register_strategy("hidenseek", settings=HideNseekSettings,
                   summary="HideNseek: SynFlow mask at initialisation, devices learn 1-bit signs")
class HideNseek(Strategy):
    settings: HideNseekSettings
    width_sliceable = False
    bounded_updates = True

    def __init__(self, spec: ModelSpec, settings: HideNseekSettings | None = None,
                 upload_dtype: str = "fp32", seed: int = 0):
        super().__init__(spec, settings or HideNseekSettings(), "sign1", seed)
        config = self.settings
        self.init_seed = seed
        model = build_model(spec, seed=seed)
        self.initial = {n: p.detach().numpy().copy() for n, p in model.state_dict().items()}
        self.masks = synflow_masks(spec, config.density, config.synflow_iterations, seed, model)
        self.fixed_masks = self.masks
        self.download_dtype = "sign1" if config.aggregation == "vote" else "fp16"
        self.upload_known_indices = {n: np.flatnonzero(m.reshape(-1)) for n, m in self.masks.items()}

    @classmethod
    def check_model(cls, spec: ModelSpec, settings: HideNseekSettings | None = None) -> None:
        """Signs are learnt over weight matrices and kernels; a model needs one at least. (A
        model SynFlow cannot score is refused when the mask is made, with SynFlow's reason.)"""
        if not any(len(shape) > 1 for _, shape in structure(spec.base).shapes):
            raise SpecError(f"hidenseek learns the signs of weight matrices and kernels, and model "
                            f"{spec.name!r} has none (every parameter is a vector); use another "
                            "strategy")

    def initial_state(self) -> dict[str, np.ndarray]:
        """Global state: +1 on every kept weight (the initial weights' own signs), 0 where pruned."""
        state = {n: v.copy() for n, v in self.initial.items()}
        for name, mask in self.masks.items():
            state[name] = mask.astype(np.float32)
        return state

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        return SubmodelPlan(device_index, round_number, self.spec,
                            tuple(TensorPlan(n) for n in self.masks),
                            aggregation_weight=1.0, upload_dtype="sign1",
                            features={"supermask": {"init_seed": self.init_seed}})

    def server_update(self, old, aggregated):
        if self.settings.aggregation == "mean":
            return aggregated
        new = dict(aggregated)
        for name in self.masks:
            vote = np.sign(aggregated[name])
            new[name] = np.where(vote == 0, old[name], vote).astype(old[name].dtype)
        return new

    def materialize(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The network the global state stands for: initial weights x mask x sign."""
        weights = dict(state)
        for name in self.masks:
            weights[name] = (self.initial[name] * np.sign(state[name])).astype(np.float32)
        return weights
