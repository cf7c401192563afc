"""The edge agent against hostile messages: the real agent, real engine (tests/harness/fleet.py),
a real exported bundle, and a real Mosquitto for what only a broker shows (acknowledgement,
redelivery after a reconnect, the resend timer).

Every test looks at what a device really does: the files on disk (inside and outside its state
directory), the REFUSAL it sends and its reason, the ledger it keeps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_sdk.agent import EdgeAgent, EdgeSettings, load_edge_config
from edge_sdk.agent.config import EdgeConfigError
from edge_sdk.sizing import DevicePlan, DevicePlanError
from edge_sdk.data import to_tensor
from edge_sdk.models import build_model, model_spec
from edge_sdk.protocol import (MAGIC, MessageType, Topics, decode_envelope,
                               encode_envelope, parse_header)
from edge_sdk.protocol.signing import load_public_key, sign
from edge_sdk.runtime import Predictor, load_manifest
from export import export_bundle
from harness.brokers import Mosquitto, MqttPeer
from harness.devices import captured_agent, files_outside, halt, refusals_in, running_agent
from harness.fleet import Harness, signing_key_files
from harness.messages import raw_envelope
from harness.waiting import wait_until

TOPICS = Topics("test")
DEVICE = "dev-0"


@pytest.fixture(scope="module")
def bundle(fmnist, tmp_path_factory) -> Path:
    """A real exported bundle (ONNX fp32, verified in onnxruntime), as the engine ships them."""
    out = tmp_path_factory.mktemp("bundle")
    model = build_model(model_spec("fedp3_cnn", (1, 28, 28), 10), seed=0)
    export_bundle(model, out, model_name="fedp3_cnn", info=fmnist.info, device_id="width-1",
                  verify_x=to_tensor(fmnist.test_x[:16], fmnist.info).numpy(), round_number=0,
                  formats=("onnx",))
    return out


def _artifact(bundle: Path, *, round_number: int = 0, task: str = "task-1", manifest=None,
              artifact: str | None = None, payload: bytes | None = None) -> bytes:
    """An ARTIFACT message like the engine's (_send_artifacts), with any part replaced."""
    real = json.loads((bundle / "manifest.json").read_text())
    entry = real["artifacts"][0]
    return encode_envelope(MessageType.ARTIFACT, {
        "device_id": DEVICE, "round": round_number, "task": task,
        "manifest": real if manifest is None else manifest,
        "artifact": entry["compressed_path"] if artifact is None else artifact},
        (bundle / entry["compressed_path"]).read_bytes() if payload is None else payload)


def _renamed(bundle: Path, name: str, field: str = "compressed_path") -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"][0][field] = name
    return manifest


# --- item 1: artifact names never become paths ---------------------------------------------------
@pytest.mark.parametrize("evil", ["../../escaped.pth", "ABSOLUTE", "../artifact.old/../../x.pth",
                                  "sub/dir.zst"])
def test_an_artifact_name_that_is_a_path_writes_nothing_and_is_refused(tmp_path, bundle, evil):
    outside = tmp_path / "site-packages"
    outside.mkdir()
    if evil == "ABSOLUTE":  # a .pth in site-packages runs on the next interpreter start
        evil = str(outside / "fedprune-evil.pth")
    agent, sent = captured_agent(tmp_path)
    before = files_outside(tmp_path, agent.state.root)
    agent.handle(TOPICS.artifact(DEVICE), _artifact(
        bundle, round_number=3, task="task-7", manifest=_renamed(bundle, evil), artifact=evil))
    assert files_outside(tmp_path, agent.state.root) == before, "wrote outside the state dir"
    assert not agent.state.artifact_dir.exists()
    refusals = refusals_in(sent)
    assert [(r.code.value, r.round, r.task) for r in refusals] == [("bad_artifact", 4, "task-7")]
    assert "not a plain file name" in refusals[0].message
    assert agent.state.tasks() == {}  # a refused artifact does not touch the task it came with


def test_a_plain_path_in_the_manifest_that_escapes_is_refused(tmp_path, bundle):
    """`path` (the uncompressed name) is as hostile as `compressed_path`."""
    agent, sent = captured_agent(tmp_path)
    agent.handle(TOPICS.artifact(DEVICE), _artifact(
        bundle, manifest=_renamed(bundle, "../../../model.onnx", "path")))
    refusals = refusals_in(sent)
    assert [r.code.value for r in refusals] == ["bad_artifact"]
    assert "../../../model.onnx" in refusals[0].message
    assert not agent.state.artifact_dir.exists()


def test_a_genuine_artifact_is_stored_under_the_devices_own_names_and_runs(tmp_path, bundle, fmnist):
    agent, sent = captured_agent(tmp_path)
    real = json.loads((bundle / "manifest.json").read_text())
    # A plain but foreign name: the device still chooses the file name itself.
    agent.handle(TOPICS.artifact(DEVICE), _artifact(
        bundle, manifest=_renamed(bundle, "whatever-the-sender-says.zst"),
        artifact="whatever-the-sender-says.zst"))
    assert refusals_in(sent) == []
    stored = sorted(p.name for p in agent.state.artifact_dir.iterdir())
    assert stored == ["manifest.json", "model-fp32.onnx.zst"]
    manifest = load_manifest(agent.state.artifact_dir)
    assert (manifest.artifacts[0].path, manifest.artifacts[0].compressed_path) == \
        ("model-fp32.onnx", "model-fp32.onnx.zst")
    assert manifest.artifacts[0].sha256 == real["artifacts"][0]["sha256"]
    predictor = Predictor.open(agent.state.artifact_dir, fmt="onnx")
    assert predictor.logits(fmnist.test_x[:4]).shape == (4, 10)
    assert not any(p.name.startswith("artifact.") for p in agent.state.root.iterdir())


@pytest.mark.parametrize("damage", ["sha256", "payload", "bytes", "not zstd", "bomb"])
def test_an_artifact_that_does_not_match_its_manifest_is_refused_and_not_stored(tmp_path, bundle,
                                                                                damage):
    agent, sent = captured_agent(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["artifacts"][0]
    packed = (bundle / entry["compressed_path"]).read_bytes()
    if damage == "sha256":
        entry["sha256"] = hashlib.sha256(b"another model").hexdigest()
    elif damage == "payload":  # a well-formed frame of the right size, but another model
        packed = zstandard.ZstdCompressor().compress(bytes(entry["bytes"]))
        entry["compressed_bytes"] = len(packed)
    elif damage == "bytes":
        entry["bytes"] += 1
    elif damage == "not zstd":
        packed = bytes(len(packed))
    else:  # 64 MiB of zeros in a few kB: the device stops one byte past the manifest's size
        packed = zstandard.ZstdCompressor().compress(bytes(64 << 20))
        entry["compressed_bytes"] = len(packed)
    agent.handle(TOPICS.artifact(DEVICE), _artifact(bundle, manifest=manifest, payload=packed))
    refusals = refusals_in(sent)
    assert [(r.code.value, r.round) for r in refusals] == [("bad_artifact", 1)]
    assert not agent.state.artifact_dir.exists()


def test_an_artifact_that_is_refused_keeps_the_previous_bundle(tmp_path, bundle):
    agent, sent = captured_agent(tmp_path)
    agent.handle(TOPICS.artifact(DEVICE), _artifact(bundle))
    before = {p.name: p.read_bytes() for p in agent.state.artifact_dir.iterdir()}
    agent.handle(TOPICS.artifact(DEVICE), _artifact(
        bundle, manifest=_renamed(bundle, "../../x"), artifact="../../x"))
    assert {p.name: p.read_bytes() for p in agent.state.artifact_dir.iterdir()} == before
    assert [r.code.value for r in refusals_in(sent)] == ["bad_artifact"]


# --- item 2: task ids never become paths ---------------------------------------------------------
def test_a_task_id_that_is_a_path_creates_and_deletes_nothing_outside_the_state_dir(tmp_path, sqlite_url):
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


def _wire(broker: Mosquitto, name: str) -> MqttPeer:
    """The test's own MQTT client: publishes what a coordinator would and records every message
    the devices of fleet "test" send, so tests wait on what crossed the broker."""
    return MqttPeer(broker.url, f"wire-{name}", ["fedprune/test/+/+"])


def _over(broker: Mosquitto, h: Harness, tmp_path: Path, **settings) -> EdgeSettings:
    """The harness's dev-0, as a device on the real broker with its own state directory."""
    return EdgeSettings.model_validate({**h.agents[DEVICE].config.model_dump(), "broker": broker.url,
                                      "state_dir": str(tmp_path / "on-the-broker"), **settings})


def test_poison_over_mosquitto_is_acknowledged_once_and_a_real_task_still_trains(tmp_path, sqlite_url,
                                                                                  broker):
    h = Harness(tmp_path, sqlite_url, devices=1)
    for kind, message in _poison():  # what handle() reports, the run loop must report too
        h.agents[DEVICE].handle(_topic(kind), message)
    unhandled, refused = h.agents[DEVICE].unhandled, len(refusals_in(h.to_coordinator))
    h.register_all()
    h.engine.tick()
    [(task_topic, genuine)] = h.take(h.to_devices, "task", DEVICE)
    config = _over(broker, h, tmp_path)
    wire = _wire(broker, "poison")
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


# --- item 9: the resend timer --------------------------------------------------------------------
def test_an_update_whose_publish_was_lost_is_resent_on_the_timer_without_a_reconnect(tmp_path, sqlite_url,
                                                                                     broker):
    h = Harness(tmp_path, sqlite_url, devices=1)
    h.register_all()
    h.engine.tick()
    [(task_topic, genuine)] = h.take(h.to_devices, "task", DEVICE)
    wire = _wire(broker, "resend")
    dropped = []

    def lossy(topic, payload, retain=False):
        if TOPICS.device_of(topic)[0] == "update" and not dropped:
            dropped.append(bytes(payload))  # lost on the way: the broker never sees it
            return None
        return agent.transport.publish(topic, payload, retain)

    agent = EdgeAgent(_over(broker, h, tmp_path, resend_seconds=1), publish=lossy)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wire.wait("register", 1)
        wire.publish(task_topic, genuine)
        [resent] = wire.wait("update", 1, timeout=120)
        assert dropped and resent == dropped[0]  # the same envelope, same idempotency key
        assert agent.transport.counters["connects"] == 1, \
            "the resend came from a reconnect, not from the timer"
        h.engine.handle(TOPICS.update(DEVICE), resent)
        [(ack_topic, ack)] = h.take(h.to_devices, "ack", DEVICE)
        wire.publish(ack_topic, ack)
        wait_until(lambda: agent.state.outbox() == [], 10, "the ACK to empty the outbox")
        seen = len(wire.of("update"))
        time.sleep(2 * agent.config.resend_seconds)  # two intervals: an acknowledged update stays put
        assert len(wire.of("update")) == seen
    finally:
        halt(agent, thread)
        wire.close()


# --- item 5: the device's own config decides privacy ---------------------------------------------
def _only_refusal(h: Harness):
    refusals = refusals_in(h.take(h.to_coordinator, "refusal", DEVICE))
    assert len(refusals) == 1, f"expected one refusal, got {refusals} (updates: " \
        f"{len(h.take(h.to_coordinator, 'update', DEVICE))})"
    return refusals[0]


@pytest.mark.parametrize("policy", [{"budgets": {0: 8.0}}, {"require_dp": True}])
def test_a_device_that_requires_dp_refuses_a_task_without_it(tmp_path, sqlite_url, policy):
    h = Harness(tmp_path, sqlite_url, devices=1, budgets=policy.get("budgets"))
    agent = h.agents[DEVICE]
    if "require_dp" in policy:
        agent.config = EdgeSettings.model_validate({**agent.config.model_dump(), "require_dp": True})
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task")  # the coordinator has no dp section: the task says "dp": null
    refusal = _only_refusal(h)
    assert refusal.code.value == "privacy_policy"
    assert ("epsilon_budget" if "budgets" in policy else "require_dp") in refusal.message
    assert h.take(h.to_coordinator, "update") == []
    assert not (agent.state.root / "model.pt").exists()  # it never trained


def test_a_task_whose_delta_is_above_the_devices_is_refused(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=1, budgets={0: 50.0},
                dp={"noise_multiplier": 1.0, "delta": 1e-3})
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task")
    refusal = _only_refusal(h)
    assert refusal.code.value == "privacy_policy" and "dp_delta 1e-05" in refusal.message
    assert not (h.agents[DEVICE].state.root / "ledger.json").exists()


def test_the_ledger_accounts_at_the_devices_delta_whatever_the_task_says(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=1, budgets={0: 50.0},
                dp={"noise_multiplier": 1.0, "delta": 1e-9})  # stricter than the device: accepted
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task")
    [(_, update)] = h.take(h.to_coordinator, "update", DEVICE)
    ledger = json.loads((h.agents[DEVICE].state.root / "ledger.json").read_text())["ledger"]
    assert ledger["delta"] == 1e-5  # edge.toml's dp_delta (its default), not the task's 1e-9
    assert ledger["history"]  # it trained with DP, and the epsilon it reports is at its own delta
    from edge_sdk.training import PrivacyLedger
    assert parse_header(decode_envelope(update)).epsilon == pytest.approx(
        PrivacyLedger.from_json(json.dumps(ledger)).epsilon())


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
