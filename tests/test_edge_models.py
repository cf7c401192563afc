"""Models where device memory and bandwidth bind (issue 12): ResNet-18 and LEAF's FEMNIST CNN.

Parameter counts against the papers' architectures, width slicing for every selection method at
the widths the planner uses, and one Opacus DP-SGD step (ghost clipping) on the sliced networks,
a MobileNetV2-style module's included. LEAF's CNN has no normalisation, so its submodels are
checked exactly against the global model with the dropped channels' producers zeroed (as
tests/test_slicing.py does for FedP3's CNN); ResNet-18 uses GroupNorm, whose group statistics
differ in a sliced layer, so it is checked by shapes, index maps and a working forward and
training step.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from coordinator.slicing import extract, select_keep, slice_map, to_global
from edge_sdk.data import to_tensor
from edge_sdk.models import build_model, layer_tensor_names, model_names, model_spec, structure, tensor_shapes
from edge_sdk.models.layered import LayeredNet, LayerSpec
from edge_sdk.models.width import group_sizes, sliced_width
from edge_sdk.settings import DPSettings, TrainSettings
from edge_sdk.slicing import width_spec
from edge_sdk.training import train_locally
from harness.models import MOBILENET
from harness.slicing_parity import global_model, load, zero_removed

WIDTHS = (1.0, 0.75, 0.5, 0.25, 0.125)
STAGES = (64, 64, 64, 128, 128, 256, 256, 512, 512)  # ResNet-18's stem and its eight blocks


@pytest.fixture(scope="module")
def batch(fmnist):
    return to_tensor(fmnist.test_x[:16], fmnist.info)


def kept_rows(smap, name: str) -> np.ndarray:
    index, shape = smap[name], smap.global_shapes[name]
    return np.unique(index.reshape(-1) // math.prod(shape[1:]))


# --------------------------------------------------------------------------- architectures


def test_resnet18_is_cifar_resnet18_with_groupnorm():
    spec = model_spec("resnet18", (1, 28, 28), 10)
    assert "resnet18" in model_names()
    model = build_model(spec, seed=0)
    stem = model.layers[0]
    assert (stem.conv.kernel_size, stem.conv.padding, stem.pool) == ((3, 3), (1, 1), None)
    assert isinstance(stem.norm, nn.GroupNorm)
    blocks = [(b.conv1.out_channels, b.conv1.stride[0], b.shortcut is not None) for b in model.layers[1:9]]
    assert blocks == [(64, 1, False), (64, 1, False), (128, 2, True), (128, 1, False),
                      (256, 2, True), (256, 1, False), (512, 2, True), (512, 1, False)]
    # stem 640 + GN 128; stage 1: 2 x 73,984; stage 2: 229,888 + 295,424;
    # stage 3: 918,528 + 1,180,672; stage 4: 3,672,064 + 4,720,640; fc 5,130
    assert sum(p.numel() for p in model.parameters()) == 11_171_082
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 17
    # a residual block is one layer (as the papers count them), the average pool none
    layers = layer_tensor_names(spec)
    assert len(layers) == 10 and structure(spec).head == "layers.10.linear"
    assert structure(spec).fixed == ()


def test_leaf_cnn_is_leafs_femnist_cnn():
    spec = model_spec("leaf_cnn", (1, 28, 28), 62)
    assert "leaf_cnn" in model_names()
    assert tensor_shapes(spec) == {
        "layers.0.conv.weight": (32, 1, 5, 5), "layers.0.conv.bias": (32,),
        "layers.1.conv.weight": (64, 32, 5, 5), "layers.1.conv.bias": (64,),
        "layers.2.linear.weight": (2048, 3136), "layers.2.linear.bias": (2048,),  # 64 x 7 x 7
        "layers.3.linear.weight": (62, 2048), "layers.3.linear.bias": (62,),
    }
    assert sum(p.numel() for p in build_model(spec, seed=0).parameters()) == 6_603_710
    assert sum(math.prod(s) for s in tensor_shapes(model_spec("leaf_cnn", (1, 28, 28), 10)).values()) \
        == 6_497_162


# --------------------------------------------------------------------------- slicing


# One width per method, the same ones the DP step below trains (an index map of these networks
# costs a second; the planner's every width is checked by shapes just below).
LEAF_SLICES = [("prefix", 0.5), ("rolling", 0.125), ("magnitude", 0.25)]
RESNET_SLICES = [("prefix", 0.5), ("rolling", 0.125), ("magnitude", 0.25)]


@pytest.mark.parametrize("method,ratio", LEAF_SLICES)
def test_leaf_cnn_submodel_matches_zeroed_global_model(method, ratio, batch):
    spec, state = global_model("leaf_cnn", 62)
    sub = select_keep(spec, state, ratio, method, round_number=7)
    smap = slice_map(sub)
    sub_state = extract(state, smap)
    assert {k: v.shape for k, v in sub_state.items()} == tensor_shapes(sub)
    with torch.no_grad():
        full = load(spec, state)(batch)
        expected = load(spec, zero_removed(sub, state))(batch)
        got = load(sub, sub_state)(batch)
    assert got.shape == (16, 62)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(full, expected, atol=1e-4)


OLD_RESNET18 = ([LayerSpec("conv", out=64, kernel=3, padding=1, norm=True)]
                + [LayerSpec("resblock", out=c, stride=2 if i in (2, 4, 6) else 1)
                   for i, c in enumerate(STAGES[1:])]
                + [LayerSpec("gap"), LayerSpec("fc", out=10, act=False)])


@pytest.mark.parametrize("ratio", WIDTHS)
def test_resnet18_prefix_submodels_are_the_old_width_spec(ratio):
    """Every width the planner uses has the shapes the retired layer-spec width_spec gave."""
    spec = model_spec("resnet18", (1, 28, 28), 10)
    sub = width_spec(spec, ratio)
    old = LayeredNet((1, 28, 28), [dataclasses.replace(layer, out=sliced_width(layer.out, ratio))
                                   if layer.act and layer.kind != "gap" else layer
                                   for layer in OLD_RESNET18])
    assert tensor_shapes(sub) == {n: tuple(p.shape) for n, p in old.named_parameters()}
    sizes = dict(group_sizes(spec))
    assert {group: len(units) for group, units in sub.keep} == \
        ({} if ratio == 1.0 else {g: sliced_width(c, ratio) for g, c in sizes.items()})


@pytest.mark.parametrize("method,ratio", RESNET_SLICES)
def test_resnet18_submodels_keep_identity_blocks_with_their_input_and_run(method, ratio, batch):
    spec, state = global_model("resnet18", 10)
    sub = select_keep(spec, state, ratio, method, round_number=60)
    keep = dict(sub.keep)
    smap = slice_map(sub)
    # identity blocks add their input: their conv2 keeps exactly the channels that input has
    for block, source in ((1, "layers.0.conv"), (2, "layers.0.conv"), (4, "layers.3.shortcut"),
                          (6, "layers.5.shortcut"), (8, "layers.7.shortcut")):
        np.testing.assert_array_equal(kept_rows(smap, f"layers.{block}.conv2.weight"), keep[source])
        np.testing.assert_array_equal(kept_rows(smap, f"layers.{block}.norm2.weight"), keep[source])
    stem = np.array(keep["layers.0.conv"])
    assert stem.size == sliced_width(64, ratio)
    if method == "rolling":
        np.testing.assert_array_equal(stem, np.sort((60 + np.arange(stem.size)) % 64))
    elif method == "magnitude":
        assert not np.array_equal(stem, np.arange(stem.size))
    sub_state = extract(state, smap)
    assert {k: v.shape for k, v in sub_state.items()} == tensor_shapes(sub)
    # the upload lands back on exactly the entries it was cut from
    for name, sparse in to_global(sub_state, smap).items():
        np.testing.assert_array_equal(sparse.values, state[name].reshape(-1)[sparse.indices])
    with torch.no_grad():
        out = load(sub, sub_state)(batch[:4])
    assert out.shape == (4, 10) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- DP-SGD on device


@pytest.mark.parametrize("name,classes,ratio,method,round_number", [
    ("resnet18", 10, 0.125, "rolling", 60),
    ("leaf_cnn", 62, 0.25, "magnitude", 7),
    (MOBILENET, 10, 0.5, "rolling", 3),
])
def test_one_dp_sgd_step_with_ghost_clipping(name, classes, ratio, method, round_number, fmnist):
    spec, state = global_model(name, classes)
    sub = select_keep(spec, state, ratio, method, round_number)
    model = load(sub, extract(state, slice_map(sub))).train()
    x = to_tensor(fmnist.train_x[:8], fmnist.info)
    y = torch.tensor(np.array(fmnist.train_y[:8]), dtype=torch.long)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report = train_locally(model, x, y, TrainSettings(batch_size=8, lr=0.05), {}, seed=0,
                           dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0), noise_multiplier=1.0)
    assert report.steps == 1 and report.samples > 0 and math.isfinite(report.mean_loss)
    assert report.privacy_history == [(1.0, 1.0, 1)]
    after = model.state_dict()
    assert set(after) == set(before)  # Opacus's wrapper is gone: the plain module again
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # clipped gradient plus noise moves every tensor
