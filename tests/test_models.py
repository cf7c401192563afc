"""Registered models, their specs and the networks built from them (edge_sdk/models/).

A model is a name for a factory `(input_shape, num_classes) -> nn.Module`: the built-ins, a module
registered by a test (a MobileNetV2-style network from tests/harness/models.py), an installed
package's entry point, or a `package.module:function` this process's own config allowed. What
crosses the wire is only the name, the shapes and the structural digest, so both sides must
build the same network, and a name from a message is never imported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from edge_sdk.models import (
    ModelSpec,
    SpecError,
    allow_reference,
    build_model,
    layer_tensor_names,
    model_names,
    model_spec,
    register_model,
    structure,
    tensor_shapes,
)
from edge_sdk.models.cost import footprint
from edge_sdk.models.registry import _REGISTRY
from edge_sdk.slicing import width_spec
from harness.models import MOBILENET, SIGNAL_CNN

BUILT_INS = ("fedp3_cnn", "lenet", "mlp", "resnet_small", "resnet18", "leaf_cnn")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # a benchmark shares the machine; these networks are tiny anyway


def fedp3_cnn() -> ModelSpec:
    return model_spec("fedp3_cnn", (1, 28, 28), 10)


# --------------------------------------------------------------------------- FedP3's FMNIST CNN


def test_fedp3_cnn_parameter_count_matches_paper():
    spec = fedp3_cnn()
    model = build_model(spec, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 1_258_798
    assert sum(math.prod(s) for s in tensor_shapes(spec).values()) == 1_258_798
    assert footprint(spec).parameters == 1_258_798


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


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_tensor_shapes_match_built_model(ratio):
    spec = width_spec(fedp3_cnn(), ratio)
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
    assert structure(spec).head == "layers.4.linear"


def test_layer_tensor_names_skips_parameterless_layers():
    spec = model_spec("resnet_small", (1, 28, 28), 10)
    layers = layer_tensor_names(spec)
    # conv, 3 resblocks, (gap has no parameters), output fc
    assert len(layers) == 5
    assert layers[-1] == ("layers.5.linear.weight", "layers.5.linear.bias")
    assert all(not name.startswith("layers.4.") for group in layers for name in group)


def test_a_module_without_declared_layers_is_layered_in_forward_order_head_last():
    spec = model_spec(MOBILENET, (1, 28, 28), 10)
    info = structure(spec)
    assert info.head == "classifier" and info.layer_modules[-1] == "classifier"
    assert info.layer_modules[0] == "features.0.0"  # the stem conv runs first
    # a depthwise conv runs before its block's projection, and every parameter is in one layer
    assert info.layer_modules.index("features.2.conv.1.0") < info.layer_modules.index("features.2.conv.2.0")
    flat = [n for layer in info.layers for n in layer]
    assert sorted(flat) == sorted(tensor_shapes(spec)) and len(flat) == len(set(flat))


# --------------------------------------------------------------------------- the model's own parameters


class _LayerScaled(nn.Module):
    """A convolution whose output a parameter of the block itself scales per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((channels,), 0.1))

    def forward(self, x):
        return x + self.gamma[:, None, None] * self.conv(x)


class _Embedded(nn.Module):
    """Bare parameters on the model itself: an NCHW positional embedding and an output scale."""

    def __init__(self, in_channels: int, num_classes: int, channel_dims: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.pos = nn.Parameter(torch.randn(1, 8, 8, 8) * 0.1)
        self.block = _LayerScaled(8)
        self.fc = nn.Linear(8, num_classes)
        self.scale = nn.Parameter(torch.tensor(2.0))
        if channel_dims:
            self.fedprune_channel_dims = {"pos": 1}

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x) + self.pos))
        return self.fc(x.mean(dim=(2, 3))) * self.scale


register_model("tm_embedded")(lambda shape, classes: _Embedded(shape[0], classes, True))
register_model("tm_embedded_nchw_undeclared")(lambda shape, classes: _Embedded(shape[0], classes, False))


def test_a_models_own_parameters_are_its_first_layer_and_are_width_pruned_with_their_channels():
    spec = model_spec("tm_embedded", (1, 8, 8), 3)
    info = structure(spec)
    assert info.layers[0] == ("pos", "scale") and info.layer_modules[0] == ""
    assert info.layer_modules[1:] == ("stem.0", "stem.1", "block.conv", "block", "fc")
    assert info.layers[4] == ("block.gamma",) and info.head == "fc"
    flat = [n for layer in info.layers for n in layer]
    assert sorted(flat) == sorted(tensor_shapes(spec)) and len(flat) == len(set(flat))

    from coordinator.slicing import width_slice
    full = build_model(spec, seed=0)
    state = {k: v.detach().numpy() for k, v in full.state_dict().items()}
    cut = width_slice(spec, state, 0.5, "magnitude")
    (group, kept), = cut.spec.keep  # stem, its norm, the embedding, the block: one channel group
    assert len(kept) == 4
    assert cut.state["pos"].shape == (1, 4, 8, 8) and cut.state["block.gamma"].shape == (4,)
    np.testing.assert_array_equal(cut.state["pos"], state["pos"][:, list(kept)])
    assert cut.state["scale"].shape == () and cut.state["scale"] == 2.0
    half = build_model(cut.spec, seed=0)
    assert torch.equal(half.pos, build_model(cut.spec, seed=0).pos)  # seeded: no stale memory
    half.load_state_dict({k: torch.from_numpy(v) for k, v in cut.state.items()})
    assert half(torch.randn(5, 1, 8, 8)).shape == (5, 3)


def test_a_models_own_parameters_train_under_dp_sgd():
    """Opacus computes the per-sample gradients of a module with parameters of its own and
    children (the model itself here) with functorch, over the whole module."""
    from edge_sdk.settings import DPSettings, TrainSettings
    from edge_sdk.training.local import train_locally

    model = build_model(model_spec("tm_embedded", (1, 8, 8), 3), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=generator), torch.arange(32) % 3
    report = train_locally(model, x, y, TrainSettings(batch_size=16, local_epochs=1), {}, seed=0,
                           dp=DPSettings(noise_multiplier=1.0), noise_multiplier=1.0)
    assert report.privacy_history  # the steps were DP-SGD steps
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters()), \
        [n for n, p in model.named_parameters() if torch.equal(p, before[n])]


def test_a_bare_parameter_cut_along_the_wrong_dimension_is_named_with_the_fix():
    spec = model_spec("tm_embedded_nchw_undeclared", (1, 8, 8), 3)  # the layers still work
    assert structure(spec).layers[0] == ("pos", "scale")
    with pytest.raises(SpecError, match=r"cannot be width-pruned: .*pos \(1, 8, 8, 8\) along "
                                        r"dimension 3, .* fedprune_channel_dims = \{'pos': "):
        build_model(width_spec(spec, 0.5))


def _declaring(dims):
    def build(shape, classes):
        model = _Embedded(shape[0], classes, False)
        model.fedprune_channel_dims = dims
        return model
    return build


@pytest.mark.parametrize("name,dims,message", [
    ("tm_dims_unknown", {"nope": 1},
     r"fedprune_channel_dims\['nope'\] = 1 is not .*it has no parameter 'nope'"),
    ("tm_dims_out_of_range", {"pos": 4},
     r"fedprune_channel_dims\['pos'\] = 4 is not .*pos has shape \(1, 8, 8, 8\)"),
    ("tm_dims_not_a_dict", [("pos", 1)],
     r"fedprune_channel_dims must be a dict of parameter name to dimension, got list"),
])
def test_a_wrong_fedprune_channel_dims_is_a_spec_error(name, dims, message):
    if name not in _REGISTRY:
        register_model(name)(_declaring(dims))
    with pytest.raises(SpecError, match=message):
        build_model(width_spec(model_spec(name, (1, 8, 8), 3), 0.5))


# --------------------------------------------------------------------------- forward passes


@pytest.mark.parametrize("name,input_shape,num_classes", [
    ("fedp3_cnn", (1, 28, 28), 10),
    ("lenet", (3, 32, 32), 10),
    ("mlp", (1, 28, 28), 7),
    ("mlp", (30,), 2),                 # tabular: any input shape, read flattened
    ("resnet_small", (1, 28, 28), 62),
    (MOBILENET, (3, 32, 32), 5),
    (SIGNAL_CNN, (2, 64), 4),
])
def test_registered_models_forward_to_num_classes(name, input_shape, num_classes):
    assert name in model_names()
    spec = model_spec(name, input_shape, num_classes)
    assert spec.name == name and spec.num_classes == num_classes and len(spec.structure) == 16
    model = build_model(spec, seed=0)
    x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


def test_opacus_fix_turns_batchnorm_into_groupnorm_and_structure_says_so():
    spec = model_spec(MOBILENET, (1, 28, 28), 10)
    factory_made = _REGISTRY[MOBILENET]((1, 28, 28), 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in factory_made.modules()) == 16
    model = build_model(spec, seed=0)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 16
    fixed = structure(spec).fixed
    assert "16 BatchNorm2d replaced by 16 GroupNorm" in fixed, fixed
    assert "in-place activations made out-of-place" in fixed
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    # a model Opacus has nothing to fix says so too
    assert structure(fedp3_cnn()).fixed == ()


# --------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize("name,input_shape", [("fedp3_cnn", (1, 28, 28)), ("lenet", (3, 32, 32)),
                                              ("mlp", (30,)), ("resnet_small", (1, 28, 28)),
                                              (MOBILENET, (1, 28, 28))])
def test_spec_json_round_trip(name, input_shape):
    full = model_spec(name, input_shape, 10)
    for spec in (full, width_spec(full, 0.5), dataclasses.replace(full, gate=0.25)):
        text = spec.to_json()
        back = ModelSpec.from_json(text)
        assert back == spec
        assert back.to_json() == text
        assert back.digest() == spec.digest()
        assert isinstance(back.input_shape, tuple) and isinstance(back.keep, tuple)
        # and through a plain (non-canonical) JSON encoding as well
        assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict(), indent=2))) == spec
        assert back.base == full


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
        width_spec(spec, 0.5),
        width_spec(spec, 0.25),
        dataclasses.replace(spec, gate=0.5),
        dataclasses.replace(spec, structure=""),
    ]
    digests = {o.digest() for o in others}
    assert digest not in digests
    assert len(digests) == len(others)


def test_structure_digest_is_the_network_not_the_name():
    a, b = fedp3_cnn(), model_spec("fedp3_cnn", (1, 28, 28), 62)
    assert structure(a).digest == a.structure != b.structure  # another head, another network
    assert model_spec("fedp3_cnn", [1, 28, 28], 10) == a       # a list from JSON is the same spec
    assert structure(width_spec(a, 0.5).base) == structure(a)  # a submodel's base is the full model


# --------------------------------------------------------------------------- seeding


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["fedp3_cnn", MOBILENET])
def test_build_model_seed_reproducible_and_distinct(name):
    spec = model_spec(name, (1, 28, 28), 10)
    for s in (spec, width_spec(spec, 0.5)):
        a, b, c = (_params(build_model(s, seed=seed)) for seed in (7, 7, 8))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        # every randomly initialised tensor differs (norm weights and biases start constant)
        assert all(not torch.equal(x, z) for x, z in zip(a, c) if x.dim() > 1)


def test_build_model_seed_does_not_touch_global_rng():
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    build_model(fedp3_cnn(), seed=3)
    build_model(width_spec(fedp3_cnn(), 0.5), seed=3)
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


# --------------------------------------------------------------------------- where models come from


WIDTH = {"hidden": 8}  # what the "installed version" of `versioned_net` builds


@register_model("tm_versioned_net")
def versioned_net(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), WIDTH["hidden"]), nn.ReLU(),
                         nn.Linear(WIDTH["hidden"], num_classes))


def test_a_model_that_builds_differently_here_is_refused_naming_both_digests():
    coordinator = model_spec("tm_versioned_net", (4,), 3)
    WIDTH["hidden"] = 16  # the device has another version of the package installed
    structure.cache_clear()
    try:
        here = structure(coordinator.base).digest
        assert here != coordinator.structure
        with pytest.raises(SpecError, match=rf"builds differently here \(structure {here}, 4 "
                                            rf"parameter tensors, 131 parameters\) than on the "
                                            rf"coordinator \(structure {coordinator.structure}\)"):
            build_model(coordinator)
        # the same spec without a digest (nothing to check) builds what is installed
        assert build_model(dataclasses.replace(coordinator, structure=""))[1].out_features == 16
    finally:
        WIDTH["hidden"] = 8
        structure.cache_clear()
    assert sum(p.numel() for p in build_model(coordinator).parameters()) == 4 * 8 + 8 + 8 * 3 + 3


SIDE_EFFECT = '''
import pathlib
pathlib.Path({marker!r}).write_text("imported")
from torch import nn
def build(input_shape, num_classes):
    return nn.Linear(input_shape[0], num_classes)
'''


def test_a_reference_from_the_wire_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    (tmp_path / "fp_side_effect.py").write_text(SIDE_EFFECT.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    wire = ModelSpec.from_json('{"name": "fp_side_effect:build", "input_shape": [4], '
                               '"num_classes": 3, "structure": "0123456789abcdef"}')
    for attempt in (lambda: build_model(wire), lambda: structure(wire.base),
                    lambda: tensor_shapes(wire), lambda: footprint(wire)):
        with pytest.raises(SpecError, match=r"unknown model 'fp_side_effect:build'; this machine has "
                                            r".*fedp3_cnn.*package\.module:function named in this "
                                            r"machine's own config"):
            attempt()
    assert not marker.exists() and "fp_side_effect" not in sys.modules
    # the same reference named by this process's own config is imported, so the test above
    # would have seen the side effect had anything imported it
    try:
        assert allow_reference("fp_side_effect:build") == "fp_side_effect:build"
        assert marker.read_text() == "imported"
        spec = model_spec("fp_side_effect:build", (4,), 3)
        assert build_model(spec)(torch.zeros(2, 4)).shape == (2, 3)
    finally:
        _REGISTRY.pop("fp_side_effect:build", None)
        sys.modules.pop("fp_side_effect", None)


def test_a_reference_in_the_config_that_does_not_load_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "fp_broken.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError, match=r"model 'fp_missing:build' cannot be loaded \(No module "
                                        r"named 'fp_missing'\)"):
        allow_reference("fp_missing:build")
    with pytest.raises(SpecError, match=r"fp_broken.*RuntimeError: no GPU here"):
        allow_reference("fp_broken:build")
    with pytest.raises(SpecError, match="neither a registered model .* nor a package.module:function"):
        allow_reference("os.system; rm")


ENTRY_POINT_MODULE = '''
from torch import nn
def build(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 6), nn.ReLU(), nn.Linear(6, num_classes))
'''


def test_an_installed_packages_entry_point_is_a_model(tmp_path, monkeypatch):
    """A real distribution on the import path (dist-info with entry_points.txt), as
    `pip install` of a user's package with `[project.entry-points."fedprune.models"]` leaves it."""
    (tmp_path / "fp_plugin_models.py").write_text(ENTRY_POINT_MODULE)
    info = tmp_path / "fp_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fp-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[fedprune.models]\nfp_plugin_net = fp_plugin_models:build\n"
        "fp_plugin_broken = fp_plugin_models:missing\n")
    assert "fp_plugin_net" not in model_names()
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert {"fp_plugin_net", "fp_plugin_broken"} <= set(model_names())
        spec = model_spec("fp_plugin_net", (5,), 3)
        model = build_model(spec, seed=0)
        assert model(torch.zeros(2, 5)).shape == (2, 3)
        assert tensor_shapes(width_spec(spec, 0.5))["1.weight"] == (3, 5)  # and it slices
        with pytest.raises(SpecError, match=r"model 'fp_plugin_broken' \(entry point "
                                            r"fp_plugin_models:missing\) fails to load"):
            model_spec("fp_plugin_broken", (5,), 3)
    finally:
        _REGISTRY.pop("fp_plugin_net", None)
        sys.modules.pop("fp_plugin_models", None)


def test_unknown_model_name():
    with pytest.raises(SpecError, match=r"unknown model 'vgg16'.*fedp3_cnn.*lenet.*mlp.*resnet_small"):
        model_spec("vgg16", (1, 28, 28), 10)


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_model("fedp3_cnn")(lambda shape, classes: nn.Linear(1, classes))


# --------------------------------------------------------------------------- factories that fail


@register_model("tm_raises")
def _raises(input_shape, num_classes):
    raise ValueError("needs 3 channels")


@register_model("tm_not_a_module")
def _not_a_module(input_shape, num_classes):
    return "a string"


@register_model("tm_wrong_logits")
def _wrong_logits(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))


class _Slice(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x):
        return x.flatten(1)[:, :self.width]


@register_model("tm_no_parameters")
def _no_parameters(input_shape, num_classes):
    return _Slice(num_classes)


@pytest.mark.parametrize("name,message", [
    ("tm_raises", r"cannot be built for input \(1, 28, 28\) and 10 classes: ValueError: "
                           r"needs 3 channels"),
    ("tm_not_a_module", r"returned str, not an nn.Module"),
    ("tm_wrong_logits", r"must return logits of shape \(batch, 10\), got \(2, 11\)"),
    ("tm_no_parameters", r"model 'tm_no_parameters' has no parameters to train"),
])
def test_a_factory_that_does_not_make_a_classifier_is_a_spec_error(name, message):
    with pytest.raises(SpecError, match=message):
        model_spec(name, (1, 28, 28), 10)


def test_feature_map_shrinking_to_nothing_and_wrong_rank():
    # FedP3's CNN on a 12x12 input: 12 -conv5-> 8 -pool-> 4 -conv5-> 0
    with pytest.raises(SpecError, match=r"layer 1: the feature map shrinks to nothing"):
        model_spec("fedp3_cnn", (1, 12, 12), 10)
    with pytest.raises(SpecError, match=r"takes \(channels, height, width\) inputs, got \(28, 28\)"):
        model_spec("fedp3_cnn", (28, 28), 10)
    with pytest.raises(SpecError, match=r"fails on an input of shape \(1, 28, 28\)"):
        model_spec(SIGNAL_CNN, (1, 28, 28), 10)  # a 1-D network given images


# --------------------------------------------------------------------------- invalid specs


@pytest.mark.parametrize("fields,message", [
    ({"input_shape": (1, 0, 28)}, "input_shape must be 1 to 4 positive sizes"),
    ({"input_shape": (1, 2, 3, 4, 5)}, "input_shape must be 1 to 4 positive sizes"),
    ({"num_classes": 1}, r"num_classes must be in \[2, 100000\]"),
    ({"gate": 0.0}, r"gate must be a number in \(0, 1\]"),
    ({"gate": float("nan")}, r"gate must be a number in \(0, 1\]"),
    ({"gate": True}, r"gate must be a number in \(0, 1\]"),
    ({"keep": (("layers.0.conv", (2, 1)),)}, "must be a non-empty increasing list"),
    ({"keep": (("layers.0.conv", ()),)}, "must be a non-empty increasing list"),
    ({"keep": (("layers.0.conv", (-1, 0)),)}, "must be a non-empty increasing list"),
    ({"keep": (("a", (0,)), ("a", (1,)))}, "names a channel group twice"),
    ({"name": ""}, "model name must be 1 to 200 characters"),
])
def test_invalid_spec_fields(fields, message):
    with pytest.raises(SpecError, match=message):
        dataclasses.replace(fedp3_cnn(), **fields)


def test_keep_that_does_not_fit_the_model_is_refused():
    spec = fedp3_cnn()
    with pytest.raises(SpecError, match=r"keep names channel group 'layers.9.conv', which model "
                                        r"'fedp3_cnn' does not have \(its groups: .*layers.0.conv"):
        build_model(dataclasses.replace(spec, keep=(("layers.9.conv", (0,)),)))
    with pytest.raises(SpecError, match=r"keep\[layers.0.conv\] names channel 7, the group has 4"):
        build_model(dataclasses.replace(spec, keep=(("layers.0.conv", (0, 7)),)))


@pytest.mark.parametrize("data,message", [
    ({"name": "fedp3_cnn"}, r"malformed model spec \('input_shape'\)"),
    ({"name": "fedp3_cnn", "input_shape": [1, 28, 28], "num_classes": "10"}, "num_classes must hold integers"),
    ({"name": "fedp3_cnn", "input_shape": [1, 28, 28], "num_classes": 10, "keep": [1]},
     "keep must map channel groups to lists"),
    ({"name": "fedp3_cnn", "input_shape": [1, 28, 28], "num_classes": 10, "keep": {"a": ["0"]}},
     r"keep\[a\] must hold integers"),
    ({"name": 5, "input_shape": [1, 28, 28], "num_classes": 10}, "name must be a string"),
    ([1, 2], "a model spec must be an object"),
])
def test_malformed_dict_raises_spec_error(data, message):
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_dict(data)


# --------------------------------------------------------------------------- cost


def test_fedp3_cnn_cost_is_counted_per_sample():
    fp = footprint(fedp3_cnn())
    assert fp.macs == 24 * 24 * 4 * 25 + 8 * 8 * 12 * 4 * 25 + 192 * 1024 + 1024 * 1024 + 1024 * 10
    assert fp.input_elements == 784 and fp.parameters == 1_258_798
    # conv, relu'd and pooled outputs of two conv layers, and the three linear layers' outputs
    assert fp.activation_elements == (24 * 24 * 4 + 12 * 12 * 4) + (8 * 8 * 12 + 4 * 4 * 12) \
        + 1024 + 1024 + 10
    half = footprint(width_spec(fedp3_cnn(), 0.5))
    assert half.macs == 24 * 24 * 2 * 25 + 8 * 8 * 6 * 2 * 25 + 96 * 512 + 512 * 512 + 512 * 10


def test_a_1d_network_with_a_depthwise_conv_is_priced_by_its_operators():
    fp = footprint(model_spec(SIGNAL_CNN, (2, 64), 4))
    # conv 2->12 (k5) over 64, depthwise 12 (k3) over 64, conv 12->24 (k3) over 32, linear 24->4
    assert fp.macs == 64 * 12 * 2 * 5 + 64 * 12 * 3 + 32 * 24 * 12 * 3 + 24 * 4
    assert fp.parameters == (12 * 2 * 5 + 12) + (12 * 3 + 12) + (24 * 12 * 3 + 24) + (24 * 4 + 4)


def test_mobilenet_cost_matches_its_convolutions_and_scales_with_width():
    spec = model_spec(MOBILENET, (1, 28, 28), 10)
    model = build_model(spec, seed=0)
    expected = 0

    def count(module, inputs, output):
        nonlocal expected
        if isinstance(module, nn.Conv2d):
            expected += output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            expected += module.in_features * module.out_features

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(count)
    model(torch.zeros(1, 1, 28, 28))
    assert footprint(spec).macs == expected
    half = footprint(width_spec(spec, 0.5))
    assert 0.2 < half.macs / expected < 0.35  # about a quarter: both sides of most products halve
    assert half.parameters == sum(p.numel() for p in build_model(width_spec(spec, 0.5)).parameters())


@register_model("tm_huge")
def _huge(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 100_000), nn.ReLU(),
                         nn.Linear(100_000, num_classes))


def test_pricing_a_model_allocates_nothing():
    """10 billion parameters (40 GB): priced from the meta device in well under a second."""
    spec = model_spec("tm_huge", (100_000,), 10)
    fp = footprint(spec)
    assert fp.parameters == 100_000 * 100_000 + 100_000 + 100_000 * 10 + 10
    assert fp.macs == 100_000 * 100_000 + 100_000 * 10
