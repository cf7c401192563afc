"""FedP3's Fashion-MNIST CNN and what the strategy tests build on it.

The CNN has 4 hidden layers (conv, conv, fc, fc) plus the output layer.
"""

from __future__ import annotations

from coordinator.config import load_config
from coordinator.strategies import DownloadBuilder, build_strategy
from coordinator.strategies.fedp3 import FedP3, FedP3Settings
from edge_sdk import codec
from edge_sdk.client import LocalClient
from edge_sdk.models import build_model, layer_tensor_names, model_spec
from edge_sdk.settings import TrainSettings

SPEC = model_spec("fedp3_cnn", (1, 28, 28), 10)
LAYERS = layer_tensor_names(SPEC)
HIDDEN = 4
OUTPUT = set(LAYERS[-1])


def fedp3(**config) -> FedP3:
    """FedP3 on SPEC with these FedP3Settings (and `seed`, default 0)."""
    seed = config.pop("seed", 0)
    return FedP3(SPEC, FedP3Settings(**config), seed=seed)


def layer_names(indices) -> set[str]:
    """The tensor names of these layers of SPEC."""
    return {name for i in indices for name in LAYERS[i]}


def simulation_config(strategy: str, **extra):
    """5 clients on S1 (5 classes each), 3 rounds, 800 samples a client, 2 local epochs."""
    return load_config(None, [], strategy=strategy, clients=5, rounds=3, partition="classes:5",
                       max_client_samples=800, **{"train.local_epochs": 2, "train.lr": 0.05},
                       **extra)


def one_task(strategy_name: str, fmnist_clients, **extra):
    """One task of `strategy_name` for client 0 (200 training images), run by the real client:
    (the strategy, its plan, the client's outcome)."""
    config = simulation_config(strategy_name, **extra)
    strategy = build_strategy(config, SPEC)
    state = strategy.initial_state() or {k: v.detach().numpy()
                                         for k, v in build_model(strategy.spec, seed=0).state_dict().items()}
    plan = strategy.plan(0, 1, 100)
    dtype = codec.ValueDtype.from_name(strategy.download_dtype or "fp32")
    download = DownloadBuilder(state, dtype, strategy.fixed_masks).payload(
        plan, device_has_private_copy=False)
    client = LocalClient(fmnist_clients[0], TrainSettings(batch_size=32, lr=0.05))
    client.data = type(client.data)(0, client.data.train_x[:200], client.data.train_y[:200],
                                    client.data.test_x[:50], client.data.test_y[:50])
    outcome = client.run_task(plan, download)
    return strategy, plan, outcome
