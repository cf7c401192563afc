"""Shared fixtures: the real Fashion-MNIST files, loaded once per test session."""

from __future__ import annotations

import pytest
import torch

from edge_sdk.data import load_dataset, make_client_data


@pytest.fixture(scope="session")
def fmnist():
    return load_dataset("fashion-mnist")


@pytest.fixture(scope="session")
def fmnist_clients(fmnist):
    """10 clients on FedP3's S1 partition (5 consecutive classes each)."""
    return make_client_data(fmnist, 10, "classes:5", seed=0)


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)
