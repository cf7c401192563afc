"""FedDP's per-sample channel gates on any network, attached with forward hooks.

Every convolution (but grouped ones and the output layer) gets a small `gate` Linear reading its
input's global average; per sample, the top `ratio` share of output channels survive, scaled by
their saliency, and the rest are zero (FBS, the FedDP paper's dynamic variant). The gate is a
child of the convolution (`<conv>.gate.weight`), so it belongs to the convolution's layer, and
Opacus clips its per-sample gradients like any Linear's.
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
            cutoff = saliency.topk(keep, dim=1).values[:, -1:]
            return output * (saliency * (saliency >= cutoff))[:, :, None, None]

        conv.register_forward_hook(forward)
    return model


@lru_cache(maxsize=64)
def _gates(spec: ModelSpec) -> tuple[str, ...]:
    from .network import meta_model, structure

    return tuple(name for name, _ in gated_convs(meta_model(spec), structure(spec.base).head))


def gate_tensor_names(spec: ModelSpec, layer: tuple[str, ...]) -> tuple[str, ...]:
    """The gate tensors of the convolutions among `layer`'s tensors."""
    return tuple(f"{conv}.gate.{p}" for conv in _gates(spec.base)
                 if f"{conv}.weight" in layer for p in ("weight", "bias"))
