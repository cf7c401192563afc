"""What a simulation backend is: where each simulated device lives and runs its tasks.

The round pipeline (plans, downloads, intake, aggregation, the simulated clock) stays in the
simulator's driver loop (coordinator/simulation.py) whatever the backend; a backend only holds the
devices (their `LocalClient`: data shard, private tensors, HideNseek scores, DP ledger and noise
multiplier) and runs what is asked of one: a task, an evaluation, a look at its ledger.

Both backends run a task through `run_device_task` and evaluate through `evaluate_device`, so a
device computes the same numbers wherever it lives: its torch generator is seeded per task, and it
computes with the same intra-op thread count (oneMKL's GEMM splits its work by thread, so the
thread count changes the last bits of a gradient, hence the bytes of a compressed upload).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_sdk.client import LocalClient, TaskOutcome
from edge_sdk.data.sources import DataSettings
from edge_sdk.models import ModelSpec, build_model
from edge_sdk.settings import DeviceState, DPSettings, TrainSettings

from ..rounds import Task


@dataclass(frozen=True)
class DeviceResources:
    """What a simulated device is: its profile's cores and its plan's predicted peak memory (a
    planned fleet), or nothing known (every device alike)."""

    cpu_cores: int | None = None
    memory_bytes: int | None = None


@dataclass(frozen=True)
class FleetSetup:
    """Everything a backend needs to build the devices where they run: the data is named, not
    sent (a remote backend loads each shard on the device's own node)."""

    data: DataSettings
    clients: int
    partition: str
    seed: int
    max_client_samples: int | None
    train: TrainSettings
    dp: DPSettings | None
    planned_rounds: int
    threads: int | None            # intra-op threads a device computes with (None: the driver's)
    resources: tuple[DeviceResources, ...]
    ray_address: str | None = None
    selection_rate: float = 1.0    # devices per round / devices: sizes a target epsilon's noise
    model: str = ""                # the run's model: a remote worker allows it if it is a reference
    groups: tuple[int, ...] | None = None  # each device's tier, for a tier partition's shards
    device_state: DeviceState = "model"  # what a device keeps between tasks


@dataclass
class TaskRun:
    """A device's answer to one task, and where and how long it ran."""

    outcome: TaskOutcome
    seconds: float
    has_model: bool                # the device now holds a model (its private tensors)
    node: str | None = None
    cpu_seconds: float = 0.0       # the CPU time of the device's process during the task


@dataclass
class BackendTiming:
    """Where a backend's wall-clock time went (seconds): building the devices, the driver
    waiting for task answers, and evaluations."""

    startup: float = 0.0
    waiting: float = 0.0
    evaluating: float = 0.0
    task_cpu: float = 0.0
    tasks: int = 0


class Pending:
    """A submitted task; `SimulationBackend.result` turns it into a `TaskRun`."""


class SimulationBackend(ABC):
    """Holds the devices of one simulation run; built by `coordinator.backends.open_backend`."""

    name: str

    def __init__(self) -> None:
        self.timing = BackendTiming()

    @abstractmethod
    def has_model(self, device_index: int) -> bool:
        """Whether the device holds a model of its own (so keeps its private tensors)."""

    @abstractmethod
    def submit(self, device_index: int, task: Task, payload: bytes) -> Pending:
        """Start the device's task; a backend may run several devices' tasks at once."""

    @abstractmethod
    def result(self, pending: Pending) -> TaskRun:
        """The submitted task's answer (waits for it)."""

    @abstractmethod
    def evaluate(self, spec: ModelSpec, state: dict[str, np.ndarray],
                 model: torch.nn.Module) -> list[tuple[float, float]]:
        """Per device, in device order: (its own model, or the global model when it has none, on
        its test split; the global model on its test split). `model` is the global model built
        from (`spec`, `state`) in the driver."""

    @abstractmethod
    def epsilon(self, device_index: int) -> float:
        """What the device has spent so far (DP runs)."""

    @abstractmethod
    def privacy(self) -> list[dict[str, Any]]:
        """Every device's privacy entry, in device order (DP runs)."""

    @abstractmethod
    def clients(self) -> Sequence[LocalClient]:
        """Every device's client, in device order (exports read their models and test splits)."""

    def report(self) -> dict[str, Any] | None:
        """What the results record about the backend (None: nothing; the in-process default)."""
        return None

    def close(self) -> None:
        """Release what the backend started."""


def task_torch_seed(seed: int, device_index: int, round_number: int) -> int:
    """The seed of torch's global generator during one task: what a task draws from it (Opacus's
    Poisson sampling, a model's throwaway initial weights) then depends on the task alone, not on
    what ran before it in the same process. A stream apart from the client's own task seed."""
    return int(np.random.SeedSequence([seed, device_index, round_number, 0x746F7263])
               .generate_state(1)[0])


@contextmanager
def device_threads(threads: int | None):
    """Compute with `threads` intra-op threads inside the block (None: leave them as they are)."""
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_device_task(client: LocalClient, task: Task, payload: bytes, threads: int | None,
                    node: str | None = None) -> TaskRun:
    """The device runs its task, with the task's training settings, its own seeded generator and
    the run's thread count: the one way both backends run a task."""
    client.train_config = task.train
    with device_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(task_torch_seed(client.seed, client.device_index, task.plan.round))
        started, cpu = time.perf_counter(), time.process_time()
        outcome = client.run_task(task.plan, payload)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return TaskRun(outcome, seconds, client.spec is not None, node, cpu)


def global_model(spec: ModelSpec, state: dict[str, np.ndarray]) -> torch.nn.Module:
    model = build_model(spec, seed=0)
    model.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()})
    return model


def evaluate_device(client: LocalClient, model: torch.nn.Module,
                    threads: int | None) -> tuple[float, float]:
    """(the device's own model, or `model` when it has none; `model`), on its test split. A
    device that keeps only its private tensors is scored with them on `model`; one that holds
    nothing of its own is scored once."""
    with device_threads(threads), torch.random.fork_rng(devices=[]):
        own = client.personal_model(model)
        score = client.evaluate(model)
        return (client.evaluate(own) if own is not None else score), score


def privacy_entry(client: LocalClient) -> dict[str, Any]:
    ledger = client.ledger
    sigma, rate = (ledger.history[0][0], ledger.history[0][1]) if ledger.history else (None, None)
    return {"client": client.device_index, "epsilon": ledger.epsilon(), "delta": ledger.delta,
            "noise_multiplier": sigma, "sample_rate": rate, "steps": ledger.steps,
            "accountant": ledger.accountant}
