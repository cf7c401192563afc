"""FedAvg/FedP3 plans, download building, submodel plans and magnitude pruning.

Uses FedP3's Fashion-MNIST CNN: 4 hidden layers (conv, conv, fc, fc) plus the output layer.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from coordinator.strategies import DownloadBuilder
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.fedp3 import FedP3, FedP3Settings, parse_selection
from edge_sdk import codec
from edge_sdk.models import build_model, layer_tensor_names, model_spec, tensor_shapes
from edge_sdk.plan import SubmodelPlan, TensorPlan
from edge_sdk.pruning import is_prunable, magnitude_mask

SPEC = model_spec("fedp3_cnn", (1, 28, 28), 10)
LAYERS = layer_tensor_names(SPEC)
HIDDEN = 4
OUTPUT = set(LAYERS[-1])


def fedp3(**config):
    seed = config.pop("seed", 0)
    return FedP3(SPEC, FedP3Settings(**config), seed=seed)


def layer_names(indices):
    return {name for i in indices for name in LAYERS[i]}


@pytest.fixture(scope="module")
def global_state():
    model = build_model(SPEC, seed=0)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_model_has_four_hidden_layers():
    assert len(LAYERS) == HIDDEN + 1
    assert fedp3().hidden == HIDDEN


# --------------------------------------------------------------------------- layer selection


def test_lowerb_one_layer_per_client_by_modulo():
    strategy = fedp3(selection="lowerb")
    for client in range(13):
        for rnd in (0, 1, 5):
            assert strategy.selected_layers(client, rnd) == (client % HIDDEN,)


@pytest.mark.parametrize("k", [2, 3])
def test_opu_k_cyclically_consecutive(k):
    strategy = fedp3(selection=f"opu{k}")
    for client in range(12):
        group = client % HIDDEN
        expected = tuple(sorted((group + j) % HIDDEN for j in range(k)))
        assert strategy.selected_layers(client, 0) == expected
        assert strategy.selected_layers(client, 7) == expected  # fixed over rounds
    assert fedp3(selection="opu2").selected_layers(3, 0) == (0, 3)
    assert fedp3(selection="opu2").selected_layers(1, 0) == (1, 2)
    assert fedp3(selection="opu3").selected_layers(2, 0) == (0, 2, 3)
    assert fedp3(selection="opu3").selected_layers(3, 0) == (0, 1, 3)


def test_opr2_random_distinct_deterministic():
    a = fedp3(selection="opr2", seed=11)
    b = fedp3(selection="opr2", seed=11)
    per_round = []
    for rnd in range(20):
        sel = a.selected_layers(5, rnd)
        assert len(sel) == 2 and len(set(sel)) == 2
        assert sel == tuple(sorted(sel))
        assert all(0 <= i < HIDDEN for i in sel)
        assert sel == b.selected_layers(5, rnd) == a.selected_layers(5, rnd)
        per_round.append(sel)
    assert len(set(per_round)) > 1, "OPR must vary across rounds"
    # different clients in the same round are not all forced onto one pair
    assert len({a.selected_layers(c, 3) for c in range(20)}) > 1
    # another seed gives a different sequence
    other = fedp3(selection="opr2", seed=12)
    assert [other.selected_layers(5, r) for r in range(20)] != per_round


@pytest.mark.parametrize("text,expected", [("lowerb", ("lowerb", 1)), ("opu2", ("opu", 2)),
                                           ("OPU3", ("opu", 3)), ("opr2", ("opr", 2)),
                                           ("opu4", ("opu", 4))])
def test_parse_selection_accepts(text, expected):
    assert parse_selection(text, HIDDEN) == expected


def test_parse_selection_rejects_unknown_form():
    for text in ("foo", "opu", "opr", "random2", "lowerb2", ""):
        with pytest.raises(ValueError, match=r"lowerb, opuK or oprK"):
            parse_selection(text, HIDDEN)
    with pytest.raises(ValueError, match=r"lowerb, opuK or oprK"):
        FedP3(SPEC, FedP3Settings(selection="foo"))


@pytest.mark.parametrize("text", ["opu9", "opr5", "opu0"])
def test_parse_selection_rejects_k_out_of_range(text):
    with pytest.raises(ValueError, match=rf"{text}.*between 1 and the {HIDDEN} hidden layers"):
        parse_selection(text, HIDDEN)
    with pytest.raises(ValueError, match=text):
        FedP3(SPEC, FedP3Settings(selection=text))


# --------------------------------------------------------------------------- FedP3 plans


@pytest.mark.parametrize("selection", ["lowerb", "opu2", "opu3", "opr2"])
def test_fedp3_plan_uploads_selected_plus_output(selection):
    strategy = fedp3(selection=selection, global_keep=0.4, local_keep=0.8)
    for client in range(6):
        plan = strategy.plan(client, round_number=2, num_samples=123)
        selected = strategy.selected_layers(client, 2)
        assert plan.selected_layers == selected
        assert plan.device_index == client and plan.round == 2 and plan.spec == SPEC
        assert [t.name for t in plan.tensors] == [n for layer in LAYERS for n in layer]
        assert set(plan.uploaded) == layer_names(selected) | OUTPUT
        assert set(plan.trained) == set(tensor_shapes(SPEC))  # train_layers="all" by default
        for t in plan.tensors:
            assert t.local_keep == 0.8
            if t.name in OUTPUT:
                assert t.private and t.download_keep == 1.0
            elif t.name in layer_names(selected):
                assert t.download_keep == 1.0 and not t.private
            else:
                assert t.download_keep == 0.4 and not t.private and not t.upload


def test_fedp3_output_layer_not_private_without_personal_head():
    plan = fedp3(personal_head=False).plan(0, 0, 10)
    assert all(not t.private for t in plan.tensors)
    assert OUTPUT <= set(plan.uploaded)
    personal = fedp3(personal_head=True).plan(0, 0, 10)
    assert {t.name for t in personal.tensors if t.private} == OUTPUT


def test_fedp3_train_selected_only():
    strategy = fedp3(selection="opu2", train_layers="selected")
    plan = strategy.plan(3, 0, 50)
    assert set(plan.trained) == layer_names((0, 3)) | OUTPUT
    assert set(plan.uploaded) == set(plan.trained)
    assert not plan.tensor("layers.1.conv.weight").train


@pytest.mark.parametrize("selection,k", [("lowerb", 1), ("opu2", 2), ("opu3", 3), ("opr2", 2)])
def test_fedp3_aggregation_weights(selection, k):
    weighted = fedp3(selection=selection, aggregation="weighted")
    mean = fedp3(selection=selection, aggregation="mean")
    for client in range(5):
        assert weighted.plan(client, 1, 999).aggregation_weight == float(k + 1)
        assert mean.plan(client, 1, 999).aggregation_weight == 1.0


def test_fedavg_plan():
    strategy = FedAvg(SPEC)
    plan = strategy.plan(4, 3, num_samples=321)
    names = list(tensor_shapes(SPEC))
    assert sorted(plan.trained) == sorted(names)
    assert sorted(plan.uploaded) == sorted(names)
    assert all(not t.private and t.download_keep == 1.0 and t.local_keep == 1.0 for t in plan.tensors)
    assert plan.aggregation_weight == 321.0
    assert plan.selected_layers == tuple(range(len(LAYERS)))
    assert strategy.plan(5, 3, num_samples=7).aggregation_weight == 7.0


# --------------------------------------------------------------------------- magnitude pruning


@pytest.mark.parametrize("keep", [0.01, 0.1, 0.25, 0.5, 0.77, 0.999, 1.0])
def test_magnitude_mask_keeps_largest(keep):
    rng = np.random.default_rng(3)
    values = rng.normal(size=(37, 11)).astype(np.float32)
    mask = magnitude_mask(values, keep)
    assert mask.shape == values.shape and mask.dtype == np.bool_
    k = math.ceil(keep * values.size)
    assert int(mask.sum()) == k
    kept = np.abs(values[mask])
    dropped = np.abs(values[~mask])
    if dropped.size:
        assert kept.min() >= dropped.max()
    np.testing.assert_array_equal(np.sort(np.abs(values).ravel())[::-1][:k], np.sort(kept)[::-1])


def test_magnitude_mask_signs_and_ties():
    values = np.array([[-5.0, 1.0, 0.0], [0.0, 3.0, -0.5]], dtype=np.float32)
    np.testing.assert_array_equal(magnitude_mask(values, 0.5),
                                  [[True, True, False], [False, True, False]])
    zeros = np.zeros(10, dtype=np.float32)
    first = magnitude_mask(zeros, 0.3)
    assert int(first.sum()) == 3
    np.testing.assert_array_equal(first, magnitude_mask(zeros.copy(), 0.3))  # deterministic on ties


@pytest.mark.parametrize("keep,n", [(0.55, 100), (0.55, 102400), (0.5, 100), (0.3, 10)])
def test_magnitude_mask_count_is_exact_ceil(keep, n):
    # ceil(0.55 * 100) is exactly 55, but in floats 0.55 * 100 == 55.00000000000001, whose ceil is 56.
    values = np.arange(1, n + 1, dtype=np.float32)
    assert int(magnitude_mask(values, keep).sum()) == math.ceil(Fraction(str(keep)) * n)


def test_download_of_fedp3_first_conv_keeps_exact_share(global_state):
    # layers.0.conv.weight has exactly 100 entries: global_keep=0.55 must send 55 of them.
    name = "layers.0.conv.weight"
    assert global_state[name].size == 100
    plan = fedp3(selection="lowerb", global_keep=0.55).plan(1, 0, 10)  # layer 0 not selected
    assert plan.tensor(name).download_keep == 0.55
    builder = DownloadBuilder(global_state, codec.ValueDtype.FLOAT32)
    decoded = codec.decode(builder.payload(plan, device_has_private_copy=True))
    assert decoded[name].nnz == 55


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_magnitude_mask_rejects_bad_keep(keep):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        magnitude_mask(np.ones((4, 4), dtype=np.float32), keep)


def test_is_prunable():
    assert is_prunable((4, 1, 5, 5)) and is_prunable((10, 1024))
    assert not is_prunable((1024,)) and not is_prunable(())


# --------------------------------------------------------------------------- downloads


def test_download_prunes_non_selected_weights(global_state):
    keep = 0.3
    strategy = fedp3(selection="opu2", global_keep=keep)
    plan = strategy.plan(3, 0, 10)  # selects layers 0 and 3
    builder = DownloadBuilder(global_state, codec.ValueDtype.FLOAT32)
    decoded = codec.decode(builder.payload(plan, device_has_private_copy=False),
                           expected_shapes=tensor_shapes(SPEC))
    assert set(decoded) == set(tensor_shapes(SPEC))
    selected = layer_names((0, 3))
    for name, tensor in decoded.items():
        values = global_state[name]
        assert tensor.shape == values.shape
        if name in selected or name in OUTPUT or values.ndim < 2:
            assert tensor.indices is None or tensor.nnz == values.size, name  # dense
            np.testing.assert_array_equal(tensor.to_dense(), values)
        else:
            assert name in layer_names((1, 2))
            assert tensor.nnz == math.ceil(keep * values.size), name
            flat = values.ravel()
            np.testing.assert_array_equal(tensor.values, flat[tensor.indices])
            np.testing.assert_array_equal(np.flatnonzero(magnitude_mask(values, keep)), tensor.indices)
    # the pruned layers' biases are sent dense
    for bias in ("layers.1.conv.bias", "layers.2.linear.bias"):
        assert decoded[bias].nnz == global_state[bias].size
        np.testing.assert_array_equal(decoded[bias].to_dense(), global_state[bias])


def test_download_private_tensors(global_state):
    plan = fedp3(selection="lowerb").plan(1, 0, 10)
    builder = DownloadBuilder(global_state, codec.ValueDtype.FLOAT32)
    with_copy = codec.decode(builder.payload(plan, device_has_private_copy=True))
    without_copy = codec.decode(builder.payload(plan, device_has_private_copy=False))
    assert set(with_copy) == set(tensor_shapes(SPEC)) - OUTPUT
    assert set(without_copy) == set(tensor_shapes(SPEC))
    for name in OUTPUT:
        np.testing.assert_array_equal(without_copy[name].to_dense(), global_state[name])
    # not private: always sent
    shared = fedp3(selection="lowerb", personal_head=False).plan(1, 0, 10)
    assert set(codec.decode(builder.payload(shared, device_has_private_copy=True))) == set(tensor_shapes(SPEC))


def test_download_cache_and_size(global_state):
    builder = DownloadBuilder(global_state, codec.ValueDtype.FLOAT32)
    full = fedp3(selection="opu2", global_keep=1.0)
    a = builder.payload(full.plan(1, 0, 10), device_has_private_copy=True)
    b = builder.payload(full.plan(5, 0, 99), device_has_private_copy=True)  # same group, same plan
    assert a is b
    # with no global pruning every group downloads the same thing, so it is encoded once
    assert builder.payload(full.plan(2, 0, 10), device_has_private_copy=True) is a
    assert builder.payload(full.plan(2, 0, 10), device_has_private_copy=False) is not a
    fedavg = FedAvg(SPEC)
    assert builder.payload(fedavg.plan(0, 0, 3), False) is builder.payload(fedavg.plan(9, 0, 40), False)

    half = fedp3(selection="opu2", global_keep=0.5)
    small = builder.payload(half.plan(1, 0, 10), device_has_private_copy=True)
    assert builder.payload(half.plan(5, 3, 10), device_has_private_copy=True) is small
    other_group = builder.payload(half.plan(2, 0, 10), device_has_private_copy=True)
    assert other_group is not small and other_group != small
    assert len(small) < len(a)
    # the non-selected layers carry about half their weights: well under the dense payload
    dense_non_selected = sum(global_state[n].nbytes for n in layer_names((0, 3)))
    assert len(a) - len(small) > 0.35 * dense_non_selected


# --------------------------------------------------------------------------- plan objects


@pytest.mark.parametrize("make", [lambda: fedp3(selection="opr2", global_keep=0.5, local_keep=0.7,
                                                aggregation="weighted").plan(3, 4, 10),
                                  lambda: FedAvg(SPEC, upload_dtype="fp16").plan(1, 2, 77)])
def test_submodel_plan_round_trip(make):
    plan = make()
    data = plan.to_dict()
    assert SubmodelPlan.from_dict(data) == plan
    through_json = SubmodelPlan.from_dict(json.loads(json.dumps(data)))
    assert through_json == plan
    assert json.dumps(through_json.to_dict(), sort_keys=True) == json.dumps(data, sort_keys=True)
    assert SubmodelPlan.from_dict(data).spec.digest() == SPEC.digest()


def test_submodel_plan_tensor_lookup():
    plan = FedAvg(SPEC).plan(0, 0, 1)
    assert plan.tensor("layers.2.linear.weight").name == "layers.2.linear.weight"
    with pytest.raises(KeyError, match="nope"):
        plan.tensor("nope")


def test_tensor_plan_validation():
    with pytest.raises(ValueError, match="upload"):
        TensorPlan("w", train=False, upload=True)
    TensorPlan("w", train=False, upload=False)  # a frozen tensor is fine
    for field in ("download_keep", "local_keep"):
        for bad in (0.0, -0.5, 1.5, float("nan")):
            with pytest.raises(ValueError, match=rf"{field} must be in \(0, 1\]"):
                TensorPlan("w", **{field: bad})
        TensorPlan("w", **{field: 1.0})
        TensorPlan("w", **{field: 1e-6})
