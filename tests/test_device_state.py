"""What a simulated device keeps between tasks: its whole model, or only its private tensors.

Keeping only the private tensors (device_state="private", for thousands of devices) must not
change what a device trains or sends: every task starts its shared tensors from the download.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from coordinator.config import ConfigError, load_config
from coordinator.simulation import run_simulation
from coordinator.strategies import DownloadBuilder
from coordinator.strategies.fedp3 import FedP3, FedP3Settings
from edge_sdk import codec
from edge_sdk.client import LocalClient
from edge_sdk.data import ClientData
from edge_sdk.models import build_model, model_spec, tensor_shapes
from edge_sdk.settings import DPSettings, TrainSettings

logging.getLogger("absl").setLevel(logging.ERROR)

SPEC = model_spec("fedp3_cnn", (1, 28, 28), 10)
HEAD = {"layers.4.linear.weight", "layers.4.linear.bias"}  # FedP3's private head


def small(data: ClientData, n: int = 200) -> ClientData:
    return ClientData(data.device_index, data.train_x[:n], data.train_y[:n], data.test_x[:n],
                      data.test_y[:n])


def rounds_of(client: LocalClient, rounds: int = 3) -> list[bytes]:
    """FedP3 with a private head from a fresh global state each round; the uploads."""
    strategy = FedP3(SPEC, FedP3Settings(selection="lowerb", personal_head=True))
    uploads = []
    for number in range(1, rounds + 1):
        plan = strategy.plan(client.device_index, number, client.num_train)
        state = {k: v.detach().numpy() for k, v in build_model(SPEC, seed=number).state_dict().items()}
        payload = DownloadBuilder(state, codec.ValueDtype.FLOAT32).payload(plan, number > 1)
        torch.manual_seed(number)  # Opacus's Poisson sampling, as the backends seed it
        uploads.append(client.run_task(plan, payload).payload)
    return uploads


@pytest.mark.parametrize("dp", [None, DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)],
                         ids=["no-dp", "dp-fine-tuned"])
def test_a_device_keeping_only_private_tensors_sends_the_same_bytes(fmnist_clients, dp):
    whole, compact = (LocalClient(small(fmnist_clients[0]), TrainSettings(), dp, device_state=state)
                      for state in ("model", "private"))
    assert rounds_of(whole) == rounds_of(compact)
    assert set(compact.state) == HEAD and not compact.started
    assert set(whole.state) == set(tensor_shapes(SPEC))
    if dp is not None:  # the noise-free personal model: its private tensors only
        assert set(compact.personal_state) == HEAD
        assert set(whole.personal_state) == set(tensor_shapes(SPEC))
    for name in HEAD:  # the private tensors themselves are the same
        kept = compact.personal_state if dp is not None else compact.state
        full = whole.personal_state if dp is not None else whole.state
        assert torch.equal(kept[name], full[name])


def test_its_own_model_is_the_global_one_with_its_private_tensors(fmnist_clients):
    client = LocalClient(small(fmnist_clients[1]), TrainSettings(), device_state="private")
    rounds_of(client, 1)
    assert client.personal_model() is None  # nothing to fill the shared tensors from
    base = build_model(SPEC, seed=9)
    own = client.personal_model(base).state_dict()
    for name, value in base.state_dict().items():
        expected = client.state[name] if name in HEAD else value
        assert torch.equal(own[name], expected), name


QUICK = dict(clients=6, fraction=0.5, rounds=2, partition="classes:5", max_client_samples=200)


def simulate(strategy: str, keeps: str) -> dict:
    config = load_config(None, ["train.lr=0.05", f"device_state={keeps}"], strategy=strategy, **QUICK)
    return run_simulation(config, progress=False).to_dict()


@pytest.mark.parametrize("strategy", ["fedavg", "fedper"])
def test_a_simulation_trains_the_same_whichever_state_devices_keep(strategy):
    whole, compact = simulate(strategy, "model"), simulate(strategy, "private")
    for a, b in zip(whole["rounds"], compact["rounds"]):
        assert (a["bytes_up"], a["bytes_down"]) == (b["bytes_up"], b["bytes_down"])
        assert a["global_accuracy"] == b["global_accuracy"]
        assert a["global_device_accuracy"] == b["global_device_accuracy"]
    # Without private tensors a device's own model is the global one; FedPer's keep their heads.
    last = compact["rounds"][-1]
    if strategy == "fedavg":
        assert last["personalized_accuracy"] == last["global_device_accuracy"]
    else:
        assert last["personalized_accuracy"] != last["global_device_accuracy"]
    assert whole["rounds"][-1]["personalized_accuracy"] != last["global_device_accuracy"]
    assert np.isfinite(last["personalized_accuracy"])


def test_what_needs_whole_models_is_refused_with_private_state(tmp_path):
    with pytest.raises(ConfigError, match="export_dir .* needs its whole model"):
        load_config(None, ["device_state=private", f"export_dir={tmp_path}"])
