"""Model specs, the networks built from them, and the named architectures (edge_sdk/models/)."""

from __future__ import annotations

import json

import pytest
import torch

from edge_sdk.models import (
    MODELS,
    LayerSpec,
    ModelSpec,
    SpecError,
    build_model,
    layer_tensor_names,
    model_spec,
    tensor_shapes,
)

torch.set_num_threads(1)  # a benchmark shares the machine; these networks are tiny anyway


def fedp3_cnn() -> ModelSpec:
    return model_spec("fedp3_cnn", (1, 28, 28), 10)


# --------------------------------------------------------------------------- FedP3's FMNIST CNN


def test_fedp3_cnn_parameter_count_matches_paper():
    spec = fedp3_cnn()
    model = build_model(spec, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 1_258_798
    shapes = tensor_shapes(spec)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 1_258_798


def test_fedp3_cnn_tensor_shapes():
    # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4, so the first fc sees 12 * 4 * 4 = 192.
    assert tensor_shapes(fedp3_cnn()) == {
        "layers.0.conv.weight": (4, 1, 5, 5),
        "layers.0.conv.bias": (4,),
        "layers.1.conv.weight": (12, 4, 5, 5),
        "layers.1.conv.bias": (12,),
        "layers.2.linear.weight": (1024, 192),
        "layers.2.linear.bias": (1024,),
        "layers.3.linear.weight": (1024, 1024),
        "layers.3.linear.bias": (1024,),
        "layers.4.linear.weight": (10, 1024),
        "layers.4.linear.bias": (10,),
    }


def test_tensor_shapes_match_built_model():
    spec = fedp3_cnn()
    model = build_model(spec, seed=1)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == tensor_shapes(spec)


def test_layer_tensor_names_fedp3_cnn():
    spec = fedp3_cnn()
    layers = layer_tensor_names(spec)
    assert len(layers) == 5
    assert layers[-1] == ("layers.4.linear.weight", "layers.4.linear.bias")
    assert layers[0] == ("layers.0.conv.weight", "layers.0.conv.bias")
    # every tensor appears in exactly one layer, and the output layer produces num_classes
    flat = [name for group in layers for name in group]
    assert sorted(flat) == sorted(tensor_shapes(spec))
    assert tensor_shapes(spec)[layers[-1][0]][0] == spec.num_classes


def test_layer_tensor_names_skips_parameterless_layers():
    spec = model_spec("resnet_small", (1, 28, 28), 10)
    layers = layer_tensor_names(spec)
    # conv, 3 resblocks, (gap has no parameters), output fc
    assert len(layers) == 5
    assert layers[-1] == ("layers.5.linear.weight", "layers.5.linear.bias")
    assert all(not name.startswith("layers.4.") for group in layers for name in group)


# --------------------------------------------------------------------------- zoo forward passes


@pytest.mark.parametrize("name,input_shape,num_classes", [
    ("fedp3_cnn", (1, 28, 28), 10),
    ("lenet", (3, 32, 32), 10),
    ("mlp", (1, 28, 28), 7),
    ("resnet_small", (1, 28, 28), 62),
])
def test_zoo_models_forward_to_num_classes(name, input_shape, num_classes):
    assert name in MODELS
    spec = model_spec(name, input_shape, num_classes)
    assert spec.name == name and spec.num_classes == num_classes
    model = build_model(spec, seed=0)
    x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize("name,input_shape", [("fedp3_cnn", (1, 28, 28)), ("lenet", (3, 32, 32)),
                                              ("mlp", (1, 28, 28)), ("resnet_small", (1, 28, 28))])
def test_spec_json_round_trip(name, input_shape):
    spec = model_spec(name, input_shape, 10)
    text = spec.to_json()
    back = ModelSpec.from_json(text)
    assert back == spec
    assert back.to_json() == text
    assert back.digest() == spec.digest()
    assert isinstance(back.input_shape, tuple) and isinstance(back.layers, tuple)
    # and through a plain (non-canonical) JSON encoding as well
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict(), indent=2))) == spec


def test_digest_stable_and_discriminating():
    spec = fedp3_cnn()
    digest = spec.digest()
    assert digest == fedp3_cnn().digest() == ModelSpec.from_json(spec.to_json()).digest()
    assert len(digest) == 16 and int(digest, 16) >= 0
    others = [
        model_spec("fedp3_cnn", (1, 28, 28), 62),
        model_spec("fedp3_cnn", (3, 28, 28), 10),
        model_spec("lenet", (1, 28, 28), 10),
        model_spec("mlp", (1, 28, 28), 10),
        ModelSpec(spec.name, spec.input_shape, spec.num_classes,
                  (LayerSpec("conv", out=5, kernel=5, pool=2),) + spec.layers[1:]),
    ]
    digests = {o.digest() for o in others}
    assert digest not in digests
    assert len(digests) == len(others)


# --------------------------------------------------------------------------- seeding


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_build_model_seed_reproducible_and_distinct():
    spec = fedp3_cnn()
    a, b, c = (_params(build_model(spec, seed=s)) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(not torch.equal(x, z) for x, z in zip(a, c))


def test_build_model_seed_does_not_touch_global_rng():
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    build_model(fedp3_cnn(), seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)


def test_build_model_without_seed_uses_global_rng():
    spec = model_spec("mlp", (1, 28, 28), 10)
    torch.manual_seed(5)
    a = _params(build_model(spec))
    torch.manual_seed(5)
    b = _params(build_model(spec))
    c = _params(build_model(spec))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


# --------------------------------------------------------------------------- invalid specs


def _spec(*layers, input_shape=(1, 28, 28), num_classes=10):
    return ModelSpec("custom", input_shape, num_classes, tuple(layers))


OUT = LayerSpec("fc", out=10, act=False)


def test_last_layer_must_be_output_layer():
    bad = [
        _spec(LayerSpec("fc", out=32), LayerSpec("fc", out=10)),            # activation on output
        _spec(LayerSpec("fc", out=32), LayerSpec("fc", out=11, act=False)),  # wrong width
        _spec(LayerSpec("fc", out=32), LayerSpec("conv", out=10, act=False)),
        _spec(LayerSpec("fc", out=10, act=False), LayerSpec("gap")),
    ]
    for spec in bad:
        with pytest.raises(SpecError, match="last layer must be the output layer"):
            spec.validate()
        with pytest.raises(SpecError, match="output layer"):
            build_model(spec)
        with pytest.raises(SpecError, match="output layer"):
            ModelSpec.from_json(spec.to_json())


def test_unknown_layer_kind():
    spec = _spec(LayerSpec("attention", out=8), OUT)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"layer 0: unknown kind 'attention'.*conv, fc, resblock, gap"):
        build_model(spec)


def test_unknown_model_name():
    with pytest.raises(SpecError, match=r"unknown model 'vgg16'.*fedp3_cnn.*lenet.*mlp.*resnet_small"):
        model_spec("vgg16", (1, 28, 28), 10)


@pytest.mark.parametrize("layer", [LayerSpec("fc", out=0), LayerSpec("conv", out=0),
                                   LayerSpec("resblock", out=-3)])
def test_zero_width(layer):
    spec = _spec(layer, OUT)
    with pytest.raises(SpecError, match=rf"layer 0 \({layer.kind}\): out must be >= 1, got {layer.out}"):
        build_model(spec)


def test_no_layers_and_bad_input_shape():
    with pytest.raises(SpecError, match="at least one layer"):
        _spec().validate()
    with pytest.raises(SpecError, match="input_shape"):
        _spec(OUT, input_shape=(1, 0, 28)).validate()


def test_feature_map_shrinking_to_nothing():
    # FedP3's CNN on a 12x12 input: 12 -conv5-> 8 -pool-> 4 -conv5-> 0
    with pytest.raises(SpecError, match=r"layer 1: the feature map shrinks to nothing"):
        build_model(model_spec("fedp3_cnn", (1, 12, 12), 10))
    # kernel larger than the input
    with pytest.raises(SpecError, match=r"layer 0: the feature map shrinks to nothing"):
        build_model(_spec(LayerSpec("conv", out=4, kernel=5), OUT, input_shape=(1, 4, 4)))
    # conv leaves 1x1 and the pool halves it to 0
    with pytest.raises(SpecError, match=r"layer 0: .*shrinks to nothing"):
        layer_tensor_names(_spec(LayerSpec("conv", out=4, kernel=3, pool=2), OUT,
                                 input_shape=(1, 3, 3)))
    # boundary: exactly 1x1 survives
    build_model(_spec(LayerSpec("conv", out=4, kernel=3), OUT, input_shape=(1, 3, 3)))


def test_conv_after_fc_is_refused():
    with pytest.raises(SpecError, match="after a flattening fc layer"):
        build_model(_spec(LayerSpec("fc", out=16), LayerSpec("conv", out=4), OUT))


def test_malformed_dict_raises_spec_error():
    data = fedp3_cnn().to_dict()
    del data["layers"]
    with pytest.raises(SpecError, match="malformed model spec"):
        ModelSpec.from_dict(data)
    data = fedp3_cnn().to_dict()
    data["layers"][0]["widht"] = 3
    with pytest.raises(SpecError, match="malformed model spec"):
        ModelSpec.from_dict(data)
