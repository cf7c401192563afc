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
import threading

import pytest

from coordinator.config import load_config
from coordinator.planning.memory import MemoryCoefficients, predict_peak_bytes
from coordinator.planning.planner import plan_device
from coordinator.rounds import device_key, device_settings, planner_settings
from coordinator.strategies import build_strategy
from coordinator.service import CoordinatorService, ServiceSettings
from coordinator.simulation import run_simulation
from device_profiles import catalogue_profile
from edge_sdk import codec
from edge_sdk.agent import EdgeSettings
from edge_sdk.sizing import DevicePlan
from edge_sdk.models import model_spec, tensor_shapes
from edge_sdk.plan import SubmodelPlan
from edge_sdk.protocol import Topics, decode_envelope, parse_header
from edge_sdk.pruning import is_prunable
from edge_sdk.slicing import width_spec
from harness.brokers import MqttPeer
from harness.devices import start_edge_agent
from harness.processes import stop_processes
from harness.waiting import wait_until

BASE = model_spec("fedp3_cnn", (1, 28, 28), 10)
HELD = 420  # training samples per device: 600 capped samples, 70/30 train/test
BATCH = 256  # large enough that activations, not the update step, set this small CNN's peak
DEADLINE = 50.0
SETTINGS = ["max_client_samples=600", f"deadline_seconds={DEADLINE}", "train.lr=0.05",
            f"train.batch_size={BATCH}", "dp.noise_multiplier=1.0"]


def run_config():
    return load_config(None, SETTINGS, strategy="fedp3", clients=3, rounds=1, partition="iid")


def fleet_profiles():
    """A: fast link; B: the same with a ten times slower link; C (device index 2): the memory
    width 0.5 needs at physical batch BATCH/2, a slow uplink, and the compute for about 330 of
    its 420 samples per round (found by asking the planner)."""
    base = catalogue_profile("rpi4-4gb")
    budget = predict_peak_bytes(width_spec(BASE, 0.5), BATCH // 2, HELD, MemoryCoefficients.load()) + 2
    fast = base.network.model_copy(update={"downlink_bytes_per_s": 1e6, "uplink_bytes_per_s": 1e6})
    slow = base.network.model_copy(update={"downlink_bytes_per_s": 1e5, "uplink_bytes_per_s": 1e5})
    tight_up = base.network.model_copy(update={"downlink_bytes_per_s": 1e6,
                                               "uplink_bytes_per_s": 1e4})
    c = base.model_copy(update={"name": "tight", "network": tight_up,
                                "memory_available_bytes": math.ceil(budget / 0.9)})
    config = run_config()
    strategy = build_strategy(config, BASE)
    settings = device_settings(planner_settings(config, strategy, DEADLINE), strategy, 2, HELD)

    def at_rate(rate: float):
        compute = base.compute.model_copy(update={"samples_per_s": rate, "dp_samples_per_s": rate})
        return c.model_copy(update={"compute": compute})

    low, high = 0.01, 1000.0
    for _ in range(60):
        middle = (low * high) ** 0.5
        samples = plan_device(at_rate(middle), BASE, "fedp3_cnn", settings,
                              MemoryCoefficients.load()).local_samples
        low, high = (middle, high) if samples < 330 else (low, middle)
    return [base.model_copy(update={"name": "fast", "network": fast}),
            base.model_copy(update={"name": "slow", "network": slow}), at_rate(high)]


def check_received(sizing: DevicePlan, plan: SubmodelPlan, physical_batch: int | None,
                   width_ratio: float, download: bytes, upload: bytes) -> None:
    """Every planned choice, read off what the device received and what it sent. (Physical
    batches below the logical one are Opacus virtual steps: DP-SGD only, so the tests run DP.)"""
    assert width_ratio == sizing.width_ratio
    narrowed = BASE if sizing.width_ratio >= 1.0 else width_spec(BASE, sizing.width_ratio)
    # the plan's slicing picks which channels (magnitude: not the first ones), the width how many
    assert plan.spec.structure == BASE.structure and plan.spec.gate == narrowed.gate
    assert {group: len(kept) for group, kept in plan.spec.keep} == \
        {group: len(kept) for group, kept in narrowed.keep}
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


def check_fleet(plans: dict[str, DevicePlan]) -> None:
    """The set-up really makes the planner choose differently (else the test proves nothing)."""
    a, b, c = plans["fast"], plans["slow"], plans["tight"]
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
    config = run_config()
    profiles = fleet_profiles()
    seen = {}
    result = run_simulation(config, progress=False, profiles=profiles,
                            observe=lambda i, task, payload, outcome: seen.update(
                                {i: (task, payload, outcome)})).to_dict()
    plans = {p.name: DevicePlan.model_validate(entry["plan"])
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


def test_the_service_sends_each_device_what_its_plan_says(tmp_path, broker):
    fleet = "sizing"
    topics = Topics(fleet)
    listener = MqttPeer(broker.url, "sizing-listener", [f"{topics.root}/#"])
    service = CoordinatorService(ServiceSettings.model_validate({
        "strategy": "fedp3", "state_dir": str(tmp_path / "coordinator"), "http_port": None,
        "exit_when_done": True, "broker": {"url": broker.url, "fleet": fleet,
                                           "client_id": f"coordinator-{fleet}"},
        "rounds": {"total": 1, "devices_per_round": 3, "min_devices": 3,
                   "deadline_seconds": DEADLINE, "registration_grace_seconds": 0},
        "export": {"enabled": False}, "train": {"lr": 0.05, "batch_size": BATCH},
        "dp": {"noise_multiplier": 1.0}}))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    processes = []
    try:
        # FedP3 selects layers by index: a service device's is its id's key, and these ids'
        # keys fall in the layer groups of clients 0, 1 and 2 in the simulator.
        for i, profile in enumerate(fleet_profiles()):
            assert device_key(profile.name) % 4 == i, "the ids no longer match the groups"
            path = tmp_path / f"{profile.name}.json"
            profile.save(path)
            config = EdgeSettings(device_id=profile.name, broker=broker.url, fleet=fleet,
                                state_dir=str(tmp_path / profile.name), profile=str(path),
                                max_samples=HELD, data={"clients": 3, "device_index": i,
                                                        "partition": "iid"})
            processes.append(start_edge_agent(config, tmp_path))
            wait_until(lambda: service.engine.store.device(profile.name) is not None, 60,
                       f"{profile.name} to register", watch=processes, interval=0.05)
        thread.join(240)
        assert not thread.is_alive(), "the round did not commit in 240 s"
    finally:
        service.stopping.set()
        stop_processes(processes)
        listener.close()
    store = service.engine.store
    plans = {d.id: DevicePlan.model_validate(d.plan) for d in store.devices()}
    check_fleet(plans)
    messages = {}
    for topic, payload in listener.messages():
        kind, device = topics.device_of(topic)
        if kind in ("task", "update"):
            envelope = decode_envelope(payload)
            messages[(kind, device)] = (parse_header(envelope), envelope.payload)
    for device, sizing in plans.items():
        task, download = messages[("task", device)]
        update, upload = messages[("update", device)]
        check_received(sizing, SubmodelPlan.from_dict(task.plan),
                       task.train.physical_batch_size, task.width_ratio, download, upload)
        assert update.num_samples == min(HELD, sizing.local_samples)
    summary = store.rounds()[-1].summary
    assert summary["accepted"] == 3 and summary["straggled"] == 0
