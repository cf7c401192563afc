"""The built-in networks, from the papers we reproduce, registered like any user model."""

from __future__ import annotations

import math

from .layered import LayeredNet, LayerSpec
from .registry import register_model


@register_model("fedp3_cnn")
def fedp3_cnn(input_shape=(1, 28, 28), num_classes: int = 10) -> LayeredNet:
    """FedP3's Fashion-MNIST CNN: conv(1->4,5)-pool-conv(4->12,5)-pool-fc1024-fc1024-fc10."""
    return LayeredNet(tuple(input_shape), [
        LayerSpec("conv", out=4, kernel=5, pool=2),
        LayerSpec("conv", out=12, kernel=5, pool=2),
        LayerSpec("fc", out=1024),
        LayerSpec("fc", out=1024),
        LayerSpec("fc", out=num_classes, act=False),
    ])


@register_model("lenet")
def lenet(input_shape=(3, 32, 32), num_classes: int = 10) -> LayeredNet:
    """FedP3's CIFAR 'LeNet': conv(3->64,5)-pool-conv(64->64,5)-pool-fc1024-fc1024-fc10."""
    return LayeredNet(tuple(input_shape), [
        LayerSpec("conv", out=64, kernel=5, pool=2),
        LayerSpec("conv", out=64, kernel=5, pool=2),
        LayerSpec("fc", out=1024),
        LayerSpec("fc", out=1024),
        LayerSpec("fc", out=num_classes, act=False),
    ])


@register_model("mlp")
def mlp(input_shape=(1, 28, 28), num_classes: int = 10, hidden: int = 200) -> LayeredNet:
    shape = tuple(input_shape)
    if len(shape) != 3:  # tabular or signal input: an MLP reads any shape flattened
        shape = (1, 1, math.prod(shape))
    return LayeredNet(shape, [
        LayerSpec("fc", out=hidden),
        LayerSpec("fc", out=hidden),
        LayerSpec("fc", out=num_classes, act=False),
    ])


@register_model("resnet_small")
def resnet_small(input_shape=(1, 28, 28), num_classes: int = 10) -> LayeredNet:
    """A ResNet-8-like network with GroupNorm (Opacus-compatible)."""
    return LayeredNet(tuple(input_shape), [
        LayerSpec("conv", out=16, kernel=3, padding=1, norm=True),
        LayerSpec("resblock", out=16),
        LayerSpec("resblock", out=32, stride=2),
        LayerSpec("resblock", out=64, stride=2),
        LayerSpec("gap"),
        LayerSpec("fc", out=num_classes, act=False),
    ])


@register_model("resnet18")
def resnet18(input_shape=(1, 28, 28), num_classes: int = 10) -> LayeredNet:
    """CIFAR-style ResNet-18 (HeteroFL's PreResNet-18 layout) with GroupNorm for Opacus.

    3x3 stem conv of 64 channels (padding 1, GroupNorm, no max-pool), four stages of two basic
    blocks of 64, 128, 256 and 512 channels (stride 2 at the first block of stages 2-4), global
    average pool, fc. About 11.2 M parameters on 1x28x28 with 10 classes. Our blocks are
    post-activation (conv-norm-relu), HeteroFL's are pre-activation; the shapes are the same.
    """
    layers = [LayerSpec("conv", out=64, kernel=3, padding=1, norm=True)]
    for stage, channels in enumerate((64, 128, 256, 512)):
        layers.append(LayerSpec("resblock", out=channels, stride=1 if stage == 0 else 2))
        layers.append(LayerSpec("resblock", out=channels))
    layers += [LayerSpec("gap"), LayerSpec("fc", out=num_classes, act=False)]
    return LayeredNet(tuple(input_shape), layers)


@register_model("leaf_cnn")
def leaf_cnn(input_shape=(1, 28, 28), num_classes: int = 62) -> LayeredNet:
    """LEAF's FEMNIST CNN: conv(32,5,same)-pool-conv(64,5,same)-pool-fc2048-fc classes.

    About 6.6 M parameters with 62 classes, almost all in the 3136 x 2048 fc.
    """
    return LayeredNet(tuple(input_shape), [
        LayerSpec("conv", out=32, kernel=5, padding=2, pool=2),
        LayerSpec("conv", out=64, kernel=5, padding=2, pool=2),
        LayerSpec("fc", out=2048),
        LayerSpec("fc", out=num_classes, act=False),
    ])
