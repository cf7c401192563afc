"""Simulation throughput: fedprune's in-process and Ray backends against Flower's Ray-based
simulation, on the same job, in one run.

The job: FedAvg over N devices for R rounds, every device every round (or --fraction of them,
each framework drawing its own), the same model, the same shards (`make_client_data`, capped at
--samples), the same local training (`train_locally` with the same settings and per-task seed)
and the same thread count per device. Runs:

  floor         a bare torch loop in one process doing the same training steps (the same
                shards, `train_locally` with the same per-task seeds, a weighted mean of the
                state dicts) and the same evaluations, with no codec, no plans, no pipeline:
                what the job costs at the least on this machine
  in-process    `fedprune simulate` with the default backend (one process)
  ray, k nodes  `--backend ray` on a local Ray cluster (`ray.cluster_utils.Cluster`): a head
                with no CPU for the driver and k worker nodes of 1 CPU, each pinned to its own
                core (its raylet, so its workers, are started with that CPU affinity), k = 1, 2
  flower, k     Flower's `run_simulation` (Ray backend, `client_resources` 1 CPU, so one
                ClientApp actor per node) on the same kind of cluster; its ClientApp wraps the
                same training. Flower pins ray to another version than fedprune's `ray` extra
                and downgrades protobuf, so it runs in its own virtualenv, as a subprocess:

    python -m venv --system-site-packages runs/flower-venv
    runs/flower-venv/bin/pip install "flwr[simulation]==1.42.0" -c constraints.txt  # torch==2.13.0

    python benchmarks/vs_flower.py --clients 8 --rounds 3 --model fedp3_cnn --json-out runs/vs_flower.json

Reported per run: client training tasks per second over the rounds and end to end, and where the
time goes: cluster start, start-up (connecting, actors, data), the rounds; within them the
training (summed over tasks, measured inside the device's task) and the evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OBJECT_STORE = 2**30  # per node; at 100 MB the devices' states spilled to disk (Ray's default: 30% of RAM)


def job_from(args: argparse.Namespace) -> dict:
    return {"model": args.model, "dataset": "fashion-mnist", "clients": args.clients,
            "fraction": args.fraction, "rounds": args.rounds, "partition": args.partition,
            "samples": args.samples, "local_epochs": args.local_epochs, "batch_size": args.batch_size, "lr": args.lr,
            "threads": args.threads, "seed": args.seed}


# --- a local cluster of single-core nodes ----------------------------------------------------

def pinned_cluster(worker_nodes: int):
    """A head with no CPU (the driver's) and `worker_nodes` nodes of 1 CPU, each pinned to a
    core of its own: a raylet started from a thread with a CPU affinity keeps it, and so do the
    workers it starts, so a node cannot use more than its core."""
    from ray.cluster_utils import Cluster

    cores = sorted(os.sched_getaffinity(0))
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE})
    before = os.sched_getaffinity(0)
    try:
        for i in range(worker_nodes):
            os.sched_setaffinity(0, {cores[i % len(cores)]})
            cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    except BaseException:
        cluster.shutdown()
        raise
    finally:
        os.sched_setaffinity(0, before)
    cluster.wait_for_nodes()
    return cluster


# --- fedprune ----------------------------------------------------------------------------------

def run_fedprune(job: dict, backend: str, worker_nodes: int = 0) -> dict:
    from coordinator.config import load_config
    from coordinator.simulation import run_simulation

    started = time.perf_counter()
    cluster = pinned_cluster(worker_nodes) if backend == "ray" else None
    booted = time.perf_counter()
    try:
        config = load_config(None, [f"train.lr={job['lr']}", f"train.batch_size={job['batch_size']}",
                                    f"device_threads={job['threads']}", f"backend={backend}"]
                             + ([f"ray_address={cluster.address}"] if cluster else []),
                             strategy="fedavg", model=job["model"], dataset=job["dataset"],
                             clients=job["clients"], fraction=job["fraction"],
                             rounds=job["rounds"], partition=job["partition"],
                             max_client_samples=job["samples"], seed=job["seed"], **{"train.local_epochs": job["local_epochs"]})
        result = run_simulation(config, progress=False).to_dict()
    finally:
        if cluster is not None:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()
    wall = time.perf_counter() - started
    rounds = sum(r["seconds"] for r in result["rounds"])
    timing = (result.get("backend") or {}).get("timing", {})
    return {"run": "fedprune in-process" if backend == "inprocess" else "fedprune ray",
            "worker_nodes": worker_nodes or None,
            "tasks": sum(r["participants"] for r in result["rounds"]),
            "wall_seconds": wall, "cluster_seconds": booted - started,
            # dataset, partition, planning; on Ray also connecting, the actors, each node's data;
            # and the teardown
            "startup_seconds": wall - (booted - started) - rounds,
            "backend_startup_seconds": timing.get("startup_seconds"),
            "rounds_seconds": rounds,
            "round_seconds": [r["seconds"] for r in result["rounds"]],
            "round_tasks": [r["participants"] for r in result["rounds"]],
            "training_seconds": result["final"]["client_seconds_total"],
            # in-process: tasks one at a time on one thread, so their wall time is their CPU
            "training_cpu_seconds": timing.get("task_cpu_seconds",
                                               result["final"]["client_seconds_total"]),
            "evaluation_seconds": timing.get("evaluating_seconds"),
            "bytes_up": result["final"]["bytes_up_total"],
            "bytes_down": result["final"]["bytes_down_total"],
            "global_accuracy": result["final"]["global_accuracy"],
            "global_device_accuracy": result["final"]["global_device_accuracy"]}


# --- the floor: the same training and evaluations in a bare torch loop -----------------------------

def run_floor(job: dict) -> dict:
    """Every round: each drawn device trains the global model on its shard (the task's seed as
    fedprune derives it), the driver averages the state dicts weighted by training samples; then,
    as fedprune's rounds do, every device scores its own last model and the global model on its
    test split, and the driver the global model on the official test set."""
    import numpy as np
    import torch

    from edge_sdk.client import _task_seed
    from edge_sdk.data import load_dataset, make_client_data, to_tensor
    from edge_sdk.settings import TrainSettings
    from edge_sdk.training import accuracy, train_locally

    started = time.perf_counter()
    torch.set_num_threads(job["threads"])
    source = load_dataset(job["dataset"])
    shards = [s.capped(job["samples"]) for s in make_client_data(
        source, job["clients"], job["partition"], job["seed"])]
    test_x, test_y = to_tensor(source.test_x, source.info), torch.tensor(source.test_y)
    model = _flower_model(job)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    own: dict[int, dict] = {}
    train = TrainSettings(local_epochs=job["local_epochs"], batch_size=job["batch_size"], lr=job["lr"])
    rng = np.random.default_rng(job["seed"])
    drawn = max(1, round(job["clients"] * job["fraction"]))
    rounds, training, evaluating, tasks, booted = [], 0.0, 0.0, [], time.perf_counter()
    for round_number in range(1, job["rounds"] + 1):
        begun = time.perf_counter()
        chosen = sorted(rng.choice(job["clients"], drawn, replace=False).tolist())
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        weight = 0
        for i in chosen:
            model.load_state_dict(global_state)
            train_locally(model, shards[i].train_x, shards[i].train_y, train, {},
                          seed=_task_seed(job["seed"], i, round_number))
            own[i] = {k: v.clone() for k, v in model.state_dict().items()}
            n = len(shards[i].train_y)
            for k, v in own[i].items():
                total[k] += n * v.double()
            weight += n
        global_state = {k: (v / weight).to(global_state[k].dtype) for k, v in total.items()}
        trained = time.perf_counter()
        model.load_state_dict(global_state)
        for i, shard in enumerate(shards):
            accuracy(model, shard.test_x, shard.test_y)
        scorer = _flower_model(job)
        for i, state in own.items():
            scorer.load_state_dict(state)
            accuracy(scorer, shards[i].test_x, shards[i].test_y)
        score = accuracy(model, test_x, test_y)
        ended = time.perf_counter()
        training += trained - begun
        evaluating += ended - trained
        rounds.append(ended - begun)
        tasks.append(len(chosen))
    wall = time.perf_counter() - started
    return {"run": "floor (bare torch)", "worker_nodes": None, "tasks": sum(tasks),
            "wall_seconds": wall, "cluster_seconds": 0.0,
            "startup_seconds": booted - started, "rounds_seconds": sum(rounds),
            "round_seconds": rounds, "round_tasks": tasks, "training_seconds": training,
            "training_cpu_seconds": training, "evaluation_seconds": evaluating,
            "global_accuracy": score}


# --- Flower (runs in the Flower virtualenv) -------------------------------------------------------

_SHARDS: dict = {}  # per worker process: the job's shards, made once


def _flower_shard(job: dict, partition_id: int):
    from edge_sdk.data import load_dataset, make_client_data

    key = (job["dataset"], job["clients"], job["partition"], job["seed"])
    if key not in _SHARDS:
        _SHARDS[key] = make_client_data(load_dataset(job["dataset"]), job["clients"],
                                        job["partition"], job["seed"])
    return _SHARDS[key][partition_id].capped(job["samples"])


def _flower_model(job: dict, state=None):
    import torch

    from edge_sdk.models import build_model, model_spec

    torch.set_num_threads(job["threads"])
    model = build_model(model_spec(job["model"], (1, 28, 28), 10), seed=job["seed"])
    if state is not None:
        model.load_state_dict(state)
    return model


def _flower_train(msg, context):
    """The ClientApp's training: fedprune's local training of the device's shard."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from edge_sdk.client import _task_seed
    from edge_sdk.settings import TrainSettings
    from edge_sdk.training import train_locally

    job = json.loads(msg.content["config"]["job"])
    round_number = int(msg.content["config"]["server-round"])
    partition_id = int(context.node_config["partition-id"])
    started = time.perf_counter()
    data = _flower_shard(job, partition_id)
    loaded, cpu = time.perf_counter(), time.process_time()
    model = _flower_model(job, msg.content["arrays"].to_torch_state_dict())
    train = TrainSettings(local_epochs=job["local_epochs"], batch_size=job["batch_size"],
                          lr=job["lr"])
    train_locally(model, data.train_x, data.train_y, train, {},
                  seed=_task_seed(job["seed"], partition_id, round_number))
    trained, cpu = time.perf_counter(), time.process_time() - cpu
    return Message(content=RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": len(data.train_y),
                                 "train-seconds": trained - loaded, "train-cpu-seconds": cpu,
                                 "load-seconds": loaded - started})}), reply_to=msg)


def _flower_evaluate(msg, context):
    from flwr.app import Message, MetricRecord, RecordDict

    from edge_sdk.training import accuracy

    job = json.loads(msg.content["config"]["job"])
    started = time.perf_counter()
    data = _flower_shard(job, int(context.node_config["partition-id"]))
    model = _flower_model(job, msg.content["arrays"].to_torch_state_dict())
    score = accuracy(model, data.test_x, data.test_y)
    return Message(content=RecordDict({"metrics": MetricRecord({
        "num-examples": len(data.test_y), "accuracy": score,
        "eval-seconds": time.perf_counter() - started})}), reply_to=msg)


def flower_client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(_flower_train)
    app.evaluate()(_flower_evaluate)
    return app


def flower_server_app(job: dict, record: dict):
    """FedAvg over every device every round, then every device evaluates the global model on its
    test split and the driver on the official test set (as fedprune's rounds do)."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    from edge_sdk.data import load_dataset, to_tensor
    from edge_sdk.training import accuracy

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            record["rounds"].append({"round": server_round, "start": time.perf_counter(),
                                     "tasks": 0})
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            for reply in replies:
                if reply.has_content():
                    metrics = reply.content["metrics"]
                    record["training_seconds"] += float(metrics["train-seconds"])
                    record["training_cpu_seconds"] += float(metrics["train-cpu-seconds"])
                    record["load_seconds"] += float(metrics["load-seconds"])
                    record["tasks"] += 1
                    record["rounds"][-1]["tasks"] += 1
            record["rounds"][-1]["trained"] = time.perf_counter()
            return super().aggregate_train(server_round, replies)

        def aggregate_evaluate(self, server_round, replies):
            replies = list(replies)
            record["rounds"][-1]["device_accuracy"] = sum(
                float(r.content["metrics"]["accuracy"]) * int(r.content["metrics"]["num-examples"])
                for r in replies) / max(1, sum(int(r.content["metrics"]["num-examples"])
                                               for r in replies))
            return super().aggregate_evaluate(server_round, replies)

    source = load_dataset(job["dataset"])
    test_x, test_y = to_tensor(source.test_x, source.info), torch.tensor(source.test_y)

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        score = accuracy(_flower_model(job, arrays.to_torch_state_dict()), test_x, test_y)
        if server_round:
            record["rounds"][-1]["end"] = time.perf_counter()
            record["rounds"][-1]["global_accuracy"] = score
        return MetricRecord({"accuracy": score})

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        record["main"] = time.perf_counter()
        n = job["clients"]
        drawn = max(1, round(n * job["fraction"]))
        strategy = TimedFedAvg(fraction_train=job["fraction"], fraction_evaluate=1.0,
                               min_train_nodes=drawn, min_evaluate_nodes=n, min_available_nodes=n)
        config = ConfigRecord({"job": json.dumps(job)})
        strategy.start(grid=grid, initial_arrays=ArrayRecord(_flower_model(job).state_dict()),
                       num_rounds=job["rounds"], train_config=config, evaluate_config=config,
                       evaluate_fn=central)

    return app


def flower_worker(job: dict, worker_nodes: int) -> dict:
    """In the Flower virtualenv: Flower's simulation on a pinned local cluster."""
    import ray
    from flwr.simulation import run_simulation

    import vs_flower  # this file as an importable module: Ray workers import the ClientApp's code

    # The workers import this module and fedprune's packages by path.
    path = os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)
    os.environ["PYTHONPATH"] = path
    started = time.perf_counter()
    cluster = pinned_cluster(worker_nodes)
    booted = time.perf_counter()
    record = {"rounds": [], "training_seconds": 0.0, "training_cpu_seconds": 0.0,
              "load_seconds": 0.0, "tasks": 0}
    try:
        ray.init(address=cluster.address, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
        run_simulation(server_app=vs_flower.flower_server_app(job, record),
                       client_app=vs_flower.flower_client_app(), num_supernodes=job["clients"],
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    wall = time.perf_counter() - started
    rounds = record["rounds"]
    rounds_seconds = rounds[-1]["end"] - rounds[0]["start"]
    before_rounds = rounds[0]["start"] - booted
    return {"run": "flower (ray)", "worker_nodes": worker_nodes, "tasks": record["tasks"],
            "wall_seconds": wall, "cluster_seconds": booted - started,
            "startup_seconds": wall - (booted - started) - rounds_seconds,  # and teardown
            "rounds_seconds": rounds_seconds,
            "round_seconds": [r["end"] - r["start"] for r in rounds],
            "round_tasks": [r["tasks"] for r in rounds],
            "training_seconds": record["training_seconds"],
            "training_cpu_seconds": record["training_cpu_seconds"],
            "data_load_seconds": record["load_seconds"],
            "before_rounds_seconds": before_rounds,
            "evaluation_seconds": sum(r["end"] - r["trained"] for r in rounds),
            "global_accuracy": rounds[-1]["global_accuracy"],
            "global_device_accuracy": rounds[-1]["device_accuracy"],
            "flwr": __import__("flwr").__version__, "ray": ray.__version__}


WORKERS = {"floor": lambda job, nodes: run_floor(job),
           "inprocess": lambda job, nodes: run_fedprune(job, "inprocess"),
           "ray": lambda job, nodes: run_fedprune(job, "ray", nodes),
           "flower": lambda job, nodes: flower_worker(job, nodes)}


def run_isolated(kind: str, job: dict, worker_nodes: int, python: str = sys.executable) -> dict:
    """One run in a fresh interpreter, so no run inherits another's imports, warm caches or
    loaded dataset; `process_seconds` is its whole life, interpreter and imports included."""
    started = time.perf_counter()
    out = subprocess.run([python, str(Path(__file__).resolve()), "--worker", kind,
                          "--worker-nodes", str(worker_nodes), "--job", json.dumps(job)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"the {kind} run failed:\n{out.stderr[-4000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]),
            "process_seconds": time.perf_counter() - started}


# --- report ---------------------------------------------------------------------------------------

def steady_rate(run: dict) -> float:
    """Tasks per second over the rounds after the first (the first warms each worker up)."""
    seconds, tasks = run["round_seconds"][1:], run["round_tasks"][1:]
    return sum(tasks) / sum(seconds) if seconds else run["tasks"] / run["rounds_seconds"]


def table(rows: list[dict]) -> str:
    """One row a run. End to end is the run's process from start to exit (interpreter, imports,
    cluster, data, rounds, teardown); "x floor" divides by the floor's."""
    floor = next((r for r in rows if r["run"].startswith("floor")), None)
    head = ("| run | worker nodes | tasks | tasks/s (rounds 2+) | tasks/s (end to end) "
            "| end to end s | x floor | rounds s | x floor | outside rounds s | cluster start s "
            "| round 1 s | rounds 2+ s | training CPU s (sum) | evaluation s | global acc |\n|"
            + "---|" * 16)
    lines = [head]
    for r in rows:
        ev, wall = r.get("evaluation_seconds"), r["process_seconds"]
        ratio = (lambda mine, key: f"{mine / floor[key]:.2f}") if floor else (lambda *_: "-")
        lines.append(
            f"| {r['run']} | {r['worker_nodes'] or '-'} | {r['tasks']} | {steady_rate(r):.2f} "
            f"| {r['tasks'] / wall:.2f} | {wall:.1f} | {ratio(wall, 'process_seconds')} "
            f"| {r['rounds_seconds']:.1f} | {ratio(r['rounds_seconds'], 'rounds_seconds')} "
            f"| {wall - r['rounds_seconds']:.1f} | {r['cluster_seconds']:.1f} "
            f"| {r['round_seconds'][0]:.1f} | {sum(r['round_seconds'][1:]):.1f} "
            f"| {r['training_cpu_seconds']:.1f} "
            f"| {'-' if ev is None else f'{ev:.1f}'} | {r['global_accuracy']:.4f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))) / 2**20
    return f"{len(os.sched_getaffinity(0))} cores ({cpu}), {memory:.0f} GB RAM, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="share of the devices drawn per round (below 1, each framework "
                             "draws its own: the throughput compares, the models do not)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="fedp3_cnn")
    parser.add_argument("--partition", default="classes:5")
    parser.add_argument("--samples", type=int, default=600, help="max_client_samples per device")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nodes", default="1,2", help="worker node counts for the Ray runs")
    parser.add_argument("--flower-python", default=str(ROOT / "runs/flower-venv/bin/python"),
                        help="the Flower virtualenv's python ('' skips Flower)")
    parser.add_argument("--json-out", default=str(ROOT / "runs/vs_flower.json"))
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-nodes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import logging

        logging.getLogger("absl").setLevel(logging.ERROR)
        sys.path.insert(0, str(HERE))
        print(json.dumps(WORKERS[args.worker](json.loads(args.job), args.worker_nodes)))
        return 0

    job = job_from(args)
    nodes = [int(n) for n in args.nodes.split(",") if n]
    rows = []
    for name, run in [("floor", lambda: run_isolated("floor", job, 0)),
                      ("in-process", lambda: run_isolated("inprocess", job, 0)),
                      *[(f"ray {k}", lambda k=k: run_isolated("ray", job, k)) for k in nodes],
                      *[(f"flower {k}", lambda k=k: run_isolated("flower", job, k, args.flower_python))
                        for k in (nodes if args.flower_python else [])]]:
        print(f"running {name} ...", flush=True)
        rows.append(run())
        print(json.dumps(rows[-1]), flush=True)
    report = {"job": job, "machine": machine(), "load_average": os.getloadavg(), "runs": rows}
    print(table(rows))
    print(machine())
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2))
        print(f"written to {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
