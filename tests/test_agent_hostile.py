"""The edge agent against hostile messages: the real agent, real engine (tests/harness/fleet.py),
and a real Mosquitto for what only a broker shows (acknowledgement, redelivery after a reconnect).
A task id that is a path creates and deletes nothing outside the state directory; poison messages
never raise, are reported with the reason and acknowledged once, and a genuine task still trains;
unsigned or forged ACKs change nothing; configs and plans refuse non-finite numbers.

Every test looks at what a device really does: the files on disk (inside and outside its state
directory), the REFUSAL it sends and its reason. Elsewhere: artifacts in
tests/test_agent_stores_only_verified_artifacts.py, the device's privacy policy in
tests/test_agent_privacy_policy.py, the resend timer in
tests/test_agent_resends_unacknowledged_updates.py.
"""

from __future__ import annotations

import json
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_sdk.agent import load_edge_config
from edge_sdk.agent.config import EdgeConfigError
from edge_sdk.sizing import DevicePlan, DevicePlanError
from edge_sdk.protocol import MAGIC, MessageType, decode_envelope, encode_envelope, parse_header
from edge_sdk.protocol.signing import load_public_key, sign
from harness.brokers import fleet_wire
from harness.devices import DEVICE, TOPICS, files_outside, halt, refusals_in, running_agent
from harness.fleet import Harness, signing_key_files
from harness.messages import raw_envelope
from harness.waiting import wait_until


# --- item 2: task ids never become paths ---------------------------------------------------------
def test_a_task_id_that_is_a_path_creates_and_deletes_nothing_outside_the_state_dir(tmp_path,
                                                                                    sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=1)
    h.register_all()
    h.engine.tick()
    [(topic, genuine)] = h.take(h.to_devices, "task", DEVICE)
    envelope = decode_envelope(genuine)
    evil = "/../../../tmp/x"
    agent = h.agents[DEVICE]
    allowed = (agent.state.root, tmp_path / "coordinator", tmp_path / "coordinator.db")
    before = files_outside(tmp_path, *allowed)
    agent.handle(topic, encode_envelope(MessageType.TASK, {**envelope.header, "task": evil},
                                        envelope.payload))
    assert files_outside(tmp_path, *allowed) == before, "created files outside the state dir"
    assert not any(p for p in agent.state.root.rglob("*") if "tmp" in p.name)
    assert h.take(h.to_coordinator, "update") == []
    # The same id in an ACK: the file it would name (here planted) is not deleted.
    victim = tmp_path / "tmp" / "x.bin"
    victim.parent.mkdir()
    victim.write_bytes(b"keep me")
    agent.handle(TOPICS.ack(DEVICE), encode_envelope(MessageType.ACK, {
        "device_id": DEVICE, "round": envelope.header["round"], "task": evil, "accepted": True}))
    assert victim.read_bytes() == b"keep me"
    agent.handle(topic, genuine)  # the genuine task is not blocked by the attempt
    assert len(h.take(h.to_coordinator, "update", DEVICE)) == 1


# --- item 3: poison messages ---------------------------------------------------------------------
NAMED = {"device_id": DEVICE, "round": 2, "task": "task-p"}


def _poison() -> list[tuple[str, bytes]]:
    """(topic kind, message) pairs that can never be handled; from the issue and beyond."""
    task = MessageType.TASK
    return [
        ("task", raw_envelope(task, b"[" * 50000)),                       # RecursionError
        ("task", raw_envelope(task, b'{"device_id":"dev-0","round":1,"task":"t","deadline":'
                               + b"9" * 5000 + b"}")),                     # int-digits ValueError
        ("task", raw_envelope(task, b'{"device_id":"dev-0","round":1,"task":"t","deadline":NaN}')),
        ("task", raw_envelope(task, b'{"device_id":"dev-0","round":1,"task":"t","plan":'
                               + b"[" * 20000 + b"]" * 20000 + b"}")),
        ("task", raw_envelope(task, b"\xff\xfe not utf-8")),
        ("task", MAGIC + b"\x01\x02\x00\x00" + b"\xff" * 8),               # lengths past the end
        ("task", encode_envelope(task, {**NAMED, "plan": 5, "train": [1], "planned_rounds": 1,
                                        "deadline": 1.0})),
        ("artifact", encode_envelope(MessageType.ARTIFACT, {**NAMED, "manifest": {"artifacts": 5},
                                                            "artifact": "m.zst"}, b"x")),
        ("artifact", encode_envelope(MessageType.ARTIFACT, {**NAMED, "manifest": {"artifacts": [1]},
                                                            "artifact": "m.zst"}, b"x")),
        ("artifact", encode_envelope(MessageType.ARTIFACT, {**NAMED, "manifest": [1],
                                                            "artifact": "m.zst"}, b"x")),
        ("ack", encode_envelope(MessageType.ACK, {**NAMED, "accepted": "perhaps"})),
        ("ack", encode_envelope(MessageType.TASK, {**NAMED, "plan": {}})),  # a TASK on the ack topic
    ]


def _topic(kind: str) -> str:
    return getattr(TOPICS, kind)(DEVICE)


def test_poison_messages_never_raise_and_are_reported_with_the_reason(tmp_path, sqlite_url, caplog):
    h = Harness(tmp_path, sqlite_url, devices=1)
    agent = h.agents[DEVICE]
    with caplog.at_level(logging.WARNING, logger="fedprune.edge"):
        for kind, message in _poison():
            caplog.clear()
            sent = len(h.to_coordinator)
            agent.handle(_topic(kind), message)  # raises nothing
            logged = [r.getMessage() for r in caplog.records if "cannot be handled (" in r.getMessage()]
            # Each is reported: to the coordinator when it names a task, else in the log, with why.
            assert len(h.to_coordinator) > sent or logged, f"{message[:60]!r} went unreported"
            assert all(line.rsplit("(", 1)[1].strip(") ") for line in logged)
    refusals = refusals_in(h.to_coordinator)
    assert sorted((r.code.value, r.round, r.task) for r in refusals) == \
        [("bad_artifact", 3, "task-p")] * 3 + [("bad_task", 2, "task-p")] * 2
    assert all(r.message for r in refusals)
    assert agent.state.tasks() == {} and not agent.state.artifact_dir.exists()
    h.register_all()  # and a genuine task still trains
    h.engine.tick()
    h.deliver_to_devices("task")
    assert len(h.take(h.to_coordinator, "update", DEVICE)) == 1


def test_poison_over_mosquitto_is_acknowledged_once_and_a_real_task_still_trains(tmp_path, sqlite_url,
                                                                                  broker):
    h = Harness(tmp_path, sqlite_url, devices=1)
    for kind, message in _poison():  # what handle() reports, the run loop must report too
        h.agents[DEVICE].handle(_topic(kind), message)
    unhandled, refused = h.agents[DEVICE].unhandled, len(refusals_in(h.to_coordinator))
    h.register_all()
    h.engine.tick()
    [(task_topic, genuine)] = h.take(h.to_devices, "task", DEVICE)
    config = h.on_broker(DEVICE, broker.url, tmp_path / "on-the-broker")
    wire = fleet_wire(broker.url, "poison")
    agent, thread = running_agent(config)
    try:
        wire.wait("register", 1)  # published after it subscribed: its subscriptions are in place
        for kind, message in _poison():
            wire.publish(_topic(kind), message)
        refusals = wire.wait("refusal", refused)
        wait_until(lambda: agent.unhandled == unhandled or not thread.is_alive(), 30,
                   "the agent to report every poison message")
        assert thread.is_alive(), "a poison message stopped the agent"
        halt(agent, thread)
        # A restart resumes the persistent session: whatever was not acknowledged comes back
        # first, before anything published after the reconnect.
        agent, thread = running_agent(config)
        wire.wait("register", 2)
        wire.publish(task_topic, genuine)
        wire.wait("update", 1, timeout=120)
        assert agent.unhandled == 0, "poison was redelivered after the reconnect"
        assert len(wire.of("refusal")) == len(refusals)
    finally:
        halt(agent, thread)
        wire.close()


# --- item 12: ACKs are the coordinator's -------------------------------------------------------
def test_unsigned_or_forged_acks_drop_nothing_and_change_no_state(tmp_path, sqlite_url):
    key_path, pub_path, key = signing_key_files(tmp_path)
    h = Harness(tmp_path, sqlite_url, devices=1, signing_key=str(key_path))
    agent = h.agents[DEVICE]
    agent.coordinator_key = load_public_key(pub_path)
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task")
    [(_, update)] = h.take(h.to_coordinator, "update", DEVICE)
    sent = parse_header(decode_envelope(update))
    [key_name] = [key for key, _ in agent.state.outbox()]
    ack = {"device_id": DEVICE, "round": sent.round, "task": sent.task, "accepted": True,
           "duplicate": False}
    for forged in ({**ack}, sign(ack, b"", Ed25519PrivateKey.generate()),
                   {**sign({**ack, "accepted": False}, b"", key), "accepted": True}):
        agent.handle(TOPICS.ack(DEVICE), encode_envelope(MessageType.ACK, forged))
        assert [k for k, _ in agent.state.outbox()] == [key_name], "a forged ACK dropped the update"
        assert agent.state.tasks()[key_name] == "sent"
    agent.handle(TOPICS.ack(DEVICE), encode_envelope(MessageType.ACK, sign(ack, b"", key)))
    assert agent.state.outbox() == [] and agent.state.tasks()[key_name] == "acked"


# --- configs refuse non-finite numbers -----------------------------------------------------------
@pytest.mark.parametrize("key, value", [("epsilon_budget", "inf"), ("resend_seconds", "inf"),
                                        ("dp_delta", "nan")])
def test_edge_config_refuses_non_finite_numbers(tmp_path, key, value):
    path = tmp_path / "edge.toml"
    path.write_text(f'device_id = "dev-0"\n{key} = {value}\n')
    with pytest.raises(EdgeConfigError, match=f"{key}.*finite"):
        load_edge_config(path)


def test_a_budget_plan_with_an_infinite_number_is_refused(tmp_path):
    plan = {"device_id": "d", "model": "fedp3_cnn", "width_ratio": 1.0, "batch_size": 8,
            "physical_batch_size": 8, "local_steps": 1, "local_samples": 8, "parameters": 1,
            "predicted_peak_bytes": 1, "memory_limit_bytes": 1, "download_bytes": 1, "upload_bytes": 1,
            "transfer_seconds": float("inf"), "compute_seconds": 0, "deadline_seconds": 60,
            "fits": True}
    (tmp_path / "plan.json").write_text(json.dumps(plan))  # json writes Infinity
    with pytest.raises(DevicePlanError, match="transfer_seconds"):
        DevicePlan.load(tmp_path / "plan.json")
