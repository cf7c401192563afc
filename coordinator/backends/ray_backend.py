"""The Ray backend: Ray's pooled worker processes run any device's task; the devices' state lives
in Ray's object store between tasks.

A device's state outlives a task (its private tensors, HideNseek scores, DP ledger, FFGG/FedP3
state), but it need not keep a process: each task is a Ray task that takes the device's last
state (an object in the store, by reference), runs it with the round's download, and returns the
new state to the store beside its answer. The driver holds one object reference per device, so
nothing travels through it but the answers. Ray reuses a worker process for task after task (torch
is imported once per worker, not per device), so start-up does not grow with the fleet; at most
as many workers run as the tasks' CPU requests fit on the nodes.

Each task asks Ray for its device's resources: a CPU share in proportion to its profile's cores
(the largest device: one CPU) and memory = its plan's predicted peak (a planned fleet), so an
unequal fleet is simulated with unequal resources and no more devices train at once than the
cluster holds. The data is not sent from the driver: each device has a home node (the nodes take
devices in proportion to their CPUs), where one task (`_load_shards`) reads the dataset from
that node's disk, partitions it once and leaves each of its devices' shards in the node's object
store; a device's tasks prefer its home node (they may run elsewhere when it cannot hold them).

Everything a task reads from the store (its shard, its state, the download, the global model) is
a top-level argument, which Ray fetches before the task starts: a task that called `ray.get`
itself would give its CPU back while it waited, and Ray may start another worker process (its own
torch import) to use it. The states of a large fleet want an object store that holds them: with
100 MB a node, 8 devices' states of FedP3's CNN spilled to disk, and Ray's spill and restore
worker processes took most of each round (docs/BENCHMARKS.md, section 11).

A user's model or data source named as `package.module:function` in the run's config is imported
in each worker as the driver imported it: the config folders it came from go on the workers'
PYTHONPATH (every node must see the project folder at the same path, as it sees the data) and
each task allows the run's model as the driver's config did.

Imported only when `backend = "ray"` is chosen: the in-process path never imports ray.
"""

from __future__ import annotations

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
_CPU_STEP = 1e-4  # Ray's resource granularity


@ray.remote(num_cpus=0)
def _load_shards(data: DataSettings, clients: int, partition: str, seed: int,
                 max_client_samples: int | None, groups: tuple[int, ...] | None,
                 devices: list[int]) -> tuple[Any, ...]:
    """(this node's id, then the shards of `devices`): the dataset read from this node's disk
    and partitioned once. Each shard is an object of its own in this node's store, owned by the
    driver. A task rather than an actor: nothing stays on the node once the shards are there (a
    long-lived actor beside the task workers can make Ray kill idle task workers and start new
    ones, ray-project/ray#27863)."""
    shards = federated_data(data, clients, partition, seed, groups).shards
    return (ray.get_runtime_context().get_node_id(),
            *[shards[i].capped(max_client_samples) for i in devices])


@dataclass(frozen=True)
class RunContext:
    """What every task needs to know of the run, put in the object store once."""

    train: Any
    dp: Any
    planned_rounds: int
    seed: int
    selection_rate: float
    threads: int
    references: tuple[str, ...]     # the run's own model, allowed in each worker as in the driver
    device_state: str               # what a device keeps between tasks (DeviceState)


_warm = False


def _prepare(context: RunContext) -> str:
    """This worker process ready for the run's tasks (once per process: the first optimizer
    step's imports, torch._dynamo and sympy, about a second of CPU); its node's id."""
    global _warm
    for reference in context.references:
        allow_reference(reference)
    if not _warm:
        with torch.random.fork_rng(devices=[]):
            weight = torch.nn.Parameter(torch.zeros(1))
            optimizer = torch.optim.SGD([weight], lr=0.1)
            weight.sum().backward()
            optimizer.step()
        _warm = True
    return ray.get_runtime_context().get_node_id()


def _clients(context: RunContext, shards: Sequence[ClientData],
             states: Sequence[LocalClient | None]) -> list[LocalClient]:
    """The devices as they were after their last tasks (or new), with their shards."""
    clients = []
    for shard, state in zip(shards, states):
        if state is None:
            state = LocalClient(shard, context.train, context.dp,
                                planned_rounds=context.planned_rounds, seed=context.seed,
                                selection_rate=context.selection_rate,
                                device_state=context.device_state)
        state.data = shard
        clients.append(state)
    return clients


def _stored(client: LocalClient) -> LocalClient:
    """What the object store keeps of a device between tasks: everything but its data (its
    shard is an object of its own) and the state its last task started from (only a secure
    aggregation's upload reads it, and the Ray backend does not run those)."""
    client.data, client.started = None, {}
    return client


@ray.remote(num_returns=2)
def _device_task(context: RunContext, shard: ClientData, state: LocalClient | None, task: Task,
                 payload: bytes) -> tuple[TaskRun, LocalClient]:
    node = _prepare(context)
    [client] = _clients(context, [shard], [state])
    run = run_device_task(client, task, payload, context.threads, node)
    return run, _stored(client)


@ray.remote
def _device_pass(context: RunContext, what: str, stored: list[bool],
                 model: tuple[ModelSpec, dict[str, np.ndarray]] | None, *objects: Any) -> list[Any]:
    """`what` for each device of a chunk: its evaluation against the global `model`, its
    privacy entry, or its client with its shard (for the run's end). `objects`: the chunk's
    shards, then the states of the devices that have one (`stored`)."""
    _prepare(context)
    shards, kept = objects[:len(stored)], iter(objects[len(stored):])
    clients = _clients(context, shards, [next(kept) if has else None for has in stored])
    if what == "evaluate":
        built = global_model(*model)
        return [evaluate_device(client, built, context.threads) for client in clients]
    if what == "privacy":
        return [privacy_entry(client) for client in clients]
    return clients


def _worker_environment() -> dict[str, Any]:
    """Task options that put the folders of the config's references on the workers' import
    path (none without references: a runtime environment costs each worker a start)."""
    folders = reference_folders()
    if not folders:
        return {}
    path = os.pathsep.join([*folders, *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"runtime_env": {"env_vars": {"PYTHONPATH": path}}}


@dataclass(frozen=True)
class Request:
    """What one device's task asks Ray for."""

    num_cpus: float
    memory_bytes: int


@dataclass(frozen=True)
class NodeCapacity:
    node: str
    cpus: float
    memory_bytes: int


def cpu_shares(resources: Sequence[DeviceResources]) -> list[float]:
    """Each device's CPU share: its cores over the fleet's most (1.0 for the largest device; all
    1.0 when no device says)."""
    cores = [r.cpu_cores for r in resources]
    if any(c is None for c in cores):
        return [1.0] * len(resources)
    most = max(cores)
    return [c / most for c in cores]


def device_requests(resources: Sequence[DeviceResources], nodes: Sequence[NodeCapacity],
                    default_memory: int = DEFAULT_MEMORY_BYTES) -> list[Request]:
    """Each device's task request: its CPU share (capped at the largest node's CPUs, so every
    task can run somewhere) and its memory (never scaled: a device's planned peak is what it
    needs). Devices take turns on the nodes, so the fleet as a whole need not fit at once; a
    device whose memory fits no node is refused before anything runs."""
    usable = [n for n in nodes if n.cpus > 0]
    if not usable:
        raise RuntimeError("the Ray cluster has no node with a CPU")
    memory = [r.memory_bytes or default_memory for r in resources]
    largest = max(n.memory_bytes for n in usable)
    if max(memory) > largest:
        raise RuntimeError(
            f"a device's planned memory ({max(memory) / 2**30:.2f} GiB) does not fit any node of "
            f"the Ray cluster (the largest offers {largest / 2**30:.2f} GiB): add a larger node, "
            "or plan that device a smaller submodel")
    top = max(n.cpus for n in usable)
    return [Request(round(max(_CPU_STEP, min(share, top)), 4), m)
            for share, m in zip(cpu_shares(resources), memory)]


def home_nodes(clients: int, nodes: Sequence[NodeCapacity]) -> list[str]:
    """Each device's home node: the nodes take the devices in turn, each as many at a time as it
    has CPUs (at least one), so every node's share of the fleet follows its CPUs."""
    turns = [n.node for n in nodes for _ in range(max(1, round(n.cpus)))]
    return [turns[i % len(turns)] for i in range(clients)]


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
        self.nodes = cluster_nodes()
        self.requests = device_requests(setup.resources, self.nodes)
        self._environment = _worker_environment()
        self._home = home_nodes(setup.clients, [n for n in self.nodes if n.cpus > 0])
        self._members: dict[str, list[int]] = {}   # home node -> its devices, in order
        for i, home in enumerate(self._home):
            self._members.setdefault(home, []).append(i)
        self._shards, self._loads = self._load(setup)
        self._context = ray.put(RunContext(
            setup.train, setup.dp, setup.planned_rounds, setup.seed,
            setup.selection_rate, self.threads,
            (setup.model,) if REFERENCE.match(setup.model) else (), setup.device_state))
        self._states: list[Any] = [None] * setup.clients   # each device's state in the store
        self._has_model = [False] * setup.clients
        self._epsilon = [0.0] * setup.clients
        self._round_payloads: dict[int, tuple[bytes, Any]] = {}
        self._task_nodes: list[set[str]] = [set() for _ in range(setup.clients)]
        self.timing.startup = time.perf_counter() - started

    def _load(self, setup: FleetSetup) -> tuple[list[Any], dict[str, int]]:
        """Each device's shard in its home node's object store (the nodes load at once), and
        how many times each node loaded the data, counted from where the loads ran."""
        shards: list[Any] = [None] * len(self._home)
        ran_on = []
        for node, devices in self._members.items():
            refs = _load_shards.options(
                num_returns=1 + len(devices), **self._environment,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                    setup.data, setup.clients, setup.partition, setup.seed,
                    setup.max_client_samples, setup.groups, devices)
            ran_on.append(refs[0])
            for i, ref in zip(devices, refs[1:]):
                shards[i] = ref
        loads = {node: 0 for node in self._members}
        for node in ray.get(ran_on):
            loads[node] = loads.get(node, 0) + 1
        return shards, loads

    def _at_home(self, device_index: int) -> NodeAffinitySchedulingStrategy:
        return NodeAffinitySchedulingStrategy(self._home[device_index], soft=True)

    def has_model(self, device_index: int) -> bool:
        return self._has_model[device_index]

    def submit(self, device_index: int, task: Task, payload: bytes) -> Pending:
        self.timing.tasks += 1
        request = self.requests[device_index]
        run, state = _device_task.options(
            num_cpus=request.num_cpus, memory=request.memory_bytes,
            scheduling_strategy=self._at_home(device_index), **self._environment).remote(
                self._context, self._shards[device_index], self._states[device_index], task,
                self._shared(payload))
        self._states[device_index] = state   # the next task of this device waits for this one
        return _Remote(device_index, run)

    def _shared(self, payload: bytes) -> Any:
        """The download in the object store once per round however many devices are sent the
        same bytes (FedAvg: all of them); the task receives the bytes."""
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
        if run.outcome.epsilon is not None:
            self._epsilon[pending.device_index] = run.outcome.epsilon
        self._task_nodes[pending.device_index].add(run.node)
        return run

    def _over_devices(self, what: str, model: Any = None) -> list[Any]:
        """`_device_pass` over every device, in chunks of devices with the same home node (two
        chunks per CPU of that node), each at home; answers in device order."""
        parts = []
        for node in self.nodes:
            devices = self._members.get(node.node, [])
            chunks = max(1, min(len(devices), int(2 * node.cpus)))
            parts += [(node, devices[i::chunks]) for i in range(chunks) if devices[i::chunks]]
        calls = []
        for node, part in parts:
            states = [self._states[i] for i in part]
            calls.append(_device_pass.options(
                num_cpus=min(1.0, node.cpus), **self._environment,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node, soft=True)).remote(
                    self._context, what, [s is not None for s in states], model,
                    *[self._shards[i] for i in part], *[s for s in states if s is not None]))
        ordered: list[Any] = [None] * len(self._states)
        for (_, part), answer in zip(parts, ray.get(calls)):
            for i, value in zip(part, answer):
                ordered[i] = value
        return ordered

    def evaluate(self, spec: ModelSpec, state: dict[str, np.ndarray],
                 model: torch.nn.Module) -> list[tuple[float, float]]:
        started = time.perf_counter()
        self._round_payloads.clear()  # the round's tasks are all answered
        scores = self._over_devices("evaluate", ray.put((spec, {k: np.asarray(v)
                                                                for k, v in state.items()})))
        self.timing.evaluating += time.perf_counter() - started
        return scores

    def epsilon(self, device_index: int) -> float:
        return self._epsilon[device_index]

    def privacy(self) -> list[dict[str, Any]]:
        return self._over_devices("privacy")

    def clients(self) -> Sequence[LocalClient]:
        return self._over_devices("client")

    def report(self) -> dict[str, Any]:
        return {
            "name": self.name, "address": self.address, "threads_per_device": self.threads,
            "nodes": [{"node": node, "data_loads": n,
                       "devices": [i for i, seen in enumerate(self._task_nodes) if node in seen]}
                      for node, n in self._loads.items()],
            "devices": [{"client": i, "num_cpus": r.num_cpus, "memory_bytes": r.memory_bytes,
                         "task_nodes": sorted(seen)}
                        for i, (r, seen) in enumerate(zip(self.requests, self._task_nodes))],
            "timing": {"startup_seconds": self.timing.startup,
                       "waiting_seconds": self.timing.waiting,
                       "evaluating_seconds": self.timing.evaluating,
                       "task_cpu_seconds": self.timing.task_cpu, "tasks": self.timing.tasks},
        }

    def close(self) -> None:
        self._states, self._shards = [], []
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()
