"""HideNseek on the device: train a sign supermask over frozen weights regenerated from a seed.

The weights never travel: both sides build the network from the shared `init_seed`. The server's
SynFlow mask (which weights exist) arrives as the index set of the first download; each round
the device receives the global signs of the kept weights, trains real-valued scores whose sign
multiplies the frozen weight (straight-through estimator: sign forward, identity backward), and
uploads the signs of its scores, one bit per kept weight, without indices (the server knows the
mask). The device keeps its own scores, so its personal mask is its trained signs.
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from . import codec
from .models import build_model
from .plan import SubmodelPlan
from .training import TrainReport, train_locally
from .settings import TrainSettings


class _SignedWeight(nn.Module):
    """weight = w0 x mask x sign(score), with the gradient passed straight through the sign."""

    def __init__(self, w0: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("w0", w0 * mask)

    def forward(self, score: torch.Tensor) -> torch.Tensor:
        sign = score + (torch.sign(score) - score).detach()
        return self.w0 * sign


def run_supermask_task(plan: SubmodelPlan, init_seed: int, received: dict[str, codec.SparseTensor],
                       scores: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                       train: TrainSettings, seed: int
                       ) -> tuple[dict[str, torch.Tensor], dict[str, codec.SparseTensor], TrainReport]:
    """Returns (effective personal weights, the sign upload, report); updates `scores` in place."""
    model = build_model(plan.spec, seed=init_seed)
    w0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    kept: dict[str, np.ndarray] = {}
    for name in plan.uploaded:
        tensor = received.get(name)
        if tensor is None:
            raise ValueError(f"supermask task sends no mask for {name!r}")
        # Every entry kept (SynFlow keeps small layers whole) travels as a dense tensor.
        kept[name] = tensor.indices if tensor.indices is not None else np.arange(w0[name].numel())
        mask = torch.zeros(w0[name].numel())
        mask[torch.from_numpy(kept[name])] = 1.0
        mask = mask.view_as(w0[name])
        global_sign = torch.zeros(w0[name].numel())
        global_sign[torch.from_numpy(kept[name])] = torch.from_numpy(np.sign(tensor.values))
        global_sign = global_sign.view_as(w0[name])
        # Small scores, so a few steps of gradient can flip a sign (the gradient is dL/dw x w0).
        magnitude = scores[name].abs() if name in scores else torch.full_like(w0[name], 1e-4)
        # Start from the global signs where the server has an opinion, keep personal magnitudes.
        start = torch.where(global_sign != 0, global_sign, torch.sign(scores.get(name, w0[name])))
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        with torch.no_grad():
            getattr(module, attr).copy_(start * magnitude)
        parametrize.register_parametrization(module, attr, _SignedWeight(w0[name], mask), unsafe=True)
        getattr(module.parametrizations, attr).original.requires_grad_(True)
    report = train_locally(model, x, y, train, {}, seed=seed)
    effective, upload = {}, {}
    for name in w0:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if name in kept:
            score = getattr(module.parametrizations, attr).original.detach().clone()
            scores[name] = score
            effective[name] = getattr(module, attr).detach().clone()
            signs = torch.sign(score).reshape(-1)[torch.from_numpy(kept[name])].numpy()
            signs[signs == 0] = 1.0
            upload[name] = codec.SparseTensor(tuple(w0[name].shape), kept[name], signs.astype(np.float32))
        else:
            effective[name] = w0[name]
    return effective, upload, report
