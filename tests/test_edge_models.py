"""Models where device memory and bandwidth bind (issue 12): ResNet-18 and LEAF's FEMNIST CNN.

Parameter counts against the papers' architectures, width slicing for every selection method and
width the planner uses, and one Opacus DP-SGD step (ghost clipping) on the sliced networks.
LEAF's CNN has no normalisation, so its submodels are checked exactly against the global model
with the removed units zeroed (as tests/test_slicing.py does for FedP3's CNN); ResNet-18 uses
GroupNorm, whose group statistics differ in a sliced layer, so it is checked by shapes, index
maps and a working forward and training step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_sdk.data import to_tensor
from edge_sdk.models import MODELS, build_model, model_spec, tensor_shapes
from coordinator.slicing import extract, select_channels, slice_map, to_global
from edge_sdk.slicing import width_spec
from edge_sdk.training import train_locally
from edge_sdk.settings import DPSettings, TrainSettings
from harness.slicing_parity import global_model, load, zero_removed

METHODS = ("prefix", "rolling", "magnitude")
WIDTHS = (1.0, 0.75, 0.5, 0.25, 0.125)

@pytest.fixture(scope="module")
def batch(fmnist):
    return to_tensor(fmnist.test_x[:16], fmnist.info)


# --------------------------------------------------------------------------- architectures


def test_resnet18_is_cifar_resnet18_with_groupnorm():
    spec = model_spec("resnet18", (1, 28, 28), 10)
    assert "resnet18" in MODELS
    kinds = [(layer.kind, layer.out, layer.stride) for layer in spec.layers]
    assert kinds == [("conv", 64, 1),
                     ("resblock", 64, 1), ("resblock", 64, 1),
                     ("resblock", 128, 2), ("resblock", 128, 1),
                     ("resblock", 256, 2), ("resblock", 256, 1),
                     ("resblock", 512, 2), ("resblock", 512, 1),
                     ("gap", 0, 1), ("fc", 10, 1)]
    stem = spec.layers[0]
    assert (stem.kernel, stem.padding, stem.norm, stem.pool) == (3, 1, True, 0)
    model = build_model(spec, seed=0)
    # stem 640 + GN 128; stage 1: 2 x 73,984; stage 2: 229,888 + 295,424;
    # stage 3: 918,528 + 1,180,672; stage 4: 3,672,064 + 4,720,640; fc 5,130
    assert sum(p.numel() for p in model.parameters()) == 11_171_082
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 17


def test_leaf_cnn_is_leafs_femnist_cnn():
    spec = model_spec("leaf_cnn", (1, 28, 28), 62)
    assert "leaf_cnn" in MODELS
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


@pytest.mark.parametrize("method", METHODS)
def test_leaf_cnn_submodel_matches_zeroed_global_model(method, batch):
    spec, state = global_model("leaf_cnn", 62)
    full = load(spec, state)(batch)
    for ratio in WIDTHS:
        kept = select_channels(spec, state, ratio, method, round_number=7)
        sub_spec = width_spec(spec, ratio)
        smap = slice_map(spec, kept)
        sub_state = extract(state, smap)
        assert {k: v.shape for k, v in sub_state.items()} == tensor_shapes(sub_spec)
        zeroed = zero_removed(spec, state, kept)
        with torch.no_grad():
            expected = load(spec, zeroed)(batch)
            got = load(sub_spec, sub_state)(batch)
        assert got.shape == (16, 62)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        if ratio < 1.0:
            assert not torch.allclose(full, expected, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_resnet18_submodels_slice_consistently_and_run(method, batch):
    spec, state = global_model("resnet18", 10)
    for ratio in WIDTHS:
        kept = select_channels(spec, state, ratio, method, round_number=5)
        # identity blocks (1, 2, 4, 6, 8) add their input: they keep exactly its channels
        for block, source in ((1, 0), (2, 0), (4, 3), (6, 5), (8, 7)):
            np.testing.assert_array_equal(kept[block], kept[source])
        for i in (0, 3, 5, 7):
            assert len(kept[i]) == max(1, math.ceil(ratio * spec.layers[i].out))
        sub_spec = width_spec(spec, ratio)
        assert [layer.out for layer in sub_spec.layers[:9]] == \
            [math.ceil(ratio * c) for c in (64, 64, 64, 128, 128, 256, 256, 512, 512)]
        smap = slice_map(spec, kept)
        sub_state = extract(state, smap)
        assert {k: v.shape for k, v in sub_state.items()} == tensor_shapes(sub_spec)
        if ratio == 0.5:  # the upload lands back on exactly the entries it was cut from
            for name, sparse in to_global(sub_state, smap).items():
                np.testing.assert_array_equal(sparse.values, state[name].reshape(-1)[sparse.indices])
        with torch.no_grad():
            out = load(sub_spec, sub_state)(batch[:4])
        assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_rolling_and_magnitude_move_the_resnet_stem_and_its_identity_blocks_together():
    spec, state = global_model("resnet18", 10)
    rolled = select_channels(spec, state, 0.25, "rolling", round_number=60)
    np.testing.assert_array_equal(rolled[0], np.sort((60 + np.arange(16)) % 64))
    np.testing.assert_array_equal(rolled[2], rolled[0])
    magnitude = select_channels(spec, state, 0.25, "magnitude")
    norms = np.linalg.norm(state["layers.0.conv.weight"].reshape(64, -1), axis=1)
    assert norms[magnitude[0]].min() >= np.delete(norms, magnitude[0]).max()
    np.testing.assert_array_equal(magnitude[1], magnitude[0])


# --------------------------------------------------------------------------- DP-SGD on device


@pytest.mark.parametrize("name,classes,ratio,method", [
    ("resnet18", 10, 0.125, "rolling"),
    ("resnet18", 10, 1.0, "prefix"),
    ("leaf_cnn", 62, 0.25, "magnitude"),
])
def test_one_dp_sgd_step_with_ghost_clipping(name, classes, ratio, method, fmnist):
    spec, state = global_model(name, classes)
    sub_spec = width_spec(spec, ratio)
    sub_state = extract(state, slice_map(spec, select_channels(spec, state, ratio, method, 3)))
    model = load(sub_spec, sub_state).train()
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
