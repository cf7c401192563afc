"""What a model costs per sample: parameters, activations and multiply-accumulates.

Measured on the built network with forward hooks rather than derived from the spec by formula, so
it follows the builder exactly. The planner sizes memory from it and the exporter reports FLOPs
from it; both sides import it from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .network import build_model
from .spec import ModelSpec


@dataclass(frozen=True)
class ModelFootprint:
    parameters: int
    activation_elements: int   # per sample, summed over every layer's output
    input_elements: int        # per sample
    macs: int                  # multiply-accumulates per sample, forward


@lru_cache(maxsize=256)
def footprint(spec: ModelSpec) -> ModelFootprint:
    """Dense cost: a zero weight still costs a multiply in the runtimes we export to."""
    model = build_model(spec)
    elements = 0
    macs = 0

    def hook(module, inputs, output):
        nonlocal elements, macs
        elements += output[0].numel()
        if isinstance(module, torch.nn.Conv2d):
            macs += output[0].numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, torch.nn.Linear):
            macs += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if len(list(m.children())) == 0]
    with torch.no_grad():
        model(torch.zeros(1, *spec.input_shape))
    for handle in handles:
        handle.remove()
    return ModelFootprint(sum(p.numel() for p in model.parameters()), elements,
                          math.prod(spec.input_shape), macs)
