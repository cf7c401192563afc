"""Shared fixtures: the real Fashion-MNIST files, loaded once per test session."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from databases import empty_postgres
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


@pytest.fixture
def fault_matrix(request):
    """Record one row of the fault matrix: the scenario, what happened, and the counts that
    `measure` (tests/test_faults.py) took from the devices' state and the coordinator's database;
    a row takes no number that was not measured.

    Rows go to $FEDPRUNE_FAULT_MATRIX (JSON lines) when set; `benchmarks/fault_matrix.py` sets it,
    runs the fault tests and renders docs/RELIABILITY.md.
    """
    def record(scenario: str, outcome: str, measured) -> None:
        assert type(measured).__name__ == "Measured", "a row takes the counts measure() returned"
        path = os.environ.get("FEDPRUNE_FAULT_MATRIX")
        if path:
            with Path(path).open("a") as handle:
                handle.write(json.dumps({"test": request.node.name, "scenario": scenario,
                                         "outcome": outcome, **dataclasses.asdict(measured)}) + "\n")
    return record


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """The coordinator's database URL: SQLite in the test's folder, then an emptied PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'coordinator.db'}"
        return
    with empty_postgres() as url:
        yield url
