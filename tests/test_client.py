"""The device's task path: what it trains, keeps private, prunes and uploads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coordinator.strategies import DownloadBuilder
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.fedp3 import FedP3, FedP3Settings
from edge_sdk import codec
from edge_sdk.client import LocalClient, TaskError
from edge_sdk.data import ClientData
from edge_sdk.models import build_model, model_spec, tensor_shapes
from edge_sdk.settings import DPSettings, TrainSettings

SPEC = model_spec("fedp3_cnn", (1, 28, 28), 10)


def small(data: ClientData, n: int = 300) -> ClientData:
    return ClientData(data.device_index, data.train_x[:n], data.train_y[:n], data.test_x[:n],
                      data.test_y[:n])


def global_state(seed: int = 0) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in build_model(SPEC, seed=seed).state_dict().items()}


def test_fedp3_task_uploads_only_selected_layers_and_output(fmnist_clients):
    client = LocalClient(small(fmnist_clients[1]), TrainSettings())
    strategy = FedP3(SPEC, FedP3Settings(selection="opu2"))
    plan = strategy.plan(1, 1, client.num_train)
    state = global_state()
    outcome = client.run_task(plan, DownloadBuilder(state, codec.ValueDtype.FLOAT32).payload(plan, False))
    update = codec.decode(outcome.payload)
    assert set(update) == {"layers.1.conv.weight", "layers.1.conv.bias", "layers.2.linear.weight",
                           "layers.2.linear.bias", "layers.4.linear.weight", "layers.4.linear.bias"}
    # Uploaded values are the trained weights, which moved away from the global ones.
    trained = update["layers.2.linear.weight"].to_dense()
    assert not np.allclose(trained, state["layers.2.linear.weight"])
    assert np.array_equal(trained, client.state["layers.2.linear.weight"].numpy())


def test_private_head_is_kept_from_the_device_not_the_download(fmnist_clients):
    client = LocalClient(small(fmnist_clients[0]), TrainSettings())
    strategy = FedP3(SPEC, FedP3Settings(selection="lowerb", personal_head=True))
    first = strategy.plan(0, 1, client.num_train)
    client.run_task(first, DownloadBuilder(global_state(0), codec.ValueDtype.FLOAT32).payload(first, False))
    head_after_round_1 = client.state["layers.4.linear.weight"].clone()
    second = strategy.plan(0, 2, client.num_train)
    payload = DownloadBuilder(global_state(1), codec.ValueDtype.FLOAT32).payload(second, True)
    assert "layers.4.linear.weight" not in codec.decode(payload)
    client.train_config = TrainSettings(lr=1e-9)  # isolate: the head barely moves in round 2
    client.run_task(second, payload)
    assert torch.allclose(client.state["layers.4.linear.weight"], head_after_round_1, atol=1e-6)


def test_a_fresh_device_refuses_a_task_missing_its_private_tensors(fmnist_clients):
    client = LocalClient(small(fmnist_clients[0]), TrainSettings())
    plan = FedP3(SPEC, FedP3Settings()).plan(0, 1, client.num_train)
    payload = DownloadBuilder(global_state(), codec.ValueDtype.FLOAT32).payload(plan, True)
    with pytest.raises(TaskError, match="no value for 'layers.4.linear"):
        client.run_task(plan, payload)


def test_local_pruning_keeps_pruned_entries_zero_and_does_not_upload_them(fmnist_clients):
    client = LocalClient(small(fmnist_clients[2]), TrainSettings(lr=0.05))
    plan = FedP3(SPEC, FedP3Settings(selection="opu3", local_keep=0.3)).plan(2, 1, client.num_train)
    outcome = client.run_task(plan, DownloadBuilder(global_state(), codec.ValueDtype.FLOAT32).payload(plan, False))
    weight = client.state["layers.3.linear.weight"].numpy()
    numel = weight.size
    assert np.count_nonzero(weight) <= int(np.ceil(0.3 * numel))
    update = codec.decode(outcome.payload)["layers.3.linear.weight"]
    assert update.nnz == int(np.ceil(0.3 * numel))
    assert np.array_equal(np.flatnonzero(weight), np.flatnonzero(update.to_dense()))


def test_globally_pruned_download_arrives_sparse_and_is_not_uploaded(fmnist_clients):
    client = LocalClient(small(fmnist_clients[3]), TrainSettings())
    plan = FedP3(SPEC, FedP3Settings(selection="lowerb", global_keep=0.5, train_layers="selected")
                 ).plan(3, 1, client.num_train)
    payload = DownloadBuilder(global_state(), codec.ValueDtype.FLOAT32).payload(plan, False)
    received = codec.decode(payload)
    assert received["layers.0.conv.weight"].nnz == 50  # 100 weights, keep half
    outcome = client.run_task(plan, payload)
    assert set(codec.decode(outcome.payload)) == {"layers.3.linear.weight", "layers.3.linear.bias",
                                                   "layers.4.linear.weight", "layers.4.linear.bias"}
    # Layers the device does not train stay exactly as received (pruned entries zero).
    assert np.array_equal(client.state["layers.0.conv.weight"].numpy(),
                          received["layers.0.conv.weight"].to_dense())


def test_dp_task_charges_the_ledger_and_stops_when_the_budget_is_spent(fmnist_clients):
    dp = DPSettings(noise_multiplier=2.0, max_grad_norm=1.0, delta=1e-5, epsilon_budget=2.6)
    client = LocalClient(small(fmnist_clients[4], 200), TrainSettings(), dp)
    strategy = FedAvg(SPEC)
    refused_at = None
    for round_number in range(1, 15):
        plan = strategy.plan(4, round_number, client.num_train)
        outcome = client.run_task(plan, DownloadBuilder(global_state(), codec.ValueDtype.FLOAT32).payload(plan, False))
        if outcome.refused:
            refused_at = round_number
            assert "over the device's budget of 2.6" in outcome.refused
            assert outcome.payload is None
            break
        assert outcome.epsilon == pytest.approx(client.ledger.epsilon())
    assert refused_at == 5  # epsilon after rounds 1-4: 1.41, 1.84, 2.19, 2.49; a 5th: 2.76
    assert client.ledger.epsilon() <= 2.6
    steps_per_round = -(-200 // 48)  # 200 local training samples, batch 48
    assert client.ledger.steps == steps_per_round * (refused_at - 1)


def test_upload_in_fp16_is_half_the_bytes(fmnist_clients):
    client = LocalClient(small(fmnist_clients[5]), TrainSettings())
    state = global_state()
    sizes = {}
    for dtype in ("fp32", "fp16"):
        plan = FedAvg(SPEC, upload_dtype=dtype).plan(5, 1, client.num_train)
        outcome = client.run_task(plan, DownloadBuilder(state, codec.ValueDtype.FLOAT32).payload(plan, False))
        sizes[dtype] = len(outcome.payload)
        assert set(codec.decode(outcome.payload, tensor_shapes(SPEC))) == set(tensor_shapes(SPEC))
    assert sizes["fp16"] < 0.6 * sizes["fp32"]
