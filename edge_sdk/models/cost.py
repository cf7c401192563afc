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


@lru_cache(maxsize=256)
def inference_macs(spec: ModelSpec) -> int:
    """MACs per sample a runtime that skips gated-off channels would do (FedDP's gates).

    A gated conv computes only its kept output channels, and the layer after it reads only those
    input channels; the gate's own small FC is added. Without gates this equals `footprint().macs`.
    """
    model = build_model(spec)
    per_layer: list[tuple[int, int]] = []  # (macs of the layer's conv/linear, gate macs)

    def hook(module, inputs, output):
        macs = 0
        for sub in module.modules():
            if isinstance(sub, torch.nn.Conv2d):
                macs += sub.out_channels * math.prod(sub.kernel_size) * sub.in_channels // sub.groups \
                    * output.shape[-1] * output.shape[-2] * (1 if getattr(module, "pool", None) is None
                                                             else module.pool.kernel_size ** 2)
            elif isinstance(sub, torch.nn.Linear) and sub is not getattr(module, "gate", None):
                macs += sub.in_features * sub.out_features
        gate = getattr(module, "gate", None)
        per_layer.append((macs, gate.in_features * gate.out_features if gate is not None else 0))

    handles = [layer.register_forward_hook(hook) for layer in model.layers]
    with torch.no_grad():
        model(torch.zeros(1, *spec.input_shape))
    for handle in handles:
        handle.remove()
    total, keep_in = 0, 1.0
    for layer, (macs, gate_macs) in zip(spec.layers, per_layer):
        keep_out = layer.gate if layer.kind == "conv" else 1.0
        total += int(macs * keep_in * keep_out) + gate_macs
        keep_in = keep_out if layer.kind in ("conv", "fc") else keep_in
    return total
