"""Width-sliced submodels (edge_sdk/slicing.py, coordinator/slicing.py): extraction, selection,
and merging back.

The parity test is the one that matters: zeroing the incoming weights and biases of every removed
unit makes the global network compute exactly what the sliced one does (ReLU(0) = 0 and max-pool
of zeros is zero, so removed units feed nothing forward), so equal logits prove the index map is
consistent across every connection, the conv -> fc flatten included.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coordinator.aggregation import StreamingAggregator
from edge_sdk.codec import SparseTensor
from edge_sdk.data import to_tensor
from edge_sdk.models import LayerSpec, ModelSpec, build_model, model_spec, tensor_shapes
from coordinator.slicing import extract, select_channels, slice_map, to_global
from edge_sdk.slicing import width_spec
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




# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["fedp3_cnn", "mlp"])
@pytest.mark.parametrize("method", METHODS)
def test_submodel_matches_zeroed_global_model(name, method, batch):
    spec, state = global_model(name)
    for ratio in RATIOS:
        kept = select_channels(spec, state, ratio, method, round_number=7)
        smap = slice_map(spec, kept)
        sub_spec = width_spec(spec, ratio)
        sub_state = extract(state, smap)
        assert {k: v.shape for k, v in sub_state.items()} == tensor_shapes(sub_spec)
        expected = logits(spec, zero_removed(spec, state, kept), batch)
        got = logits(sub_spec, sub_state, batch)
        assert got.shape == (64, 10)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        # removing units must actually change the network, or the check above proves nothing
        assert not torch.allclose(logits(spec, state, batch), expected, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_resnet_submodel_builds_loads_and_runs(method, batch):
    spec, state = global_model("resnet_small")
    for ratio in RATIOS:
        kept = select_channels(spec, state, ratio, method, round_number=5)
        # block 1 (16 -> 16, stride 1) adds its input: it must keep the stem's channels
        np.testing.assert_array_equal(kept[1], kept[0])
        sub_spec = width_spec(spec, ratio)
        smap = slice_map(spec, kept)
        sub_state = extract(state, smap)
        assert {k: v.shape for k, v in sub_state.items()} == tensor_shapes(sub_spec)
        out = logits(sub_spec, sub_state, batch)
        assert out.shape == (64, 10) and torch.isfinite(out).all()


def test_width_spec_shape_and_name():
    spec = model_spec("resnet_small", (1, 28, 28), 10)
    sub = width_spec(spec, 0.25)
    assert [layer.out for layer in sub.layers] == [4, 4, 8, 16, 0, 10]
    assert sub.layers[4] == spec.layers[4] and sub.layers[-1] == spec.layers[-1]
    assert sub.name == "resnet_small@w0.25"
    assert [layer.out for layer in width_spec(model_spec("mlp", (1, 28, 28), 10), 0.001).layers] == [1, 1, 10]


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
    smap = slice_map(spec, select_channels(spec, state, 0.5, "prefix"))
    assert total == sum(index.size for index in smap.values())
    full = tensor_shapes(spec)
    for name in ("layers.1.conv.weight", "layers.2.linear.weight", "layers.3.linear.weight"):
        assert math.prod(shapes[name]) * 4 == math.prod(full[name])  # hidden-to-hidden: ratio^2
    assert math.prod(shapes["layers.4.linear.weight"]) * 2 == math.prod(full["layers.4.linear.weight"])


# --------------------------------------------------------------------------- selection


def toy_spec(hidden: int = 10) -> ModelSpec:
    return ModelSpec("toy", (1, 1, 4), 2, (LayerSpec("fc", out=hidden), LayerSpec("fc", out=2, act=False)))


def test_prefix_keeps_first_units():
    spec, state = global_model("fedp3_cnn")
    kept = select_channels(spec, state, 0.25, "prefix", round_number=9)
    assert {i: list(v) for i, v in kept.items()} == {
        0: [0], 1: [0, 1, 2], 2: list(range(256)), 3: list(range(256))}


def test_rolling_window_moves_one_unit_per_round_and_wraps():
    spec = toy_spec(10)
    windows = [list(select_channels(spec, {}, 0.3, "rolling", round_number=r)[0]) for r in range(12)]
    assert windows[0] == [0, 1, 2]  # 0.3 * 10 keeps 3, despite 0.3 * 10 > 3 in floating point
    assert windows[1] == [1, 2, 3]
    assert windows[7] == [7, 8, 9]
    assert windows[8] == [0, 8, 9]
    assert windows[9] == [0, 1, 9]
    assert windows[10] == windows[0] and windows[11] == windows[1]


def test_magnitude_keeps_largest_rows_stably():
    spec = toy_spec(5)
    weight = np.zeros((5, 4), dtype=np.float32)
    weight[:, 0] = [2.0, 5.0, 1.0, 5.0, 5.0]
    weight[4, 1] = 0.5  # unit 4 has the largest norm overall
    state = {"layers.0.linear.weight": weight}
    assert list(select_channels(spec, state, 0.4, "magnitude")[0]) == [1, 4]  # tie 1 vs 3: first wins
    assert list(select_channels(spec, state, 0.8, "magnitude")[0]) == [0, 1, 3, 4]


def test_magnitude_on_a_real_model_picks_top_norms():
    spec, state = global_model("fedp3_cnn")
    kept = select_channels(spec, state, 0.5, "magnitude")
    for i, kind in ((1, "conv"), (3, "linear")):
        weight = state[f"layers.{i}.{kind}.weight"]
        norms = np.linalg.norm(weight.reshape(weight.shape[0], -1), axis=1)
        assert norms[kept[i]].min() >= np.delete(norms, kept[i]).max()


# --------------------------------------------------------------------------- index map


def test_to_global_places_sparse_values_at_kept_rows_and_columns():
    spec = ModelSpec("toy2", (1, 1, 4), 2, (LayerSpec("fc", out=6), LayerSpec("fc", out=5),
                                             LayerSpec("fc", out=2, act=False)))
    kept = select_channels(spec, {}, 0.5, "rolling", round_number=4)
    assert list(kept[0]) == [0, 4, 5] and list(kept[1]) == [0, 1, 4]
    smap = slice_map(spec, kept)
    sub = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
    mask = np.array([[True, False, True], [False, True, True], [True, True, False]])
    update = to_global({"layers.1.linear.weight": SparseTensor.from_dense(sub, mask),
                        "layers.2.linear.bias": np.array([7.0, 8.0], dtype=np.float32)}, smap)
    dense = update["layers.1.linear.weight"].to_dense(fill=np.nan)
    expected = np.full((5, 6), np.nan, dtype=np.float32)
    expected[np.ix_(kept[1], kept[0])] = np.where(mask, sub, np.nan)
    np.testing.assert_array_equal(dense, expected)
    np.testing.assert_array_equal(update["layers.2.linear.bias"].indices, [0, 1])


def test_identity_block_must_follow_its_input():
    spec, state = global_model("resnet_small")
    kept = select_channels(spec, state, 0.5, "prefix")
    kept[1] = kept[1] + 1
    with pytest.raises(ValueError, match="identity shortcut"):
        slice_map(spec, kept)


def test_missing_or_extra_layers_are_refused():
    spec = toy_spec(10)
    with pytest.raises(ValueError, match="no kept units"):
        slice_map(spec, {})
    with pytest.raises(ValueError, match="not hidden"):
        slice_map(spec, {0: np.arange(3), 1: np.arange(2)})
    with pytest.raises(ValueError, match="sorted"):
        slice_map(spec, {0: np.array([3, 1])})


# --------------------------------------------------------------------------- merging back


MERGE_SPEC = ModelSpec("merge", (1, 2, 2), 3, (LayerSpec("fc", out=8), LayerSpec("fc", out=8),
                                               LayerSpec("fc", out=3, act=False)))


def merge_global() -> dict[str, np.ndarray]:
    """Small integers, so every mean below is exact in float32."""
    return {name: np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
            for name, shape in tensor_shapes(MERGE_SPEC).items()}


def device_upload(ratio: float, offset: float, state, masks=None, skip=()):
    smap = slice_map(MERGE_SPEC, select_channels(MERGE_SPEC, state, ratio, "prefix"))
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
    agg.add_update(device_upload(1.0, 30.0, old, masks={"layers.1.linear.weight": columns},
                                 skip=("layers.2.linear.bias",)))
    new = agg.apply(old)

    cov = np.ones((8, 4), dtype=np.int32)
    cov[:4] = 2
    np.testing.assert_array_equal(agg.coverage("layers.0.linear.weight"), cov)
    np.testing.assert_array_equal(new["layers.0.linear.weight"],
                                  old["layers.0.linear.weight"] + np.where(cov == 2, 20, 30))
    np.testing.assert_array_equal(agg.coverage("layers.0.linear.bias"), [2] * 4 + [1] * 4)

    cov = np.zeros((8, 8), dtype=np.int32)
    cov[:, :6] += 1
    cov[:4, :4] += 1
    np.testing.assert_array_equal(agg.coverage("layers.1.linear.weight"), cov)
    shift = np.select([cov == 2, cov == 1], [20.0, 30.0], 0.0)
    np.testing.assert_array_equal(new["layers.1.linear.weight"], old["layers.1.linear.weight"] + shift)
    assert (cov == 0).sum() == 16  # nobody uploaded them: old values kept, checked just above

    cov = np.ones((3, 8), dtype=np.int32)
    cov[:, :4] = 2
    np.testing.assert_array_equal(agg.coverage("layers.2.linear.weight"), cov)
    np.testing.assert_array_equal(agg.coverage("layers.2.linear.bias"), [1, 1, 1])
    np.testing.assert_array_equal(new["layers.2.linear.bias"], old["layers.2.linear.bias"] + 10)


def test_merge_three_nested_widths():
    old = merge_global()
    agg = StreamingAggregator(tensor_shapes(MERGE_SPEC))
    for ratio, offset in ((0.5, 10.0), (1.0, 30.0), (0.25, 50.0)):
        agg.add_update(device_upload(ratio, offset, old))
    new = agg.apply(old)
    cov = np.ones((8, 8), dtype=np.int32)
    cov[:4, :4] = 2
    cov[:2, :2] = 3
    np.testing.assert_array_equal(agg.coverage("layers.1.linear.weight"), cov)
    mean = {1: 30.0, 2: 20.0, 3: 30.0}  # (30), (10+30)/2, (10+30+50)/3
    np.testing.assert_array_equal(new["layers.1.linear.weight"],
                                  old["layers.1.linear.weight"] + np.vectorize(mean.get)(cov))
    np.testing.assert_array_equal(agg.coverage("layers.2.linear.bias"), [3, 3, 3])
    np.testing.assert_array_equal(agg.coverage("layers.0.linear.bias"), [3, 3, 2, 2, 1, 1, 1, 1])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan"), True])
def test_bad_ratio_raises(ratio):
    spec = toy_spec()
    with pytest.raises(ValueError, match="ratio"):
        width_spec(spec, ratio)
    with pytest.raises(ValueError, match="ratio"):
        select_channels(spec, {}, ratio, "prefix")


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="method"):
        select_channels(toy_spec(), {}, 0.5, "random")  # type: ignore[arg-type]
