"""The Ray backend: a Ray actor per simulated device, on a Ray cluster.

A device's state persists across rounds (its private tensors, HideNseek scores, DP ledger and
noise multiplier), so it lives in an actor that holds the device's `LocalClient` for the whole run;
the driver sends each round's task (the plan and the encoded download, as the broker would) and
takes back the outcome. Each actor asks Ray for the device's resources: a CPU share in
proportion to its profile's cores, and memory = its plan's predicted peak (a planned fleet), so an
unequal fleet is placed with unequal resources. The data is not sent from the driver: one
`NodeData` actor per node reads the dataset from that node's disk and partitions it once, and every
device actor on the node takes its shard from there (through the node's object store).

A user's model or data source named as `package.module:function` in the run's config is imported
in each worker as the driver imported it: the config folders it came from go on the workers'
PYTHONPATH (every node must see the project folder at the same path, as it sees the data) and
each device actor allows the run's model as the driver's config did.

Imported only when `backend = "ray"` is chosen: the in-process path never imports ray.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from edge_sdk.client import LocalClient
from edge_sdk.data import ClientData
from edge_sdk.data.sources import DataSettings, federated_data
from edge_sdk.models import ModelSpec, allow_reference
from edge_sdk.references import REFERENCE, reference_folders

from ..rounds import Task
from .base import (
    DeviceResources,
    FleetSetup,
    Pending,
    SimulationBackend,
    TaskRun,
    evaluate_device,
    global_model,
    privacy_entry,
    run_device_task,
)

# A device's memory request when the run has no fleet (nothing known of the device): about a
# worker process with torch loaded and a small model training.
DEFAULT_MEMORY_BYTES = 512 * 2**20
# How long building the devices may wait for Ray to place them and load their data.
STARTUP_TIMEOUT_SECONDS = 600.0
_CPU_STEP = 1e-4  # Ray's resource granularity


@ray.remote(num_cpus=0)
class NodeData:
    """One node's copy of the run's data: read from this node's disk and partitioned once."""

    def __init__(self, data: DataSettings, clients: int, partition: str, seed: int,
                 max_client_samples: int | None, groups: tuple[int, ...] | None):
        self._args = (data, clients, partition, seed, groups)
        self._cap = max_client_samples
        self._shards: list[ClientData] | None = None
        self.loads = 0

    def shard(self, device_index: int) -> ClientData:
        if self._shards is None:
            self._shards = federated_data(*self._args).shards
            self.loads += 1
        return self._shards[device_index].capped(self._cap)

    def load_count(self) -> int:
        return self.loads


@ray.remote
class DeviceActor:
    """One simulated device: its `LocalClient`, for the whole run."""

    def __init__(self, threads: int, references: tuple[str, ...]):
        torch.set_num_threads(threads)
        for reference in references:  # the run's own models, as its config allowed them
            allow_reference(reference)
        self.node = ray.get_runtime_context().get_node_id()
        self.local: LocalClient | None = None

    def load(self, data: Any, device_index: int, train, dp, planned_rounds: int, seed: int,
             selection_rate: float) -> str:
        shard = ray.get(data.shard.remote(device_index))
        self.local = LocalClient(shard, train, dp, planned_rounds=planned_rounds, seed=seed,
                                 selection_rate=selection_rate)
        _warm_up()
        return self.node

    def run(self, task: Task, payload: bytes) -> TaskRun:
        return run_device_task(self.local, task, payload, None, self.node)

    def evaluate(self, model: tuple[ModelSpec, dict[str, np.ndarray]]) -> tuple[float, float]:
        return evaluate_device(self.local, global_model(*model), None)

    def epsilon(self) -> float:
        return self.local.ledger.epsilon()

    def privacy(self) -> dict[str, Any]:
        return privacy_entry(self.local)

    def client(self) -> LocalClient:
        return self.local


def _worker_environment() -> dict[str, Any]:
    """Actor options that put the folders of the config's references on the workers' import
    path (none without references: a runtime environment costs each worker a start)."""
    folders = reference_folders()
    if not folders:
        return {}
    path = os.pathsep.join([*folders, *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"runtime_env": {"env_vars": {"PYTHONPATH": path}}}


def _warm_up() -> None:
    """What a process's first optimizer step imports (torch._dynamo, sympy: about a second of
    CPU), paid while the devices are built rather than inside each device's first task."""
    with torch.random.fork_rng(devices=[]):
        weight = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([weight], lr=0.1)
        weight.sum().backward()
        optimizer.step()


@dataclass(frozen=True)
class Placement:
    """Where a device runs and what it holds there."""

    node: str
    num_cpus: float
    memory_bytes: int


@dataclass(frozen=True)
class NodeCapacity:
    node: str
    cpus: float
    memory_bytes: int


def cpu_shares(resources: Sequence[DeviceResources]) -> list[float]:
    """Each device's CPU share before fitting: its cores over the fleet's most (1.0 for the
    largest device; all 1.0 when no device says)."""
    cores = [r.cpu_cores for r in resources]
    if any(c is None for c in cores):
        return [1.0] * len(resources)
    most = max(cores)
    return [c / most for c in cores]


def place_devices(resources: Sequence[DeviceResources], nodes: Sequence[NodeCapacity],
                  default_memory: int = DEFAULT_MEMORY_BYTES) -> list[Placement]:
    """Every device on a node, all at once (devices stay for the whole run): CPU shares in
    proportion to cores, scaled down together until the fleet fits the cluster; memory as
    requested (never scaled: a device's planned peak is what it needs). Largest devices first,
    each on the node with the most CPU left where it fits, so devices spread over the nodes."""
    memory = [r.memory_bytes or default_memory for r in resources]
    usable = [n for n in nodes if n.cpus > 0]
    if not usable:
        raise RuntimeError("the Ray cluster has no node with a CPU")
    if any(m > max(n.memory_bytes for n in usable) for m in memory) or \
            sum(memory) > sum(n.memory_bytes for n in usable):
        raise RuntimeError(
            f"the devices' memory ({sum(memory) / 2**30:.1f} GiB in all, up to "
            f"{max(memory) / 2**30:.2f} GiB one) does not fit the Ray cluster's "
            f"({sum(n.memory_bytes for n in usable) / 2**30:.1f} GiB over {len(usable)} nodes "
            "with CPUs): add nodes or simulate fewer devices")
    shares = cpu_shares(resources)
    scale = min(1.0, sum(n.cpus for n in usable) / sum(shares))
    order = sorted(range(len(shares)), key=lambda i: (-shares[i], -memory[i], i))
    while scale * min(shares) >= _CPU_STEP:
        cpus = [max(_CPU_STEP, math.floor(s * scale / _CPU_STEP) * _CPU_STEP) for s in shares]
        left = {n.node: [n.cpus, n.memory_bytes] for n in usable}
        chosen: dict[int, str] = {}
        for i in order:
            fits = [n.node for n in usable
                    if left[n.node][0] >= cpus[i] - 1e-9 and left[n.node][1] >= memory[i]]
            if not fits:
                break
            node = max(fits, key=lambda name: left[name][0])
            left[node][0] -= cpus[i]
            left[node][1] -= memory[i]
            chosen[i] = node
        else:
            return [Placement(chosen[i], round(cpus[i], 4), memory[i]) for i in range(len(shares))]
        scale *= 0.9
    raise RuntimeError("the devices cannot be placed on the Ray cluster's nodes (memory)")


def cluster_nodes() -> list[NodeCapacity]:
    return [NodeCapacity(n["NodeID"], float(n["Resources"].get("CPU", 0.0)),
                         int(n["Resources"].get("memory", 0)))
            for n in ray.nodes() if n.get("Alive")]


@dataclass
class _Remote(Pending):
    device_index: int
    ref: Any


class RayBackend(SimulationBackend):
    name = "ray"

    def __init__(self, setup: FleetSetup, shards: Sequence[ClientData]):
        super().__init__()
        started = time.perf_counter()
        self.address = setup.ray_address
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            try:
                ray.init(address=setup.ray_address, include_dashboard=False,
                         logging_level="WARNING", configure_logging=True)
            except ConnectionError as exc:
                raise ConnectionError(
                    f"{exc}. A cluster started with `ray start` asks for its token by default: "
                    "run with RAY_AUTH_MODE=token and the head's token (its ~/.ray/auth_token, "
                    "or RAY_AUTH_TOKEN)") from None
        self.threads = setup.threads or torch.get_num_threads()
        self.placements = place_devices(setup.resources, cluster_nodes())
        environment = _worker_environment()
        self._data = {node: NodeData.options(
                          scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                          **environment)
                      .remote(setup.data, setup.clients, setup.partition, setup.seed,
                              setup.max_client_samples, setup.groups)
                      for node in dict.fromkeys(p.node for p in self.placements)}
        self._actors = [DeviceActor.options(
                            num_cpus=p.num_cpus, memory=p.memory_bytes,
                            scheduling_strategy=NodeAffinitySchedulingStrategy(p.node, soft=False),
                            **environment)
                        .remote(self.threads, (setup.model,) if REFERENCE.match(setup.model) else ())
                        for p in self.placements]
        loading = [actor.load.remote(self._data[p.node], i, setup.train, setup.dp,
                                     setup.planned_rounds, setup.seed, setup.selection_rate)
                   for i, (actor, p) in enumerate(zip(self._actors, self.placements))]
        try:
            self._homes = ray.get(loading, timeout=STARTUP_TIMEOUT_SECONDS)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(f"Ray did not start the {len(self._actors)} device actors within "
                               f"{STARTUP_TIMEOUT_SECONDS:.0f} s: is another job holding the "
                               "cluster's CPUs or memory?") from None
        self._has_model = [False] * len(self._actors)
        self._round_payloads: dict[int, tuple[bytes, Any]] = {}
        self._task_nodes: list[set[str]] = [set() for _ in self._actors]
        self.timing.startup = time.perf_counter() - started

    def has_model(self, device_index: int) -> bool:
        return self._has_model[device_index]

    def submit(self, device_index: int, task: Task, payload: bytes) -> Pending:
        self.timing.tasks += 1
        return _Remote(device_index, self._actors[device_index].run.remote(task,
                                                                          self._shared(payload)))

    def _shared(self, payload: bytes) -> Any:
        """The download in the object store once per round however many devices are sent the
        same bytes (FedAvg: all of them); the actor receives the bytes."""
        if id(payload) not in self._round_payloads:
            self._round_payloads[id(payload)] = (payload, ray.put(payload))
        return self._round_payloads[id(payload)][1]

    def result(self, pending: Pending) -> TaskRun:
        assert isinstance(pending, _Remote)
        started = time.perf_counter()
        run: TaskRun = ray.get(pending.ref)
        self.timing.waiting += time.perf_counter() - started
        self.timing.task_cpu += run.cpu_seconds
        self._has_model[pending.device_index] = run.has_model
        self._task_nodes[pending.device_index].add(run.node)
        return run

    def evaluate(self, spec: ModelSpec, state: dict[str, np.ndarray],
                 model: torch.nn.Module) -> list[tuple[float, float]]:
        started = time.perf_counter()
        self._round_payloads.clear()  # the round's tasks are all answered
        shared = ray.put((spec, {k: np.asarray(v) for k, v in state.items()}))
        scores = ray.get([actor.evaluate.remote(shared) for actor in self._actors])
        self.timing.evaluating += time.perf_counter() - started
        return scores

    def epsilon(self, device_index: int) -> float:
        return ray.get(self._actors[device_index].epsilon.remote())

    def privacy(self) -> list[dict[str, Any]]:
        return ray.get([actor.privacy.remote() for actor in self._actors])

    def clients(self) -> Sequence[LocalClient]:
        return ray.get([actor.client.remote() for actor in self._actors])

    def report(self) -> dict[str, Any]:
        loads = ray.get([data.load_count.remote() for data in self._data.values()])
        return {
            "name": self.name, "address": self.address, "threads_per_device": self.threads,
            "nodes": [{"node": node, "data_loads": n,
                       "devices": [i for i, p in enumerate(self.placements) if p.node == node]}
                      for node, n in zip(self._data, loads)],
            "devices": [{"client": i, "node": p.node, "num_cpus": p.num_cpus,
                         "memory_bytes": p.memory_bytes, "task_nodes": sorted(seen)}
                        for i, (p, seen) in enumerate(zip(self.placements, self._task_nodes))],
            "timing": {"startup_seconds": self.timing.startup,
                       "waiting_seconds": self.timing.waiting,
                       "evaluating_seconds": self.timing.evaluating,
                       "task_cpu_seconds": self.timing.task_cpu, "tasks": self.timing.tasks},
        }

    def close(self) -> None:
        for actor in [*getattr(self, "_actors", []), *getattr(self, "_data", {}).values()]:
            ray.kill(actor)
        self._actors, self._data = [], {}
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()
