"""The submodel plan a strategy hands a device: FedP3's uploads the selected layers and the output
layer, downloads the others pruned to the global keep, keeps the output layer private only with a
personal head, trains only the selected layers when told, and weighs by the layers uploaded;
FedAvg's trains and uploads everything, weighted by samples. A plan survives a round trip through
dict and JSON, finds its tensors by name, and refuses impossible tensor settings."""

from __future__ import annotations

import json

import pytest

from coordinator.strategies.fedavg import FedAvg
from edge_sdk.models import tensor_shapes
from edge_sdk.plan import SubmodelPlan, TensorPlan
from harness.strategies import LAYERS, OUTPUT, SPEC, fedp3, layer_names


@pytest.mark.parametrize("selection", ["lowerb", "opu2", "opu3", "opr2"])
def test_fedp3_plan_uploads_the_selected_layers_and_the_output_layer(selection):
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


def test_fedp3_output_layer_is_private_only_with_a_personal_head():
    plan = fedp3(personal_head=False).plan(0, 0, 10)
    assert all(not t.private for t in plan.tensors)
    assert OUTPUT <= set(plan.uploaded)
    personal = fedp3(personal_head=True).plan(0, 0, 10)
    assert {t.name for t in personal.tensors if t.private} == OUTPUT


def test_fedp3_trains_and_uploads_only_the_selected_layers_when_told():
    strategy = fedp3(selection="opu2", train_layers="selected")
    plan = strategy.plan(3, 0, 50)
    assert set(plan.trained) == layer_names((0, 3)) | OUTPUT
    assert set(plan.uploaded) == set(plan.trained)
    assert not plan.tensor("layers.1.conv.weight").train


@pytest.mark.parametrize("selection,k", [("lowerb", 1), ("opu2", 2), ("opu3", 3), ("opr2", 2)])
def test_fedp3_weighs_by_layers_uploaded_or_equally(selection, k):
    weighted = fedp3(selection=selection, aggregation="weighted")
    mean = fedp3(selection=selection, aggregation="mean")
    for client in range(5):
        assert weighted.plan(client, 1, 999).aggregation_weight == float(k + 1)
        assert mean.plan(client, 1, 999).aggregation_weight == 1.0


def test_fedavg_plan_trains_and_uploads_everything_weighted_by_samples():
    strategy = FedAvg(SPEC)
    plan = strategy.plan(4, 3, num_samples=321)
    names = list(tensor_shapes(SPEC))
    assert sorted(plan.trained) == sorted(names)
    assert sorted(plan.uploaded) == sorted(names)
    assert all(not t.private and t.download_keep == 1.0 and t.local_keep == 1.0 for t in plan.tensors)
    assert plan.aggregation_weight == 321.0
    assert plan.selected_layers == tuple(range(len(LAYERS)))
    assert strategy.plan(5, 3, num_samples=7).aggregation_weight == 7.0


@pytest.mark.parametrize("make", [lambda: fedp3(selection="opr2", global_keep=0.5, local_keep=0.7,
                                                aggregation="weighted").plan(3, 4, 10),
                                  lambda: FedAvg(SPEC, upload_dtype="fp16").plan(1, 2, 77)])
def test_a_submodel_plan_round_trips_through_dict_and_json(make):
    plan = make()
    data = plan.to_dict()
    assert SubmodelPlan.from_dict(data) == plan
    through_json = SubmodelPlan.from_dict(json.loads(json.dumps(data)))
    assert through_json == plan
    assert json.dumps(through_json.to_dict(), sort_keys=True) == json.dumps(data, sort_keys=True)
    assert SubmodelPlan.from_dict(data).spec.digest() == SPEC.digest()


def test_a_submodel_plan_finds_its_tensors_by_name():
    plan = FedAvg(SPEC).plan(0, 0, 1)
    assert plan.tensor("layers.2.linear.weight").name == "layers.2.linear.weight"
    with pytest.raises(KeyError, match="nope"):
        plan.tensor("nope")


def test_a_tensor_plan_refuses_upload_without_training_and_keeps_outside_0_1():
    with pytest.raises(ValueError, match="upload"):
        TensorPlan("w", train=False, upload=True)
    TensorPlan("w", train=False, upload=False)  # a frozen tensor is fine
    for field in ("download_keep", "local_keep"):
        for bad in (0.0, -0.5, 1.5, float("nan")):
            with pytest.raises(ValueError, match=rf"{field} must be in \(0, 1\]"):
                TensorPlan("w", **{field: bad})
        TensorPlan("w", **{field: 1.0})
        TensorPlan("w", **{field: 1e-6})
