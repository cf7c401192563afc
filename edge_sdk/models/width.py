"""Width pruning of any network, from its dependency graph (Torch-Pruning).

Channels that must stay aligned (a residual add's two inputs, a concatenation's parts, a depthwise
convolution and the layer feeding it, a normalisation and its convolution) form one *channel
group*; Torch-Pruning's `DependencyGraph` finds them, and a group is kept or dropped together.
A submodel is the channels kept per group (`ModelSpec.keep`), named by the group's root module;
the output layer is never pruned, nor is the model's input.

Both sides run this same code: the device prunes the meta-built full model to what it was told
to keep (`prune`), and the coordinator, to move values between the submodel and the full model,
prunes a copy whose every entry holds its own flat position (`index_map`): whatever Torch-Pruning
keeps of a tensor then says where each kept entry lives in the full one.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from .network import _factory_build, meta_model, structure
from .spec import Keep, ModelSpec, SpecError

_ROOTS = (nn.modules.conv._ConvNd, nn.Linear)


def _graph(model: nn.Module, spec: ModelSpec) -> tp.DependencyGraph:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    example = torch.zeros(1, *spec.input_shape, device=device, dtype=dtype)
    with torch.enable_grad():  # Torch-Pruning traces through autograd; a caller may be in no_grad
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example, unwrapped_parameters=_declared_dims(model, spec))


def _declared_dims(model: nn.Module, spec: ModelSpec) -> list:
    """Bare parameters (not a convolution's, linear's or normalisation's: a positional embedding,
    a scale) have no known channel dimension; Torch-Pruning takes their last non-singleton one.
    A model whose channels lie elsewhere (an NCHW embedding of shape (1, C, H, W)) names the
    dimension in `fedprune_channel_dims`, {parameter name: dimension}."""
    declared = getattr(model, "fedprune_channel_dims", None) or {}
    params = dict(model.named_parameters())
    if not isinstance(declared, dict):
        raise SpecError(f"model {spec.name!r}: fedprune_channel_dims must be a dict of parameter "
                        f"name to dimension, got {type(declared).__name__}")
    dims = []
    for name, dim in declared.items():
        param = params.get(name)
        if param is None or isinstance(dim, bool) or not isinstance(dim, int) \
                or not -param.dim() <= dim < param.dim():
            raise SpecError(f"model {spec.name!r}: fedprune_channel_dims[{name!r}] = {dim!r} is "
                            f"not a dimension of one of its parameters ("
                            + (f"{name} has shape {tuple(param.shape)}" if param is not None
                               else f"it has no parameter {name!r}") + ")")
        dims.append(tp._helpers.UnwrappedParameters(parameters=param,
                                                 pruning_dim=dim % param.dim()))
    return dims


def channel_groups(model: nn.Module, spec: ModelSpec) -> dict[str, tp.dependency.Group]:
    """The model's prunable channel groups, by the name of each group's root module."""
    graph = _graph(model, spec)
    names = {module: name for name, module in model.named_modules()}
    head = model.get_submodule(structure(spec.base).head)
    return {names[group[0].dep.target.module]: group
            for group in graph.get_all_groups(ignored_layers=[head], root_module_types=_ROOTS)}


@lru_cache(maxsize=64)
def group_sizes(base: ModelSpec) -> tuple[tuple[str, int], ...]:
    """Channels per group of the full model, in the graph's order."""
    base = base.base
    model = meta_model(base)
    return tuple((key, len(group[0].idxs)) for key, group in channel_groups(model, base).items())


def sliced_width(channels: int, ratio: float) -> int:
    # Rounded before the ceiling so 0.3 * 10 (= 3.0000000000000004) keeps 3 channels, not 4.
    return max(1, math.ceil(round(ratio * channels, 9)))


def prefix_keep(spec: ModelSpec, ratio: float) -> Keep:
    """HeteroFL's static slice: the first ceil(ratio x C) channels of every group."""
    return tuple(sorted((key, tuple(range(sliced_width(size, ratio))))
                        for key, size in group_sizes(spec.base)))


def prune(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Prune `model` (the full network, on any device) in place to `spec.keep`."""
    groups = channel_groups(model, spec)
    for key, units in spec.keep:
        if key not in groups:
            raise SpecError(f"keep names channel group {key!r}, which model {spec.name!r} does "
                            f"not have (its groups: {', '.join(list(groups)[:12])})")
        size = len(groups[key][0].idxs)
        if units[-1] >= size:
            raise SpecError(f"keep[{key}] names channel {units[-1]}, the group has {size}")
        dropped = sorted(set(range(size)) - set(units))
        if dropped:
            groups[key].prune(dropped, record_history=False)
    for module in model.modules():
        if isinstance(module, nn.GroupNorm) and module.num_channels % module.num_groups:
            groups_now = module.num_groups
            while module.num_channels % groups_now:
                groups_now //= 2 if groups_now % 2 == 0 else groups_now
            module.num_groups = max(1, groups_now)
    return model


@lru_cache(maxsize=8)
def check_sliceable(base: ModelSpec) -> None:
    """SpecError, with Torch-Pruning's reason, if half the width does not give a working model."""
    base = base.base
    half = ModelSpec(base.name, base.input_shape, base.num_classes, prefix_keep(base, 0.5))
    try:
        model = prune(meta_model(base), half)
        out = model(torch.zeros(2, *base.input_shape, device="meta"))
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(f"model {base.name!r} cannot be width-pruned: {type(exc).__name__}: "
                        f"{exc}{_bare_hint(base)}; use a strategy without width slicing, or give "
                        "every device the full width") from None
    if tuple(out.shape) != (2, base.num_classes):
        raise SpecError(f"model {base.name!r} pruned to half width returns {tuple(out.shape)}")


def _bare_hint(base: ModelSpec) -> str:
    """Which bare parameters Torch-Pruning cut along which dimension: the usual cause."""
    try:
        model = meta_model(base)
        graph = _graph(model, base)
    except Exception:
        return ""
    names = {id(p): n for n, p in model.named_parameters()}
    declared = getattr(model, "fedprune_channel_dims", None) or {}
    guessed = [(names[id(u.parameters)], tuple(u.parameters.shape), u.pruning_dim)
               for u in graph.unwrapped_parameters if names[id(u.parameters)] not in declared]
    if not guessed:
        return ""
    said = ", ".join(f"{n} {shape} along dimension {d}" for n, shape, d in guessed[:5])
    return (f" (Torch-Pruning cuts bare parameters along their last dimension longer than one: "
            f"{said}; where a parameter's channels are another dimension, name it on the model: "
            f"fedprune_channel_dims = {{{guessed[0][0]!r}: <its channel dimension>}})")


def index_map(spec: ModelSpec) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """Each submodel tensor's entries as flat positions in the full tensor, and the full shapes."""
    base = spec.base
    with torch.device("meta"):
        model = _factory_build(base)[0]
    model = model.to_empty(device="cpu").to(torch.float64)
    shapes = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            shapes[name] = tuple(param.shape)
            param.copy_(torch.arange(param.numel(), dtype=torch.float64).reshape(param.shape))
    prune(model, spec)
    positions = {name: param.detach().numpy().astype(np.int64)
                 for name, param in model.named_parameters()}
    return positions, shapes


def group_importance(model: nn.Module, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Per-channel L2 magnitude of each group over every tensor coupled in it (Torch-Pruning's
    GroupMagnitudeImportance): the channels the full model relies on most score highest."""
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    return {key: importance(group).detach().double().numpy()
            for key, group in channel_groups(model, spec).items()}
