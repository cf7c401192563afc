"""The built-in networks' building blocks: plain `nn.Module`s written as a short list of layers.

This is an implementation detail of the built-in models (`zoo.py`), not a model language: they
are registered and go through the same path as a user's module (structure digest, width pruning
by dependency graph, strategies, export). A `LayeredNet` puts its i-th layer at `layers.<i>` and
declares those as its layers (`fedprune_layers`), so FedP3 and FedPer count layers as the papers
do (a residual block is one layer), and its parameter names stay what they have always been.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .spec import SpecError


@dataclass(frozen=True)
class LayerSpec:
    """One layer. `out`: output width; `pool`: max-pool after the activation (conv only); `act`:
    False only for the output layer; `norm`: GroupNorm (BatchNorm cannot be clipped per sample)."""

    kind: Literal["conv", "fc", "resblock", "gap"]
    out: int = 0
    kernel: int = 3
    stride: int = 1
    padding: int = 0
    pool: int = 0
    act: bool = True
    norm: bool = False


def norm_groups(channels: int) -> int:
    """GroupNorm's group count for a width: the largest of 8, 4, 2 that divides it, else 1.

    Width pruning re-applies it to every pruned GroupNorm (`width.py`), so a sliced network
    normalises as one built at that width would."""
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


class ConvLayer(nn.Module):
    def __init__(self, in_ch: int, spec: LayerSpec):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, spec.out, spec.kernel, spec.stride, spec.padding)
        self.norm = nn.GroupNorm(norm_groups(spec.out), spec.out) if spec.norm else None
        self.act = spec.act
        self.pool = nn.MaxPool2d(spec.pool) if spec.pool > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act:
            x = torch.relu(x)
        if self.pool is not None:
            x = self.pool(x)
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
        self.norm1 = nn.GroupNorm(norm_groups(out), out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(norm_groups(out), out)
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


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class LayeredNet(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], layers: list[LayerSpec]):
        super().__init__()
        if len(input_shape) != 3:
            raise SpecError(f"this network takes (channels, height, width) inputs, got {input_shape}")
        channels, height, width = input_shape
        built: list[nn.Module] = []
        for i, layer in enumerate(layers):
            if layer.kind in ("conv", "resblock"):
                if layer.kind == "conv":
                    built.append(ConvLayer(channels, layer))
                    kernel, padding = layer.kernel, layer.padding
                else:
                    built.append(ResidualBlock(channels, layer))
                    kernel, padding = 3, 1
                height = _conv_out(height, kernel, layer.stride, padding)
                width = _conv_out(width, kernel, layer.stride, padding)
                if layer.kind == "conv" and layer.pool > 1:
                    height, width = height // layer.pool, width // layer.pool
                if height < 1 or width < 1:
                    raise SpecError(f"layer {i}: the feature map shrinks to nothing for input "
                                    f"{input_shape}")
                channels = layer.out
            elif layer.kind == "gap":
                built.append(GlobalAvgPool())
                height = width = 1
            else:
                built.append(DenseLayer(channels * height * width, layer))
                channels, height, width = layer.out, 1, 1
        self.layers = nn.ModuleList(built)
        self.fedprune_layers = [f"layers.{i}" for i, layer in enumerate(layers)
                                if layer.kind != "gap"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
