"""Build a torch network from a ModelSpec, with its layers addressable by index.

Every parameterised layer lives at `layers.<i>`, so tensor names (`layers.2.linear.weight`) say
which layer they belong to; `layer_tensor_names` is how plans and strategies speak about layers
without knowing the architecture.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from .spec import LayerSpec, ModelSpec, SpecError


class ConvLayer(nn.Module):
    def __init__(self, in_ch: int, spec: LayerSpec):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, spec.out, spec.kernel, spec.stride, spec.padding)
        self.norm = nn.GroupNorm(_groups(spec.out), spec.out) if spec.norm else None
        self.act = spec.act
        self.pool = nn.MaxPool2d(spec.pool) if spec.pool > 1 else None
        self.keep = math.ceil(spec.gate * spec.out) if spec.gate < 1 else None
        self.gate = None
        if self.keep is not None:
            # FBS-style gate (FedDP's paper variant): global pooling -> small FC -> the top-k
            # channels per sample survive, scaled by their saliency; the rest are zero in the
            # forward and get no gradient, and need not be computed at inference.
            self.gate = nn.Linear(in_ch, spec.out)
            nn.init.constant_(self.gate.bias, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saliency = torch.relu(self.gate(x.mean(dim=(2, 3)))) if self.gate is not None else None
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act:
            x = torch.relu(x)
        if self.pool is not None:
            x = self.pool(x)
        if saliency is not None:
            cutoff = saliency.topk(self.keep, dim=1).values[:, -1:]
            x = x * (saliency * (saliency >= cutoff))[:, :, None, None]
        return x


class DenseLayer(nn.Module):
    def __init__(self, in_features: int, spec: LayerSpec):
        super().__init__()
        self.linear = nn.Linear(in_features, spec.out)
        self.act = spec.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(torch.flatten(x, 1))
        return torch.relu(x) if self.act else x


class ResidualBlock(nn.Module):
    """Basic ResNet block with GroupNorm, so it stays compatible with per-sample clipping."""

    def __init__(self, in_ch: int, spec: LayerSpec):
        super().__init__()
        out = spec.out
        self.conv1 = nn.Conv2d(in_ch, out, 3, spec.stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(out), out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(out), out)
        self.shortcut = (nn.Conv2d(in_ch, out, 1, spec.stride, bias=False)
                         if spec.stride != 1 or in_ch != out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        skip = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(y + skip)


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


def _groups(channels: int) -> int:
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class SpecModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        spec.validate()
        self.spec = spec
        channels, height, width = spec.input_shape
        layers: list[nn.Module] = []
        for i, layer in enumerate(spec.layers):
            if layer.kind in ("conv", "resblock"):
                if height == 0:
                    raise SpecError(f"layer {i}: {layer.kind} after a flattening fc layer")
                if layer.kind == "conv":
                    layers.append(ConvLayer(channels, layer))
                    height = _conv_out(height, layer.kernel, layer.stride, layer.padding)
                    width = _conv_out(width, layer.kernel, layer.stride, layer.padding)
                else:
                    layers.append(ResidualBlock(channels, layer))
                    height = _conv_out(height, 3, layer.stride, 1)
                    width = _conv_out(width, 3, layer.stride, 1)
                if layer.kind == "conv" and layer.pool > 1:
                    height, width = height // layer.pool, width // layer.pool
                if height < 1 or width < 1:
                    raise SpecError(f"layer {i}: the feature map shrinks to nothing "
                                    f"for input {spec.input_shape}")
                channels = layer.out
            elif layer.kind == "gap":
                layers.append(GlobalAvgPool())
                height = width = 1
            else:
                layers.append(DenseLayer(channels * max(height, 1) * max(width, 1), layer))
                channels, height, width = layer.out, 0, 0
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build_model(spec: ModelSpec, seed: int | None = None) -> SpecModel:
    """Build the network; with a seed, initial weights are reproducible on any device."""
    if seed is None:
        return SpecModel(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SpecModel(spec)


@lru_cache(maxsize=64)
def layer_tensor_names(spec: ModelSpec) -> tuple[tuple[str, ...], ...]:
    """Tensor names per parameterised layer, in order; the last entry is the output layer."""
    model = build_model(spec, seed=0)  # seeded: a cache miss must not draw from torch's generator
    groups = []
    for i, layer in enumerate(model.layers):
        names = tuple(f"layers.{i}.{name}" for name, _ in layer.named_parameters())
        if names:
            groups.append(names)
    return tuple(groups)


@lru_cache(maxsize=64)
def _tensor_shapes(spec: ModelSpec) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Seeded: a cache miss must not draw from torch's global generator, or what a device's task
    # draws from it (DP's Poisson sampling) would depend on what the process ran before.
    return tuple((name, tuple(p.shape)) for name, p in build_model(spec, seed=0).named_parameters())


def tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    return dict(_tensor_shapes(spec))

