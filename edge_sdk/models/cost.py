"""What a model costs per sample: parameters, activations and multiply-accumulates.

Counted by PyTorch itself on the network `build_model` would make, rather than by formulas per
layer kind: `torch.utils.flop_counter.FlopCounterMode` knows every operator's cost (1-D, 2-D and
3-D, grouped and depthwise convolutions, matrix products in any module), so a user's model is
priced like a built-in one. The network is built on the `meta` device: shapes only, no memory
and no arithmetic, so pricing ResNet-18 costs what tracing it costs. The planner sizes memory and
time from it and the exporter reports FLOPs from it; both sides import it from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import gates, width
from .network import check_structure, meta_model
from .spec import ModelSpec


@dataclass(frozen=True)
class ModelFootprint:
    parameters: int
    activation_elements: int   # per sample, summed over every leaf module's output
    input_elements: int        # per sample
    macs: int                  # multiply-accumulates per sample, forward


def _meta_network(spec: ModelSpec) -> nn.Module:
    """The network `build_model(spec)` returns, on the meta device (structure checked alike)."""
    check_structure(spec)
    model = meta_model(spec)
    if spec.keep:
        width.prune(model, spec)
    if spec.gate < 1.0:
        with torch.device("meta"):
            gates.attach(model, spec.gate, check_structure(spec).head)
    return model.eval()


def _macs(model: nn.Module, spec: ModelSpec) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *spec.input_shape, device="meta"))
    return counter.get_total_flops() // 2  # a multiply-accumulate is two floating-point operations


@lru_cache(maxsize=256)
def footprint(spec: ModelSpec) -> ModelFootprint:
    """Dense cost: a zero weight still costs a multiply in the runtimes we export to. With FedDP's
    gates, every channel is computed and the gates' own layers are added."""
    model = _meta_network(spec)
    elements = 0

    def hook(module, inputs, output):
        nonlocal elements
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        elements += sum(t.numel() for t in outputs if isinstance(t, torch.Tensor))

    # Leaf modules (a gated convolution counts as one: its gate is priced as a leaf of its own).
    leaves = [m for m in model.modules() if all(n == "gate" for n, _ in m.named_children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        macs = _macs(model, spec)  # batch of one: the counts are per sample
    finally:
        for handle in handles:
            handle.remove()
    return ModelFootprint(sum(p.numel() for p in model.parameters()), elements,
                          math.prod(spec.input_shape), macs)


@lru_cache(maxsize=256)
def inference_macs(spec: ModelSpec) -> int:
    """MACs per sample a runtime that skips gated-off channels would do (FedDP's gates).

    A gated convolution computes only the `ceil(gate x C)` channels its gate keeps, and whatever
    reads them (the next convolution or linear layer, a depthwise convolution, the other side of
    a residual add) reads only those. So the cost is that of the network with each gated channel
    group narrowed to that many channels (a width-pruned spec, priced like any other), plus the
    gates' own layers. A group an ungated layer also writes (a linear layer's output added to a
    convolution's) is counted whole. Without gates this is `footprint(spec).macs`.
    """
    if spec.gate >= 1.0:
        return footprint(spec).macs
    dense = dataclasses.replace(spec, gate=1.0)
    head = check_structure(spec).head
    gated = {name for name, _ in gates.gated_convs(_meta_network(dense), head)}
    full = meta_model(spec)
    names = {module: name for name, module in full.named_modules()}
    kept = dict(spec.keep)
    narrowed = []
    for key, group in width.channel_groups(full, spec.base).items():
        units = kept.get(key, tuple(range(len(group[0].idxs))))
        writers = {names[item.dep.target.module] for item in group
                   if _writes_channels(item.dep.target.module, item.dep.handler)}
        if writers and writers <= gated:
            units = units[:math.ceil(spec.gate * len(units))]  # what gates.attach keeps
        narrowed.append((key, units))
    gate_macs = footprint(spec).macs - footprint(dense).macs
    return footprint(dataclasses.replace(dense, keep=tuple(sorted(narrowed)))).macs + gate_macs


def _writes_channels(module: nn.Module, handler) -> bool:
    """Whether `module` computes the group's channels (a depthwise convolution only follows them)."""
    if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) \
            or getattr(handler, "__name__", "") != "prune_out_channels":
        return False
    depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 \
        and module.groups == module.in_channels
    return not depthwise
