"""`fedprune simulate --backend ray`: the same run on a two-node Ray cluster gives exactly the
in-process results (accuracies, bytes, epsilon), with pooled workers running any device's task,
each task asking for its device's own resources, the devices' state in Ray's object store, and
each node loading the data once."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from coordinator.config import load_config
from coordinator.simulation import run_simulation

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

logging.getLogger("absl").setLevel(logging.ERROR)

# FedP3 keeps private tensors on the device across rounds, DP keeps a ledger there, and a planned
# fleet gives the devices unequal cores and planned memory peaks; the data follows their tiers, so
# each node partitions by the fleet the driver sampled.
RUN = dict(strategy="fedp3", model="mlp", clients=4, rounds=2, partition="tier-classes:0.2",
           max_client_samples=150, fleet="catalogue")
# One intra-op thread per device in both backends (a task's last bits depend on the count).
SETTINGS = ["dp.noise_multiplier=1.0", "train.lr=0.05", "device_threads=1"]
TIMING = ("seconds", "client_seconds")


def _comparable(result: dict) -> dict:
    """The results without wall-clock timings and without the backend's own record."""
    result = json.loads(json.dumps(result))
    result.pop("backend", None)
    for key in ("backend", "ray_address"):
        result["config"].pop(key)
    for row in result["rounds"]:
        for key in TIMING:
            row.pop(key)
    result["final"].pop("client_seconds_total")
    return result


def _two_node_cluster() -> Cluster:
    """A head and one more node, one CPU and a 100 MB object store each."""
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def test_ray_backend_gives_the_in_process_results_on_a_two_node_cluster():
    started = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:  # the in-process run trains while the cluster boots
        training = pool.submit(lambda: run_simulation(load_config(None, SETTINGS, **RUN),
                                                      progress=False).to_dict())
        cluster = _two_node_cluster()  # Ray's signal handlers: the main thread only
        try:
            in_process = training.result()
        except BaseException:
            cluster.shutdown()
            raise
    try:
        booted = time.perf_counter()
        config = load_config(None, SETTINGS + ["backend=ray", f"ray_address={cluster.address}"],
                             **RUN)
        on_ray = run_simulation(config, progress=False).to_dict()
        ray_seconds = time.perf_counter() - booted
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    print(f"in-process and cluster start {booted - started:.1f} s, ray run {ray_seconds:.1f} s "
          f"(its startup {on_ray['backend']['timing']['startup_seconds']:.1f} s)")

    assert "backend" not in in_process  # the default records nothing about where devices ran
    assert _comparable(on_ray) == _comparable(in_process)
    assert len(in_process["privacy"]) == 4 and in_process["final"]["bytes_up_total"] > 0

    devices = on_ray["backend"]["devices"]
    nodes = on_ray["backend"]["nodes"]
    # Each device's tasks ran at its home node, and the nodes shared the fleet.
    assert all(len(d["task_nodes"]) == 1 for d in devices)
    assert sorted(len(n["devices"]) for n in nodes) == [2, 2]
    # Each node read the dataset once, for the devices at home there.
    assert [n["data_loads"] for n in nodes] == [1, 1]
    # Unequal devices, unequal resources: each task asks for a CPU share in proportion to its
    # device's cores and memory = the device's planned peak.
    plans = {c["client"]: c["plan"] for c in in_process["clients"]}
    assert [d["memory_bytes"] for d in devices] == \
        [plans[d["client"]]["predicted_peak_bytes"] for d in devices]
    assert len({d["num_cpus"] for d in devices}) > 1
    assert max(d["num_cpus"] for d in devices) == 1.0


def test_tasks_ask_for_cpu_in_proportion_to_cores_and_their_planned_memory():
    from coordinator.backends.base import DeviceResources
    from coordinator.backends.ray_backend import NodeCapacity, device_requests

    gib = 2**30
    nodes = [NodeCapacity("a", 1.0, 8 * gib), NodeCapacity("b", 1.0, 8 * gib)]
    devices = [DeviceResources(8, gib), DeviceResources(4, gib), DeviceResources(4, gib),
               DeviceResources(4, 2 * gib)]
    asked = device_requests(devices, nodes)
    assert [r.num_cpus for r in asked] == [1.0, 0.5, 0.5, 0.5]
    assert [r.memory_bytes for r in asked] == [gib, gib, gib, 2 * gib]
    # Devices take turns: a fleet needing more memory in all than the cluster has still runs
    # (the 50-device job of issue 27 asked for 25 GiB of a 14.3 GiB node) ...
    assert len(device_requests([DeviceResources(4, 6 * gib)] * 50, nodes)) == 50
    # ... and no task asks for more CPU than a node has.
    assert device_requests([DeviceResources(4, gib)], [NodeCapacity("a", 0.5, 8 * gib)])[0] \
        .num_cpus == 0.5
    # Memory is what a device needs: it is never scaled down to fit.
    with pytest.raises(RuntimeError, match="does not fit any node"):
        device_requests([DeviceResources(4, 9 * gib)], nodes)


def test_nodes_take_home_devices_in_proportion_to_their_cpus():
    from coordinator.backends.ray_backend import NodeCapacity, home_nodes

    nodes = [NodeCapacity("a", 1.0, 1), NodeCapacity("b", 2.0, 1), NodeCapacity("c", 0.5, 1)]
    assert home_nodes(8, nodes) == ["a", "b", "b", "c", "a", "b", "b", "c"]


def test_the_in_process_path_does_not_import_ray():
    """Every module `fedprune simulate` loads for the default backend, through a run, in a fresh
    interpreter."""
    code = ("import sys; import coordinator.cli; from coordinator.config import load_config; "
            "from coordinator.simulation import run_simulation; coordinator.cli.build_parser(); "
            "run_simulation(load_config(None, [], model='mlp', clients=2, rounds=1, "
            "max_client_samples=40), progress=False); "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


PROJECT_MODEL = '''
from torch import nn


def build(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], 24), nn.ReLU(),
                         nn.Linear(24, num_classes))
'''
PROJECT_DATA = '''
import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset


def load():
    digits = load_digits()
    return TensorDataset(torch.tensor(digits.data / 16.0, dtype=torch.float32),
                         torch.tensor(digits.target))
'''


def test_a_projects_own_model_and_data_run_on_ray(tmp_path):
    """`model = "model:build"` and `[data] source = "data:load"` beside the config file are
    imported by the Ray workers as by the driver, with the same results as in-process, devices
    keeping only their private tensors between tasks. The module names are unique to this test,
    so nothing installed or cached can stand in for them."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "fp_ray_model.py").write_text(PROJECT_MODEL)
    (project / "fp_ray_data.py").write_text(PROJECT_DATA)
    config_file = project / "fedprune.toml"
    config_file.write_text('model = "fp_ray_model:build"\nstrategy = "heterofl"\n'
                           'width_levels = [1.0, 0.5]\nclients = 3\nrounds = 2\nseed = 0\n'
                           'partition = "iid"\ndevice_threads = 1\ndevice_state = "private"\n'
                           '[train]\nlocal_epochs = 3\nlr = 0.1\n'
                           '[data]\nsource = "fp_ray_data:load"\n')
    in_process = run_simulation(load_config(config_file), progress=False).to_dict()
    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        on_ray = run_simulation(load_config(config_file, ["backend=ray"]),
                                progress=False).to_dict()
    finally:
        ray.shutdown()
    assert _comparable(on_ray) == _comparable(in_process)
    assert in_process["final"]["global_accuracy"] > 0.3  # ten classes: chance is 0.1
