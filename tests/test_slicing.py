"""Width-sliced submodels (edge_sdk/slicing.py, coordinator/slicing.py, edge_sdk/models/width.py):
selection of the kept channels per channel group, the index map, extraction and merging back.

The parity test is the one that matters: zeroing the producing weights and biases of every dropped
channel makes the global network compute exactly what the sliced one does (ReLU(0) = 0 and
max-pool of zeros is zero, so dropped channels feed nothing forward), so equal logits prove the
index map consistent across every connection, the conv -> fc flatten included. That holds only
without normalisation (a GroupNorm's statistics change with its width); networks with it are
checked by round trips through the index map and a working forward pass.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from coordinator.aggregation import StreamingAggregator
from coordinator.slicing import extract, select_keep, slice_map, to_global, width_slice
from edge_sdk.codec import SparseTensor
from edge_sdk.data import to_tensor
from edge_sdk.models import ModelSpec, build_model, model_spec, register_model, tensor_shapes
from edge_sdk.models.layered import LayeredNet, LayerSpec
from edge_sdk.models.width import group_sizes, sliced_width
from edge_sdk.slicing import width_spec
from harness.models import MOBILENET
from harness.slicing_parity import global_model, load, zero_removed

METHODS = ("magnitude", "prefix", "rolling")
RATIOS = (0.25, 0.5, 0.75)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # a benchmark shares the machine; these networks are small


@pytest.fixture(scope="module")
def batch(fmnist):
    return to_tensor(fmnist.test_x[:64], fmnist.info)


def logits(spec: ModelSpec, state: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load(spec, state)(x)


def kept_rows(smap, name: str) -> np.ndarray:
    """The output channels of the full tensor `name` that the submodel's tensor holds."""
    index, shape = smap[name], smap.global_shapes[name]
    return np.unique(index.reshape(-1) // math.prod(shape[1:]))


def mlp_factory(*widths: int):
    """A plain nn.Sequential MLP over any input shape: tensors '1.weight', '3.weight', ..."""
    def build(input_shape, num_classes):
        layers: list[nn.Module] = [nn.Flatten()]
        features = math.prod(input_shape)
        for width in widths:
            layers += [nn.Linear(features, width), nn.ReLU()]
            features = width
        return nn.Sequential(*layers, nn.Linear(features, num_classes))
    return build


register_model("ts_toy10")(mlp_factory(10))
register_model("ts_toy5")(mlp_factory(5))
register_model("ts_toy2")(mlp_factory(6, 5))
register_model("ts_merge")(mlp_factory(8, 8))


def toy_spec(hidden: int = 10) -> ModelSpec:
    return model_spec(f"ts_toy{hidden}", (4,), 2)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["fedp3_cnn", "mlp"])
@pytest.mark.parametrize("method", METHODS)
def test_submodel_matches_zeroed_global_model(name, method, batch):
    spec, state = global_model(name)
    full = logits(spec, state, batch)
    for ratio in RATIOS:
        sub = select_keep(spec, state, ratio, method, round_number=7)
        smap = slice_map(sub)
        sub_state = extract(state, smap)
        assert {k: v.shape for k, v in sub_state.items()} == tensor_shapes(sub)
        expected = logits(spec, zero_removed(sub, state), batch)
        got = logits(sub, sub_state, batch)
        assert got.shape == (64, 10)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        # removing channels must actually change the network, or the check above proves nothing
        assert not torch.allclose(full, expected, atol=1e-3)


@pytest.mark.parametrize("name", ["resnet_small", MOBILENET])
@pytest.mark.parametrize("method", METHODS)
def test_normalised_submodels_round_trip_and_run(name, method, batch):
    spec, state = global_model(name)
    for ratio in RATIOS:
        sub = select_keep(spec, state, ratio, method, round_number=5)
        smap = slice_map(sub)
        sub_state = extract(state, smap)
        assert {k: v.shape for k, v in sub_state.items()} == tensor_shapes(sub)
        # the upload lands back on exactly the entries it was cut from, each entry once
        update = to_global(sub_state, smap)
        assert set(update) == set(state)
        for tensor, sparse in update.items():
            assert sparse.shape == state[tensor].shape
            assert len(np.unique(sparse.indices)) == sparse.indices.size == sub_state[tensor].size
            np.testing.assert_array_equal(sparse.values, state[tensor].reshape(-1)[sparse.indices])
        out = logits(sub, sub_state, batch)
        assert out.shape == (64, 10) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- channel groups


def test_a_residual_add_keeps_the_same_channels_on_both_sides():
    spec, state = global_model("resnet_small")
    sub = select_keep(spec, state, 0.5, "rolling", round_number=5)
    keep = dict(sub.keep)
    smap = slice_map(sub)
    # block 1 (16 -> 16, stride 1) adds its input, the stem's output: one group, rooted at the stem
    stem = np.array(keep["layers.0.conv"])
    np.testing.assert_array_equal(stem, np.sort((5 + np.arange(8)) % 16))
    for tensor in ("layers.0.conv.weight", "layers.0.norm.weight", "layers.1.conv2.weight",
                   "layers.1.norm2.weight"):
        np.testing.assert_array_equal(kept_rows(smap, tensor), stem, err_msg=tensor)
    # block 2 adds its own 1x1 shortcut: its conv2 and shortcut are one group, apart from conv1's
    shortcut = kept_rows(smap, "layers.2.shortcut.weight")
    np.testing.assert_array_equal(kept_rows(smap, "layers.2.conv2.weight"), shortcut)
    np.testing.assert_array_equal(shortcut, keep["layers.2.shortcut"])
    np.testing.assert_array_equal(kept_rows(smap, "layers.2.conv1.weight"), keep["layers.2.conv1"])


def test_mobilenet_depthwise_follows_its_expansion_and_adds_stay_aligned():
    spec, state = global_model(MOBILENET)
    sub = select_keep(spec, state, 0.5, "magnitude")
    smap = slice_map(sub)
    # block 2 (16 -> 24, stride 2): 1x1 expansion to 64, depthwise over those 64, 1x1 projection
    expansion = kept_rows(smap, "features.2.conv.0.0.weight")
    assert expansion.size == 32
    np.testing.assert_array_equal(kept_rows(smap, "features.2.conv.1.0.weight"), expansion)
    np.testing.assert_array_equal(kept_rows(smap, "features.2.conv.1.1.weight"), expansion)
    # block 3 (24 -> 24, stride 1) adds block 2's output: both projections keep the same channels
    np.testing.assert_array_equal(kept_rows(smap, "features.3.conv.2.0.weight"),
                                  kept_rows(smap, "features.2.conv.2.0.weight"))
    # groups: the stem with block 1 (no expansion: its depthwise reads the stem, its add returns
    # to it), four expansions, two pairs of added projections, the last 1x1 conv; not the head
    assert {group for group, _ in sub.keep} == {group for group, _ in group_sizes(spec)}
    assert sorted(size for _, size in group_sizes(spec)) == [16, 24, 32, 64, 64, 96, 96, 128]
    stem = kept_rows(smap, "features.0.0.weight")
    for tensor in ("features.1.conv.0.0.weight", "features.1.conv.1.0.weight"):
        np.testing.assert_array_equal(kept_rows(smap, tensor), stem, err_msg=tensor)
    assert smap["classifier.weight"].shape == (10, 32)


OLD_LAYERS = {  # the built-ins as the retired layer-spec API listed them (edge_sdk/models/zoo.py)
    "fedp3_cnn": [LayerSpec("conv", out=4, kernel=5, pool=2), LayerSpec("conv", out=12, kernel=5, pool=2),
                  LayerSpec("fc", out=1024), LayerSpec("fc", out=1024), LayerSpec("fc", out=10, act=False)],
    "resnet_small": [LayerSpec("conv", out=16, kernel=3, padding=1, norm=True),
                     LayerSpec("resblock", out=16), LayerSpec("resblock", out=32, stride=2),
                     LayerSpec("resblock", out=64, stride=2), LayerSpec("gap"),
                     LayerSpec("fc", out=10, act=False)],
}


def old_width_spec(name: str, ratio: float) -> nn.Module:
    """What the retired width_spec built: every hidden layer at ceil(ratio x its width)."""
    layers = [dataclasses.replace(layer, out=sliced_width(layer.out, ratio))
              if layer.act and layer.kind != "gap" else layer for layer in OLD_LAYERS[name]]
    return LayeredNet((1, 28, 28), layers)


@pytest.mark.parametrize("name,ratio", [("resnet_small", 0.5), ("resnet_small", 0.25),
                                        ("resnet_small", 0.375), ("fedp3_cnn", 0.25),
                                        ("fedp3_cnn", 0.5)])
def test_prefix_submodel_of_a_built_in_is_the_old_width_spec(name, ratio):
    spec = model_spec(name, (1, 28, 28), 10)
    sub = width_spec(spec, ratio)
    assert sub.name == spec.name and sub.structure == spec.structure and sub.base == spec
    old = old_width_spec(name, ratio)
    assert tensor_shapes(sub) == {n: tuple(p.shape) for n, p in old.named_parameters()}
    built = build_model(sub, seed=0)
    groups = {n: m.num_groups for n, m in built.named_modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {n: m.num_groups for n, m in old.named_modules() if isinstance(m, nn.GroupNorm)}
    assert all(keep == tuple(range(len(keep))) for _, keep in sub.keep)  # a prefix of every group


def test_width_spec_at_full_width_and_below_one_channel():
    spec = model_spec("mlp", (1, 28, 28), 10)
    assert width_spec(spec, 1.0) == spec
    assert tensor_shapes(width_spec(spec, 0.001)) == {
        "layers.0.linear.weight": (1, 784), "layers.0.linear.bias": (1,),
        "layers.1.linear.weight": (1, 1), "layers.1.linear.bias": (1,),
        "layers.2.linear.weight": (10, 1), "layers.2.linear.bias": (10,)}


# --------------------------------------------------------------------------- size


def test_fedp3_cnn_half_width_parameter_count():
    spec, state = global_model("fedp3_cnn")
    sub = width_spec(spec, 0.5)
    shapes = tensor_shapes(sub)
    assert shapes == {
        "layers.0.conv.weight": (2, 1, 5, 5), "layers.0.conv.bias": (2,),
        "layers.1.conv.weight": (6, 2, 5, 5), "layers.1.conv.bias": (6,),
        "layers.2.linear.weight": (512, 96), "layers.2.linear.bias": (512,),
        "layers.3.linear.weight": (512, 512), "layers.3.linear.bias": (512,),
        "layers.4.linear.weight": (10, 512), "layers.4.linear.bias": (10,),
    }
    total = sum(math.prod(s) for s in shapes.values())
    assert total == 52 + 306 + 49_664 + 262_656 + 5_130 == 317_808
    assert total == sum(p.numel() for p in build_model(sub).parameters())
    smap = slice_map(select_keep(spec, state, 0.5, "prefix"))
    assert total == sum(index.size for index in smap.values())
    full = tensor_shapes(spec)
    for name in ("layers.1.conv.weight", "layers.2.linear.weight", "layers.3.linear.weight"):
        assert math.prod(shapes[name]) * 4 == math.prod(full[name])  # hidden-to-hidden: ratio^2
    assert math.prod(shapes["layers.4.linear.weight"]) * 2 == math.prod(full["layers.4.linear.weight"])


# --------------------------------------------------------------------------- selection


def test_prefix_keeps_first_channels():
    spec, state = global_model("fedp3_cnn")
    sub = select_keep(spec, state, 0.25, "prefix", round_number=9)
    assert {group: list(units) for group, units in sub.keep} == {
        "layers.0.conv": [0], "layers.1.conv": [0, 1, 2], "layers.2.linear": list(range(256)),
        "layers.3.linear": list(range(256))}
    assert sub == width_spec(spec, 0.25)


def test_rolling_window_moves_one_channel_per_round_and_wraps():
    spec = toy_spec(10)
    windows = [list(dict(select_keep(spec, {}, 0.3, "rolling", round_number=r).keep)["1"])
               for r in range(12)]
    assert windows[0] == [0, 1, 2]  # 0.3 * 10 keeps 3, despite 0.3 * 10 > 3 in floating point
    assert windows[1] == [1, 2, 3]
    assert windows[7] == [7, 8, 9]
    assert windows[8] == [0, 8, 9]
    assert windows[9] == [0, 1, 9]
    assert windows[10] == windows[0] and windows[11] == windows[1]


def test_rolling_windows_cover_every_channel_over_rounds():
    spec, state = global_model(MOBILENET)
    sizes = dict(group_sizes(spec))
    seen: dict[str, set[int]] = {group: set() for group in sizes}
    for round_number in range(max(sizes.values())):
        for group, units in select_keep(spec, state, 0.25, "rolling", round_number).keep:
            assert len(units) == sliced_width(sizes[group], 0.25)
            seen[group].update(units)
    assert seen == {group: set(range(size)) for group, size in sizes.items()}


def test_magnitude_keeps_largest_channels_stably():
    spec = toy_spec(5)
    state = {name: np.zeros(shape, dtype=np.float32) for name, shape in tensor_shapes(spec).items()}
    state["1.weight"][:, 0] = [2.0, 5.0, 1.0, 5.0, 5.0]
    state["1.weight"][4, 1] = 0.5  # channel 4 has the largest norm overall
    assert dict(select_keep(spec, state, 0.4, "magnitude").keep)["1"] == (1, 4)  # tie 1 vs 3: first wins
    assert dict(select_keep(spec, state, 0.8, "magnitude").keep)["1"] == (0, 1, 3, 4)
    # a channel is scored over every tensor coupled in its group: its consumer's column too
    state["3.weight"][:, 2] = 10.0
    assert dict(select_keep(spec, state, 0.4, "magnitude").keep)["1"] == (2, 4)


def test_magnitude_on_a_real_model_picks_the_top_group_norms():
    spec, state = global_model("mlp")
    sub = select_keep(spec, state, 0.5, "magnitude")
    keep = dict(sub.keep)
    for group, consumer in (("layers.0.linear", "layers.1.linear"), ("layers.1.linear", "layers.2.linear")):
        score = (state[f"{group}.weight"] ** 2).sum(axis=1) + (state[f"{consumer}.weight"] ** 2).sum(axis=0)
        kept = np.array(keep[group])
        assert score[kept].min() >= np.delete(score, kept).max()
        assert not np.array_equal(kept, np.arange(kept.size))  # not the prefix by accident


# --------------------------------------------------------------------------- index map


def test_to_global_places_sparse_values_at_kept_rows_and_columns():
    spec = model_spec("ts_toy2", (4,), 2)
    sub = select_keep(spec, {}, 0.5, "rolling", round_number=4)
    keep = dict(sub.keep)
    assert keep == {"1": (0, 4, 5), "3": (0, 1, 4)}
    smap = slice_map(sub)
    values = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
    mask = np.array([[True, False, True], [False, True, True], [True, True, False]])
    update = to_global({"3.weight": SparseTensor.from_dense(values, mask),
                        "5.bias": np.array([7.0, 8.0], dtype=np.float32)}, smap)
    dense = update["3.weight"].to_dense(fill=np.nan)
    expected = np.full((5, 6), np.nan, dtype=np.float32)
    expected[np.ix_(keep["3"], keep["1"])] = np.where(mask, values, np.nan)
    np.testing.assert_array_equal(dense, expected)
    np.testing.assert_array_equal(update["5.bias"].indices, [0, 1])


@pytest.mark.parametrize("name", ["fedp3_cnn", "resnet_small", MOBILENET])
def test_index_map_lands_every_value_at_its_global_position(name):
    """Each global entry holds its own flat position; what the submodel extracts is then its index
    map, and to_global puts every value back where it came from."""
    spec, _ = global_model(name)
    positions = {n: np.arange(math.prod(s), dtype=np.float64).reshape(s)
                 for n, s in tensor_shapes(spec).items()}
    sub = select_keep(spec, {}, 0.5, "rolling", round_number=3)
    smap = slice_map(sub)
    cut = extract(positions, smap)
    for tensor, values in cut.items():
        np.testing.assert_array_equal(values, smap[tensor])
        sparse = to_global({tensor: values}, smap)[tensor]
        np.testing.assert_array_equal(sparse.indices, sparse.values.astype(np.int64))


def test_width_slice_is_select_map_and_extract():
    spec, state = global_model("resnet_small")
    sliced = width_slice(spec, state, 0.5, "rolling", round_number=2)
    assert sliced.spec == select_keep(spec, state, 0.5, "rolling", round_number=2)
    assert sliced.smap is slice_map(sliced.spec)
    assert {k: v.shape for k, v in sliced.state.items()} == tensor_shapes(sliced.spec)


def test_extract_and_to_global_refuse_what_does_not_fit():
    spec, state = global_model("mlp")
    smap = slice_map(width_spec(spec, 0.5))
    wrong = dict(state, **{"layers.0.linear.weight": np.zeros((3, 3), dtype=np.float32)})
    with pytest.raises(ValueError, match=r"tensor 'layers.0.linear.weight' has shape \(3, 3\), but "
                                         r"the slice map was built for \(200, 784\)"):
        extract(wrong, smap)
    with pytest.raises(ValueError, match="'gate' is not part of this submodel"):
        to_global({"gate": np.zeros(2)}, smap)
    with pytest.raises(ValueError, match=r"has shape \(200, 784\), the submodel's is \(100, 784\)"):
        to_global({"layers.0.linear.weight": state["layers.0.linear.weight"]}, smap)


# --------------------------------------------------------------------------- merging back


MERGE_SPEC = model_spec("ts_merge", (1, 2, 2), 3)


def merge_global() -> dict[str, np.ndarray]:
    """Small integers, so every mean below is exact in float32."""
    return {name: np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
            for name, shape in tensor_shapes(MERGE_SPEC).items()}


def device_upload(ratio: float, offset: float, state, masks=None, skip=()):
    smap = slice_map(select_keep(MERGE_SPEC, state, ratio, "prefix"))
    trained = {k: v + offset for k, v in extract(state, smap).items() if k not in skip}
    masks = masks or {}
    sub = {k: SparseTensor.from_dense(v, masks[k]) if k in masks else v for k, v in trained.items()}
    return to_global(sub, smap)


def test_merge_half_and_full_width_devices():
    old = merge_global()
    agg = StreamingAggregator(tensor_shapes(MERGE_SPEC))
    agg.add_update(device_upload(0.5, 10.0, old))
    # the full-width device drops columns 6 and 7 of the middle weight and the output bias
    columns = np.broadcast_to(np.arange(8) < 6, (8, 8))
    agg.add_update(device_upload(1.0, 30.0, old, masks={"3.weight": columns}, skip=("5.bias",)))
    new = agg.apply(old)

    cov = np.ones((8, 4), dtype=np.int32)
    cov[:4] = 2
    np.testing.assert_array_equal(agg.coverage("1.weight"), cov)
    np.testing.assert_array_equal(new["1.weight"], old["1.weight"] + np.where(cov == 2, 20, 30))
    np.testing.assert_array_equal(agg.coverage("1.bias"), [2] * 4 + [1] * 4)

    cov = np.zeros((8, 8), dtype=np.int32)
    cov[:, :6] += 1
    cov[:4, :4] += 1
    np.testing.assert_array_equal(agg.coverage("3.weight"), cov)
    shift = np.select([cov == 2, cov == 1], [20.0, 30.0], 0.0)
    np.testing.assert_array_equal(new["3.weight"], old["3.weight"] + shift)
    assert (cov == 0).sum() == 16  # nobody uploaded them: old values kept, checked just above

    cov = np.ones((3, 8), dtype=np.int32)
    cov[:, :4] = 2
    np.testing.assert_array_equal(agg.coverage("5.weight"), cov)
    np.testing.assert_array_equal(agg.coverage("5.bias"), [1, 1, 1])
    np.testing.assert_array_equal(new["5.bias"], old["5.bias"] + 10)


def test_merge_three_nested_widths():
    old = merge_global()
    agg = StreamingAggregator(tensor_shapes(MERGE_SPEC))
    for ratio, offset in ((0.5, 10.0), (1.0, 30.0), (0.25, 50.0)):
        agg.add_update(device_upload(ratio, offset, old))
    new = agg.apply(old)
    cov = np.ones((8, 8), dtype=np.int32)
    cov[:4, :4] = 2
    cov[:2, :2] = 3
    np.testing.assert_array_equal(agg.coverage("3.weight"), cov)
    mean = {1: 30.0, 2: 20.0, 3: 30.0}  # (30), (10+30)/2, (10+30+50)/3
    np.testing.assert_array_equal(new["3.weight"], old["3.weight"] + np.vectorize(mean.get)(cov))
    np.testing.assert_array_equal(agg.coverage("5.bias"), [3, 3, 3])
    np.testing.assert_array_equal(agg.coverage("1.bias"), [3, 3, 2, 2, 1, 1, 1, 1])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_bad_ratio_raises(ratio):
    spec = toy_spec()
    with pytest.raises(ValueError, match=r"width ratio must be a number in \(0, 1\]"):
        width_spec(spec, ratio)
    with pytest.raises(ValueError, match=r"width ratio must be a number in \(0, 1\]"):
        select_keep(spec, {}, ratio, "prefix")


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown selection method 'random'; use one of magnitude, "
                                         "prefix, rolling"):
        select_keep(toy_spec(), {}, 0.5, "random")  # type: ignore[arg-type]


def test_magnitude_without_the_global_state_is_refused():
    with pytest.raises(KeyError, match="magnitude selection needs '1.weight' in the global state"):
        select_keep(toy_spec(), {}, 0.5, "magnitude")
