"""Secure aggregation in the coordinator service: SecAgg+'s stages as SECAGG messages between the
round engine and real edge agents, message by message (harness.fleet) and over a real Mosquitto
with the devices as processes, one of them killed after its masked input.

What is checked: the committed model is the unweighted mean of the devices' changes (no noise,
clip above any change) to quantization error, with a device that died after its masked input
still in it; the store and the coordinator's log hold no device's update; a restart mid-round
aborts the round and opens a new one; hostile stage messages are refused with a reason.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from coordinator.service import CoordinatorService, ServiceSettings
from coordinator.service.states import RoundState
from edge_sdk.agent import EdgeSettings
from edge_sdk.checkpoint import load_checkpoint
from edge_sdk.protocol import decode_envelope, encode_message, parse_header
from edge_sdk.protocol.messages import SecAggHeader
from harness.devices import start_edge_agent
from harness.fleet import Harness
from harness.messages import update_message
from harness.processes import stop_processes

SECURE = {"enabled": True, "clip_norm": 100.0,  # no noise; the clip above any change here
          "dropout_tolerance": 0.4}  # t = 2 of 3: one device may drop
QUANTIZATION = 1e-4  # 3-4 devices at scale ~2**21: rounding is a few 1e-7 a coordinate


def _secure_harness(tmp_path: Path, devices: int = 3, **service) -> Harness:
    return Harness(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", devices=devices,
                   secure_aggregation=SECURE, rounds={"total": 1}, **service)


def _stage(h: Harness, down: str, up: str, skip: tuple[str, ...] = ()) -> None:
    """Deliver the coordinator's `down` stage messages to the devices (but `skip`), and their
    answers back."""
    for topic, payload in h.take(h.to_devices, "secagg_down"):
        device = h.topics.device_of(topic)[1]
        assert parse_header(decode_envelope(payload)).stage.value == down
        if device not in skip:
            h.agents[device].handle(topic, payload)
    answers = h.deliver_to_coordinator("secagg_up")
    assert all(parse_header(decode_envelope(p)).stage.value == up for _, p in answers)


def _changes(h: Harness, start: dict) -> dict[str, dict[str, np.ndarray]]:
    """Each device's trained model minus the global model it started from (its own files)."""
    out = {}
    for device, agent in h.agents.items():
        trained = load_checkpoint(agent.state.root / "model.pt").state
        out[device] = {k: trained[k].numpy().astype(np.float64) - start[k] for k in trained}
    return out


def _assert_mean(new: dict, start: dict, changes: dict) -> None:
    moved = 0
    for name, value in new.items():
        mean = np.mean([c[name] for c in changes.values()], axis=0)
        np.testing.assert_allclose(value - start[name], mean, atol=QUANTIZATION, rtol=0)
        moved += np.count_nonzero(np.abs(mean) > 10 * QUANTIZATION)
    assert moved > 1000  # the devices trained: the comparison is not of zeros


def test_a_secure_round_commits_the_mean_and_recovers_a_device_lost_after_its_masked_input(
        tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedprune")
    h = _secure_harness(tmp_path, devices=3)
    start = {k: v.astype(np.float64) for k, v in h.engine.global_state.items()}
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task")  # each trains and keeps its change
    assert h.take(h.to_coordinator, "update") == []  # nothing in the clear
    h.engine.tick()  # every task out: SETUP
    _stage(h, "setup", "advertise")
    h.engine.tick()
    _stage(h, "keys", "shares")
    h.engine.tick()
    _stage(h, "forward", "masked")
    h.engine.tick()
    _stage(h, "unmask_request", "unmask", skip=("dev-2",))  # dev-2 is gone after its input
    h.engine.tick()
    assert h.engine.round is not None  # waiting for dev-2 until the stage's time is up
    h.clock.now += 0.25 * 60 + 1
    h.engine.tick()

    row = h.store.last_committed()
    assert row is not None and row.number == 1
    summary = row.summary["secure_aggregation"]
    assert summary["survivors"] == 3 and summary["recovered"] == ["dev-2"]
    assert row.summary["accepted"] == 3
    assert row.summary["bytes_up"] == summary["bytes_up"] > 3 * 4 * 1_000_000  # 32-bit inputs
    _assert_mean(h.engine.global_state, start, _changes(h, start))

    # What the coordinator holds: no update stored, and no device's values in its database
    # (bytes of any trained tensor or change) or its log.
    # (its row keeps only the masked input's size on the wire, for the per-device bytes)
    assert all(u.payload == b"" and u.bytes > 4 * 1_000_000 for u in h.store.updates(1))
    database = (tmp_path / "db.sqlite").read_bytes()
    for device, agent in h.agents.items():
        trained = load_checkpoint(agent.state.root / "model.pt").state
        for name, value in trained.items():
            if value.numel() >= 16:
                assert value.numpy().astype(np.float32).tobytes()[:64] not in database
                change = (value.numpy().astype(np.float64) - start[name]).astype(np.float32)
                assert change.tobytes()[:64] not in database
    log_text = caplog.text
    for change in _changes(h, start).values():
        for name, value in change.items():
            assert f"{value.reshape(-1)[0]:.6g}" not in log_text or abs(value.reshape(-1)[0]) < 1e-6


def test_a_plain_update_is_refused_and_never_stored_under_secure_aggregation(tmp_path):
    h = _secure_harness(tmp_path, devices=2)
    h.register_all()
    h.engine.tick()
    _, task = h.take(h.to_devices, "task", "dev-0")[0]
    header = parse_header(decode_envelope(task))
    h.engine.handle(h.topics.update("dev-0"), update_message(
        {"device_id": "dev-0", "round": header.round, "task": header.task, "num_samples": 10},
        decode_envelope(task).payload))
    (ack,) = [parse_header(decode_envelope(p)) for _, p in h.take(h.to_devices, "ack", "dev-0")]
    assert not ack.accepted and "secure aggregation" in ack.reason
    assert h.store.update_count(1) == 0


def test_a_restart_mid_round_aborts_it_and_opens_a_new_one(tmp_path):
    h = _secure_harness(tmp_path, devices=2)
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task")
    h.engine.tick()
    _stage(h, "setup", "advertise")
    h.new_engine()  # the keys and the running sum were in the old process's memory
    (aborted,) = h.store.rounds()
    assert aborted.state == RoundState.ABORTED and "in memory only" in aborted.summary["reason"]
    h.engine.tick()
    assert h.engine.round is not None and h.engine.round.number == 2


def test_hostile_stage_messages_are_refused_with_the_reason_and_the_round_goes_on(tmp_path, caplog):
    h = _secure_harness(tmp_path, devices=2)
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task")
    h.engine.tick()
    tasks = h.store.tasks(1)
    device, task = "dev-0", tasks["dev-0"].task
    topic = h.topics.secagg_up(device)

    def stage(stage: str, payload: bytes, **fields) -> bytes:
        return encode_message(SecAggHeader(device_id=fields.pop("device_id", device), round=fields.pop("round", 1),
                                           task=fields.pop("task", task), stage=stage, **fields), payload)

    hostile = [
        b"garbage",                                            # not an envelope
        stage("advertise", b"XXXX\x01\x02" + bytes(40)),        # not the library's magic
        stage("advertise", b"FPSA\x01\x04" + bytes(40)),        # kind says SHARES
        stage("keys", b"FPSA\x01\x03" + bytes(40)),             # a coordinator -> device stage
        stage("advertise", b"FPSA\x01\x02" + bytes(10)),        # truncated
        stage("advertise", b"FPSA\x01\x02" + bytes(200)),       # padded / wrong session
        stage("advertise", b"FPSA\x01\x02" + bytes(40), task="other"),  # no such task
        stage("advertise", b"FPSA\x01\x02" + bytes(40), round=7),       # no such round
        stage("masked", b"FPSA\x01\x06" + bytes(40), num_samples=5),   # not the stage open
    ]
    before = h.engine.counters["messages_refused"]
    for message in hostile:
        h.engine.handle(topic, message)
    assert h.engine.counters["messages_refused"] - before == len(hostile)
    assert "not the library's" not in caplog.text  # each refusal names its own reason
    # A device-side header that reports training outside MASKED is refused at parse.
    with pytest.raises(ValueError, match="reports nothing"):
        SecAggHeader(device_id=device, round=1, task=task, stage="advertise", num_samples=3)

    # The device refuses a hostile stage message too, without crashing and without answering.
    agent = h.agents["dev-0"]
    unhandled = agent.unhandled
    for payload in (b"FPSA\x01\x03" + bytes(40), b"nothing"):
        agent.handle(h.topics.secagg_down("dev-0"), encode_message(SecAggHeader(
            device_id="dev-0", round=1, task=task, stage="keys"), payload))
    assert agent.unhandled == unhandled + 2

    # The genuine stages still run to a commit; a redelivered SETUP is answered with the same
    # ADVERTISE (not new keys), which the coordinator, having it, refuses.
    setup = [m for m in h.to_devices if h.topics.device_of(m[0]) == ("secagg_down", "dev-0")]
    _stage(h, "setup", "advertise")
    agent.handle(*setup[0])
    (again,) = h.take(h.to_coordinator, "secagg_up")
    assert parse_header(decode_envelope(again[1])).stage.value == "advertise"
    h.engine.handle(*again)
    h.engine.tick()
    _stage(h, "keys", "shares")
    h.engine.tick()
    _stage(h, "forward", "masked")
    h.engine.tick()
    _stage(h, "unmask_request", "unmask")
    h.engine.tick()
    assert h.store.last_committed().number == 1


def test_four_devices_over_mosquitto_commit_the_mean_with_one_killed_after_its_masked_input(
        tmp_path, broker):
    fleet, count, victim = "secure", 4, "secure-dev-2"
    configs = [EdgeSettings(device_id=f"{fleet}-dev-{i}", broker=broker.url, fleet=fleet,
                            state_dir=str(tmp_path / f"dev-{i}"), profile="catalogue:rpi4-4gb",
                            max_samples=200, data={"clients": count, "device_index": i})
               for i in range(count)]
    devices = {c.device_id: start_edge_agent(c, tmp_path) for c in configs}
    service = CoordinatorService(ServiceSettings.model_validate({
        "strategy": "fedavg", "state_dir": str(tmp_path / "coordinator"), "http_port": 0,
        "exit_when_done": True, "export": {"enabled": False}, "train": {"lr": 0.05},
        "broker": {"url": broker.url, "fleet": fleet, "client_id": f"coordinator-{fleet}"},
        "rounds": {"total": 1, "devices_per_round": count, "min_devices": count,
                   "deadline_seconds": 40, "registration_grace_seconds": 0},
        "secure_aggregation": {"enabled": True, "clip_norm": 100.0}}))  # t = 3 of 4
    start = {k: v.astype(np.float64) for k, v in service.engine.global_state.items()}

    def kill_after_masked_input(stage: str, device: str) -> None:
        # In the engine's thread, before it asks anyone to unmask: the device dies for real.
        if stage == "masked" and device == victim:
            devices[victim].stop(signal.SIGKILL, timeout=10)
    service.engine.secure.on_received = kill_after_masked_input
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        thread.join(110)
        assert not thread.is_alive(), "the secure round did not finish in 110 s"
    finally:
        service.stopping.set()
        stop_processes(devices.values())
    assert devices[victim].exited() is not None
    row = service.engine.store.last_committed()
    assert row is not None and row.number == 1, service.engine.status()["rounds"]
    summary = row.summary["secure_aggregation"]
    assert summary["survivors"] == count and summary["recovered"] == [victim]
    assert summary["dropped_at"]["unmask"] == [victim]
    changes = {}
    for config in configs:
        trained = load_checkpoint(Path(config.state_dir) / "model.pt").state
        changes[config.device_id] = {k: trained[k].numpy().astype(np.float64) - start[k]
                                     for k in trained}
    _assert_mean(service.engine.global_state, start, changes)
    assert all(u.payload == b"" for u in service.engine.store.updates(1))
    print("stage seconds (4 devices):", summary["stage_seconds"], "bytes:", summary["stage_bytes"],
          "round seconds:", row.summary["seconds"])
