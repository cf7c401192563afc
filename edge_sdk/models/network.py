"""Building a spec's network, the same way on both sides, and reading its structure.

`build_model(spec)` is the one way any network is made: the registered factory, Opacus's fixes
(BatchNorm becomes GroupNorm, since per-sample clipping cannot go through batch statistics), the
structural check against the coordinator's digest, width pruning to the kept channels, FedDP's
gates. A submodel is pruned while the full model is still on the `meta` device, so a device
never allocates the network it cannot hold: only the pruned tensors become real.

A model's *layers* (what FedP3 samples and FedPer's head counts in) are its parametrised modules
in the order the forward pass runs them, or the module prefixes it lists in `fedprune_layers`;
the last one is the output layer and must produce the logits. A module with parameters of its
own and parametrised children (the model itself with a positional embedding or an output scale,
a block with a layer scale) is the layer of only its own; the model's own layer comes first.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .registry import allow_reference, model_factory
from .spec import ModelSpec, SpecError


@dataclass(frozen=True)
class Structure:
    """What a full model is, read once per (name, input shape, classes) from a meta build."""

    digest: str                             # parameter names and shapes, and the forward's operators
    layers: tuple[tuple[str, ...], ...]     # tensor names per layer, in forward order, head last
    layer_modules: tuple[str, ...]          # the module name (prefix) of each layer
    head: str                               # the module that produces the logits
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    fixed: tuple[str, ...]                  # what Opacus's fix replaced ("" when nothing)


class _OperatorLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def load_toolchain() -> None:
    """Import what building any model for a task needs (Opacus's validators: seconds on a small
    CPU), so that a device pays it when it starts, not inside its first task's deadline."""
    from opacus.validators import ModuleValidator  # noqa: F401


def _factory_build(spec: ModelSpec) -> tuple[nn.Module, tuple[str, ...]]:
    """The registered factory's module with Opacus's fixes applied; what was fixed, said."""
    try:
        model = model_factory(spec.name)(tuple(spec.input_shape), spec.num_classes)
    except SpecError:
        raise
    except Exception as exc:  # the user's factory is code we do not control
        raise SpecError(f"model {spec.name!r} cannot be built for input {spec.input_shape} and "
                        f"{spec.num_classes} classes: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"model {spec.name!r} returned {type(model).__name__}, not an nn.Module")
    from opacus.validators import ModuleValidator

    # Opacus's backward hooks wrap each module's output in a view; an in-place activation after
    # it (torchvision's ReLU6(inplace=True)) is then an autograd error in the first DP step.
    in_place = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    for module in in_place:
        module.inplace = False
    done = ("in-place activations made out-of-place",) if in_place else ()
    problems = ModuleValidator.validate(model, strict=False)
    if not problems:
        return model, done
    before = Counter(type(m).__name__ for m in model.modules())
    model = ModuleValidator.fix(model)
    after = Counter(type(m).__name__ for m in model.modules())
    gone, added = before - after, after - before
    fixed = done + (f"{_kinds(gone)} replaced by {_kinds(added) or 'nothing'}",) if gone else done
    left = ModuleValidator.validate(model, strict=False)
    if left:
        raise SpecError(f"model {spec.name!r} cannot be trained with per-sample clipping: {left[0]}")
    return model, fixed


def _kinds(counts: Counter) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))


def meta_model(spec: ModelSpec) -> nn.Module:
    """The full model on the meta device: its structure, no memory."""
    with torch.device("meta"):
        return _factory_build(spec.base)[0]


@lru_cache(maxsize=64)
def structure(base: ModelSpec) -> Structure:
    base = ModelSpec(base.name, base.input_shape, base.num_classes)
    with torch.device("meta"):
        model, fixed = _factory_build(base)
    order: list[str] = []
    names = {module: name for name, module in model.named_modules()}
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(names[m])) for m in owners]
    log = _OperatorLog()
    try:
        with torch.no_grad(), log:
            output = model(torch.zeros(2, *base.input_shape, device="meta"))
    except Exception as exc:
        raise SpecError(f"model {base.name!r} fails on an input of shape {base.input_shape}: "
                        f"{type(exc).__name__}: {exc}") from None
    finally:
        for hook in hooks:
            hook.remove()
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (2, base.num_classes):
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise SpecError(f"model {base.name!r} must return logits of shape (batch, "
                        f"{base.num_classes}), got {got}")
    executed = list(dict.fromkeys(order))
    if not executed:
        raise SpecError(f"model {base.name!r} has no parameters to train")
    # The root's hook fires after everything it calls: its own parameters (a positional
    # embedding, an output scale) become the first layer, so the output layer stays last.
    if executed[-1] == "" and len(executed) > 1:
        executed.insert(0, executed.pop())
    head = executed[-1]
    declared = getattr(model, "fedprune_layers", None)
    prefixes = list(declared) if declared else executed
    layers = _declared_layers(model, prefixes) if declared else _owned_layers(model, prefixes)
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    _check_cover(base.name, layers, prefixes, [n for n, _ in shapes], bool(declared))
    buffers = [(n, tuple(b.shape)) for n, b in model.named_buffers()]
    text = json.dumps([shapes, buffers, log.ops], separators=(",", ":"))
    return Structure(hashlib.sha256(text.encode()).hexdigest()[:16], layers, tuple(prefixes),
                     head, shapes, fixed)


def _declared_layers(model: nn.Module, prefixes: list[str]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(n for n, _ in model.get_submodule(p).named_parameters(prefix=p))
                 for p in prefixes)


def _owned_layers(model: nn.Module, prefixes: list[str]) -> tuple[tuple[str, ...], ...]:
    """Each parameter in the layer of the innermost module among `prefixes` that holds it: a
    module with parameters of its own and parametrised children (the root, a block with a scale)
    keeps only what no child that ran claims."""
    owner = set(prefixes)
    layers: dict[str, list[str]] = {p: [] for p in prefixes}
    for name, _ in model.named_parameters():
        parts = name.split(".")[:-1]
        holder = next((".".join(parts[:i]) for i in range(len(parts), -1, -1)
                       if ".".join(parts[:i]) in owner), None)
        if holder is not None:
            layers[holder].append(name)
    return tuple(tuple(layers[p]) for p in prefixes)


def _check_cover(model_name: str, layers, prefixes: list[str], parameters: list[str],
                 declared: bool) -> None:
    covered = Counter(n for layer in layers for n in layer)
    twice = sorted(n for n, count in covered.items() if count > 1)
    missing = [n for n in parameters if n not in covered]
    empty = [p or "(the model itself)" for p, layer in zip(prefixes, layers) if not layer]
    if declared and (twice or missing or empty):
        raise SpecError(
            f"model {model_name!r}: fedprune_layers must cover every parameter once; "
            + "; ".join(part for part in (
                f"in no layer: {', '.join(missing[:5])}" if missing else "",
                f"in more than one: {', '.join(twice[:5])}" if twice else "",
                f"layers without parameters: {', '.join(empty[:5])}" if empty else "") if part)
            + ". List module names whose parameters partition the model's")
    if missing:
        raise SpecError(
            f"model {model_name!r}: parameter(s) {', '.join(missing[:5])} belong to no module "
            "the forward pass calls (a module never used, or one whose tensors a parent reads "
            "directly, e.g. F.linear(x, self.fc.weight)): call the module, drop it, or give the "
            "model a fedprune_layers list of module names whose parameters cover them")


def model_spec(name: str, input_shape, num_classes: int) -> ModelSpec:
    """The full model's spec, its structural digest filled in (what the coordinator sends).

    `name` may be a `package.module:function` reference: this is only ever called with a name
    from the caller's own configuration, never with one from a message."""
    if ":" in name:
        allow_reference(name)
    base = ModelSpec(name, tuple(int(v) for v in input_shape), int(num_classes))
    return ModelSpec(base.name, base.input_shape, base.num_classes,
                     structure=structure(base).digest)


def check_structure(spec: ModelSpec) -> Structure:
    """This machine's structure for `spec`, or SpecError if it is not the coordinator's."""
    local = structure(spec.base)
    if spec.structure and spec.structure != local.digest:
        raise SpecError(
            f"model {spec.name!r} builds differently here (structure {local.digest}, "
            f"{len(local.shapes)} parameter tensors, {sum(_count(s) for _, s in local.shapes)} "
            f"parameters) than on the coordinator (structure {spec.structure}): install the same "
            "version of the package that defines it on both sides")
    return local


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def build_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """The network `spec` describes; with a seed, initial weights are reproducible anywhere."""
    from . import gates, width

    info = check_structure(spec)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if not spec.keep:
            model = _factory_build(spec.base)[0]
        else:
            with torch.device("meta"):
                model = _factory_build(spec.base)[0]
            width.prune(model, spec)
            model.train()  # Torch-Pruning traces in eval mode; Opacus refuses a model left there
            model = model.to_empty(device="cpu")
            # What no reset_parameters sets (a bare parameter) is zero, not stale memory, so a
            # seeded build is reproducible; a device loads the downloaded values over it anyway.
            with torch.no_grad():
                for param in model.parameters():
                    param.zero_()
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        if spec.gate < 1.0:
            gates.attach(model, spec.gate, info.head)
    return model


def layer_tensor_names(spec: ModelSpec) -> tuple[tuple[str, ...], ...]:
    """Tensor names per layer, in forward order; the last entry is the output layer.

    FedDP's gate tensors belong to the layer of the convolution they gate."""
    layers = structure(spec.base).layers
    if spec.gate >= 1.0:
        return layers
    from .gates import gate_tensor_names

    return tuple(layer + gate_tensor_names(spec, layer) for layer in layers)


@lru_cache(maxsize=256)
def _tensor_shapes(spec: ModelSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    if not spec.keep and spec.gate >= 1.0:
        return structure(spec.base).shapes
    return tuple((n, tuple(p.shape)) for n, p in build_model(spec, seed=0).named_parameters())


def tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    return dict(_tensor_shapes(spec))


Module = nn.Module  # what build_model returns; named for type hints elsewhere
