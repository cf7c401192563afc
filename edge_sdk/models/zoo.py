"""Named architectures from the papers we reproduce, so results are comparable with theirs."""

from __future__ import annotations

from .spec import LayerSpec, ModelSpec, SpecError


def fedp3_cnn(input_shape=(1, 28, 28), num_classes: int = 10) -> ModelSpec:
    """FedP3's Fashion-MNIST CNN: conv(1->4,5)-pool-conv(4->12,5)-pool-fc1024-fc1024-fc10."""
    return ModelSpec("fedp3_cnn", tuple(input_shape), num_classes, (
        LayerSpec("conv", out=4, kernel=5, pool=2),
        LayerSpec("conv", out=12, kernel=5, pool=2),
        LayerSpec("fc", out=1024),
        LayerSpec("fc", out=1024),
        LayerSpec("fc", out=num_classes, act=False),
    ))


def lenet(input_shape=(3, 32, 32), num_classes: int = 10) -> ModelSpec:
    """FedP3's CIFAR 'LeNet': conv(3->64,5)-pool-conv(64->64,5)-pool-fc1024-fc1024-fc10."""
    return ModelSpec("lenet", tuple(input_shape), num_classes, (
        LayerSpec("conv", out=64, kernel=5, pool=2),
        LayerSpec("conv", out=64, kernel=5, pool=2),
        LayerSpec("fc", out=1024),
        LayerSpec("fc", out=1024),
        LayerSpec("fc", out=num_classes, act=False),
    ))


def mlp(input_shape=(1, 28, 28), num_classes: int = 10, hidden: int = 200) -> ModelSpec:
    return ModelSpec("mlp", tuple(input_shape), num_classes, (
        LayerSpec("fc", out=hidden),
        LayerSpec("fc", out=hidden),
        LayerSpec("fc", out=num_classes, act=False),
    ))


def resnet_small(input_shape=(1, 28, 28), num_classes: int = 10) -> ModelSpec:
    """A ResNet-8-like network with GroupNorm (Opacus-compatible)."""
    return ModelSpec("resnet_small", tuple(input_shape), num_classes, (
        LayerSpec("conv", out=16, kernel=3, padding=1, norm=True),
        LayerSpec("resblock", out=16),
        LayerSpec("resblock", out=32, stride=2),
        LayerSpec("resblock", out=64, stride=2),
        LayerSpec("gap"),
        LayerSpec("fc", out=num_classes, act=False),
    ))


MODELS = {"fedp3_cnn": fedp3_cnn, "lenet": lenet, "mlp": mlp, "resnet_small": resnet_small}


def model_spec(name: str, input_shape, num_classes: int) -> ModelSpec:
    try:
        factory = MODELS[name]
    except KeyError:
        raise SpecError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    spec = factory(tuple(input_shape), num_classes)
    spec.validate()
    return spec
