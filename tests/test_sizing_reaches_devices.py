"""What the planner decides for a device is what the device receives, in `simulate` and in the
service over a real broker: width and channel selection, physical batch, local samples, download
precision and keep ratio, upload precision and keep ratio. Every assertion is on the task the
device received (the plan it was handed and the bytes of its download) and on the update it sent,
never on the plan alone.

Three devices share one class but for what the planner reads: A has a fast link; B's is ten
times slower; C has a small memory (a narrower width and smaller physical batches), a slow uplink
and slow compute (fewer local samples).
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import os
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from coordinator.config import load_config
from coordinator.planning.memory import MemoryCoefficients, predict_peak_bytes
from coordinator.service import CoordinatorService, ServiceConfig
from coordinator.simulation import run_simulation
from device_profiles import catalogue_profile
from edge_sdk import codec
from edge_sdk.agent import EdgeConfig
from edge_sdk.budget import BudgetPlan
from edge_sdk.models import model_spec, tensor_shapes
from edge_sdk.plan import SubmodelPlan
from edge_sdk.protocol import MessageType, Topics, decode_envelope, parse_header
from edge_sdk.pruning import is_prunable
from edge_sdk.slicing import width_spec
from mqtt_brokers import Mosquitto

BASE = model_spec("fedp3_cnn", (1, 28, 28), 10)
HELD = 210  # training samples per device: 300 capped samples, 70/30 train/test
DEADLINE = 50.0


def fleet_profiles():
    """A: fast link; B: the same with a ten times slower link; C: small memory, a slow uplink,
    slow compute. C's memory budget is what width 0.5 needs at physical batch 24."""
    base = catalogue_profile("rpi4-4gb")
    budget = predict_peak_bytes(width_spec(BASE, 0.5), 24, HELD, MemoryCoefficients.load()) + 2
    fast = base.network.model_copy(update={"downlink_bytes_per_s": 1e6, "uplink_bytes_per_s": 1e6})
    slow = base.network.model_copy(update={"downlink_bytes_per_s": 1e5, "uplink_bytes_per_s": 1e5})
    tight_up = base.network.model_copy(update={"downlink_bytes_per_s": 1e6,
                                               "uplink_bytes_per_s": 1e4})
    slow_compute = base.compute.model_copy(update={"samples_per_s": 1.0, "dp_samples_per_s": 1.0})
    return [base.model_copy(update={"name": "dev-a", "network": fast}),
            base.model_copy(update={"name": "dev-b", "network": slow}),
            base.model_copy(update={"name": "dev-c", "network": tight_up, "compute": slow_compute,
                                    "memory_available_bytes": math.ceil(budget / 0.9)})]


def check_received(sizing: BudgetPlan, plan: SubmodelPlan, physical_batch: int | None,
                   width_ratio: float, download: bytes, upload: bytes) -> None:
    """Every planned choice, read off what the device received and what it sent. (Physical
    batches below the logical one are Opacus virtual steps: DP-SGD only, so the tests run DP.)"""
    assert width_ratio == sizing.width_ratio
    narrowed = BASE if sizing.width_ratio >= 1.0 else width_spec(BASE, sizing.width_ratio)
    assert plan.spec.digest() == narrowed.digest()
    assert physical_batch == sizing.physical_batch_size
    assert plan.local_samples == min(HELD, sizing.local_samples)
    assert (plan.upload_dtype, plan.upload_keep) == (sizing.upload_dtype, sizing.upload_keep)
    shapes = tensor_shapes(plan.spec)
    received = codec.decode(download, expected_shapes=shapes)
    assert codec.value_dtype_of(download).name == {"fp32": "FLOAT32", "fp16": "FLOAT16"}[sizing.download_dtype]
    for entry in plan.tensors:
        if entry.name not in received:
            continue
        tensor, prunable = received[entry.name], is_prunable(shapes[entry.name])
        expected = sizing.download_keep if prunable and not entry.upload else 1.0
        assert entry.download_keep == expected
        assert tensor.nnz == math.ceil(expected * tensor.numel - 1e-9), entry.name
    sent = codec.decode(upload, expected_shapes=shapes)
    assert sorted(sent) == sorted(plan.uploaded)
    assert codec.value_dtype_of(upload).name == {"fp32": "FLOAT32", "fp16": "FLOAT16"}[sizing.upload_dtype]
    for name, tensor in sent.items():
        if is_prunable(shapes[name]):
            assert tensor.nnz <= math.ceil(sizing.upload_keep * tensor.numel - 1e-9) + 1, name


def check_fleet(plans: dict[str, BudgetPlan]) -> None:
    """The set-up really makes the planner choose differently (else the test proves nothing)."""
    a, b, c = plans["dev-a"], plans["dev-b"], plans["dev-c"]
    assert (a.download_dtype, a.download_keep, a.width_ratio) == ("fp32", 1.0, 1.0)
    # ten times slower link, same width: a lower precision or a smaller keep ratio
    assert b.width_ratio == a.width_ratio
    assert (b.download_dtype, a.download_dtype) == ("fp16", "fp32") or b.download_keep < a.download_keep
    assert b.download_dtype == "fp16" and b.download_keep < 1.0
    assert c.width_ratio < 1.0 and c.physical_batch_size < c.batch_size
    assert c.upload_dtype == "fp16" and c.upload_keep < 1.0
    assert c.batch_size <= c.local_samples < HELD
    assert all(p.fits for p in plans.values())


def test_simulate_gives_each_device_what_its_plan_says():
    config = load_config(None, ["max_client_samples=300", f"deadline_seconds={DEADLINE}",
                                "train.lr=0.05", "dp.noise_multiplier=1.0"],
                         strategy="fedp3", clients=3, rounds=1, partition="iid")
    profiles = fleet_profiles()
    seen = {}
    result = run_simulation(config, progress=False, profiles=profiles,
                            observe=lambda i, task, payload, outcome: seen.update(
                                {i: (task, payload, outcome)})).to_dict()
    plans = {p.name: BudgetPlan.model_validate(entry["plan"])
             for p, entry in zip(profiles, result["clients"])}
    check_fleet(plans)
    for i, profile in enumerate(profiles):
        task, payload, outcome = seen[i]
        check_received(plans[profile.name], task.plan, task.train.physical_batch_size,
                       task.width_ratio, payload, outcome.payload)
        assert outcome.num_samples == min(HELD, plans[profile.name].local_samples)
    devices = result["rounds"][0]["devices"]
    assert [d["outcome"] for d in devices] == ["accepted"] * 3
    assert all(d["seconds"] <= DEADLINE for d in devices)
    assert result["rounds"][0]["simulated_seconds"] == pytest.approx(max(d["seconds"] for d in devices))


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    mosquitto = Mosquitto(tmp_path_factory.mktemp("broker")).start()
    yield mosquitto
    mosquitto.stop()


def test_the_service_sends_each_device_what_its_plan_says(tmp_path, broker):
    fleet = "sizing"
    topics = Topics(fleet)
    wire: list[tuple[str, bytes]] = []
    listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sizing-listener")
    subscribed = threading.Event()
    listener.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"{topics.root}/#", qos=1)
    listener.on_subscribe = lambda *args: subscribed.set()
    listener.on_message = lambda c, u, msg: wire.append((msg.topic, bytes(msg.payload)))
    listener.connect("127.0.0.1", broker.port)
    listener.loop_start()
    assert subscribed.wait(10)
    processes = []
    for i, profile in enumerate(fleet_profiles()):
        path = tmp_path / f"{profile.name}.json"
        profile.save(path)
        config = EdgeConfig(device_id=profile.name, broker=broker.url, fleet=fleet,
                            state_dir=str(tmp_path / profile.name), profile=str(path),
                            max_samples=HELD, data={"clients": 3, "client_id": i,
                                                    "partition": "iid"})
        toml = config.save(tmp_path / f"{profile.name}.toml")
        log = open(tmp_path / f"{profile.name}.log", "w")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "edge", "run", "--config", str(toml)],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT))
    service = CoordinatorService(ServiceConfig.model_validate({
        "strategy": "fedp3", "state_dir": str(tmp_path / "coordinator"), "http_port": None,
        "exit_when_done": True, "broker": {"url": broker.url, "fleet": fleet,
                                           "client_id": f"coordinator-{fleet}"},
        "rounds": {"total": 1, "devices_per_round": 3, "min_devices": 3,
                   "deadline_seconds": DEADLINE, "registration_grace_seconds": 0},
        "export": {"enabled": False}, "train": {"lr": 0.05}, "dp": {"noise_multiplier": 1.0}}))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        thread.join(240)
        assert not thread.is_alive(), "the round did not commit in 240 s"
    finally:
        service.stopping.set()
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(20)
        listener.loop_stop()
        listener.disconnect()
    store = service.engine.store
    plans = {d.id: BudgetPlan.model_validate(d.plan) for d in store.devices()}
    check_fleet(plans)
    messages = {}
    for topic, payload in wire:
        kind, device = topics.device_of(topic)
        if kind in ("task", "update"):
            envelope = decode_envelope(payload)
            messages[(kind, device)] = (parse_header(envelope), envelope.payload)
    for device, sizing in plans.items():
        task, download = messages[("task", device)]
        update, upload = messages[("update", device)]
        check_received(sizing, SubmodelPlan.from_dict(task.plan),
                       task.train.get("physical_batch_size"), task.width_ratio, download, upload)
        assert update.num_samples == min(HELD, sizing.local_samples)
    summary = store.rounds()[-1].summary
    assert summary["accepted"] == 3 and summary["straggled"] == 0
