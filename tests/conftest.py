"""Shared fixtures: the real Fashion-MNIST files (loaded once per test session), a trained FedP3
checkpoint and its export bundle (built once per session, on first use), a real Mosquitto per test
module, the coordinator's databases, and the fault matrix's recorder. The helpers they are built
on are in tests/harness/."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

# Torch's OpenMP threads spin between parallel regions unless told to sleep, and the runtime reads
# the policy once, when torch loads it (below). Two xdist workers of two threads each, plus the
# processes tests start, are more threads than the 2 cores: spinning threads then burn the cores
# the others wait for (on a loaded 2-core machine a 3-round simulation took 45 s of CPU spinning,
# 8 s sleeping; same accuracies). Processes the tests start inherit it; the memory rehearsals
# already run so (coordinator/planning/model_memory.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from edge_sdk.data import load_dataset, make_client_data
from harness.brokers import running_mosquitto
from harness.databases import empty_postgres


@pytest.fixture(scope="session")
def fmnist():
    return load_dataset("fashion-mnist")


@pytest.fixture(scope="session")
def femnist():
    return load_dataset("femnist")


@pytest.fixture(scope="session")
def fmnist_clients(fmnist):
    """10 clients on FedP3's S1 partition (5 consecutive classes each)."""
    return make_client_data(fmnist, 10, "classes:5", seed=0)


@pytest.fixture(scope="session")
def trained(fmnist, tmp_path_factory):
    """A FedP3 CNN trained for one pass over 12,000 images (about 80% test accuracy), as a saved
    global checkpoint of round 7."""
    from edge_sdk.checkpoint import Checkpoint
    from edge_sdk.data import to_tensor
    from edge_sdk.models import build_model, model_spec

    torch.manual_seed(0)
    spec = model_spec("fedp3_cnn", (1, 28, 28), 10)
    model = build_model(spec, seed=0)
    x, y = to_tensor(fmnist.train_x[:12000], fmnist.info), torch.tensor(fmnist.train_y[:12000])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for start in range(0, len(x), 64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[start:start + 64]), y[start:start + 64]).backward()
        opt.step()
    checkpoint = Checkpoint(spec, dict(model.state_dict()), "fedp3_cnn", "fashion-mnist",
                            round=7)
    checkpoint.save(tmp_path_factory.mktemp("ckpt") / "global.pt")
    return checkpoint


@pytest.fixture(scope="session")
def full_bundle(trained, tmp_path_factory):
    """`trained` exported for device "pi-12": ONNX and TFLite at fp32, fp16 and int8."""
    from coordinator.exporting import export_checkpoint

    out = tmp_path_factory.mktemp("full")
    export_checkpoint(trained, out, precisions=("fp32", "fp16", "int8"), device_id="pi-12")
    return out


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _own_config_home(tmp_path_factory):
    """`fedprune coordinator provision` keeps a fleet's secrets in $XDG_CONFIG_HOME/fedprune/
    unless told otherwise: a test (or a command it runs) never writes into the user's own."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config-home")))
    yield
    patch.undo()


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


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A real Mosquitto (the shipped configuration on a free port) shared by one test module."""
    with running_mosquitto(tmp_path_factory.mktemp("broker")) as mosquitto:
        yield mosquitto


@pytest.fixture
def sqlite_url(tmp_path):
    """The coordinator's database on SQLite in the test's folder, for tests whose subject does
    not depend on the database."""
    return f"sqlite:///{tmp_path / 'coordinator.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """The coordinator's database URL: SQLite in the test's folder, then an emptied PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'coordinator.db'}"
        return
    with empty_postgres() as url:
        yield url
