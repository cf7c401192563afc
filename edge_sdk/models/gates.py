"""FedDP's per-sample channel gates on any network, attached with forward hooks.

Every convolution (but grouped ones and the output layer) gets a small `gate` Linear reading its
input's global average; per sample, the top `ratio` share of output channels survive, scaled by
their saliency, and the rest are zero (FBS, the FedDP paper's dynamic variant). The gate is a
child of the convolution (`<conv>.gate.weight`), so it belongs to the convolution's layer, and
Opacus clips its per-sample gradients like any Linear's.

The mask is a constant of the forward pass: gradients reach the gate and the convolution only
through the kept channels (the paper's "only salient parameters' gradients are kept"). It is
exactly k channels on ties too (the lower channel index wins), so every runtime keeps the same
channels of the same saliencies. An exported model counts instead of sorting: a sort lowers to
STABLEHLO_SORT, which the TFLite converter and runtime refuse.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from .spec import ModelSpec


def gated_convs(model: nn.Module, head: str) -> list[tuple[str, nn.Conv2d]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.out_channels > 1 and name != head]


def attach(model: nn.Module, ratio: float, head: str) -> nn.Module:
    for _, conv in gated_convs(model, head):
        keep = math.ceil(ratio * conv.out_channels)
        conv.gate = nn.Linear(conv.in_channels, conv.out_channels)
        nn.init.constant_(conv.gate.bias, 1.0)

        def forward(module, inputs, output, keep=keep):
            saliency = torch.relu(module.gate(inputs[0].mean(dim=(2, 3))))
            return output * (saliency * top_k_mask(saliency, keep))[:, :, None, None]

        conv.register_forward_hook(forward)
    return model


def top_k_mask(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of `saliency` (N, C), True for exactly `k` channels: the largest, ties to the lower
    index. A stable sort while torch runs it; counting, the same channels, while it is exported."""
    if torch.compiler.is_exporting():
        return _counted_top_k(saliency, k)
    chosen = saliency.argsort(dim=1, descending=True, stable=True)[:, :k]
    return torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, chosen, True)


def _counted_top_k(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """A channel is kept when fewer than k channels beat it (are larger, or tie from a lower
    index): comparisons and a sum, which ONNX and TFLite have builtins for. It costs N x C x C
    comparisons, a hundred times the sort's time at C = 1280, so training keeps the sort."""
    index = torch.arange(saliency.shape[1], device=saliency.device)
    other, this = saliency[:, None, :], saliency[:, :, None]  # [n, j, i]: channel i against j
    beats = (other > this) | ((other == this) & (index[None, :] < index[:, None]))
    return beats.sum(2) < k


@lru_cache(maxsize=64)
def _gates(spec: ModelSpec) -> tuple[str, ...]:
    from .network import meta_model, structure

    return tuple(name for name, _ in gated_convs(meta_model(spec), structure(spec.base).head))


def gate_tensor_names(spec: ModelSpec, layer: tuple[str, ...]) -> tuple[str, ...]:
    """The gate tensors of the convolutions among `layer`'s tensors."""
    return tuple(f"{conv}.gate.{p}" for conv in _gates(spec.base)
                 if f"{conv}.weight" in layer for p in ("weight", "bias"))
