"""The round engine under hostile or failing input (issue 11): every message refused with a reason
or handled, none raising; non-finite numbers never stored; updates checked against what was
planned (weight, digest, size) before anything is decoded, and refusals bounded; a commit that
fails for good aborted once, and a restart that does not crash; updates arriving while a resumed
round commits refused; ACKs signed when tasks are; a device refusing for its privacy policy not
selected again.

The tests drive the real round engine and real edge agents through `harness.fleet`; the engine's
own logic does not depend on the database, so most run on SQLite only (`sqlite_url`), those where
the database matters on SQLite and PostgreSQL (`db_url`). The service over a real Mosquitto with a
failing database is in tests/test_service_retries_dead_letters_and_bounds_its_inbox.py.
"""

from __future__ import annotations

import hashlib
import json
import tracemalloc

import pytest
import zstandard

from edge_sdk import codec
from edge_sdk.protocol import MessageType, decode_envelope, encode_envelope
from edge_sdk.protocol.signing import verify
from harness.fleet import Harness, signing_key_files
from harness.messages import raw_envelope, update_message


def _header(message: bytes) -> dict:
    return decode_envelope(message).header


def _payload(message: bytes) -> bytes:
    return decode_envelope(message).payload


# --- item 3: no content makes the engine raise ------------------------------------------------
def test_no_message_content_makes_the_engine_raise_and_updates_are_answered(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=1)
    updates = h.round_with_updates()
    topic, honest = updates["dev-0"]
    header, payload = _header(honest), _payload(honest)
    registration = decode_envelope(h.agents["dev-0"]._registration()).header
    nested: object = {}
    for _ in range(40):
        nested = {"x": nested}
    t = h.topics
    hostile = [
        (topic, raw_envelope(MessageType.UPDATE, b"[" * 50_000)),                   # RecursionError before
        (topic, raw_envelope(MessageType.UPDATE, b'{"device_id": "dev-0", "round": ' + b"9" * 5000 + b"}")),
        (topic, update_message(header, payload, num_samples=10**19)),       # overflowed the store
        (t.register("dev-0"), encode_envelope(MessageType.REGISTER, {**registration,
                                                                     "num_samples": 10**19})),
        (t.register("dev-0"), raw_envelope(MessageType.REGISTER, json.dumps({**registration,
                                                                    "profile": nested}).encode())),
        (t.refusal("dev-0"), encode_envelope(MessageType.REFUSAL, {
            "device_id": "dev-0", "round": 1, "task": header["task"], "code": "nonsense", "message": "x"})),
        (t.status("dev-0"), encode_envelope(MessageType.STATUS, {"device_id": "dev-0", "online": "maybe"})),
        (t.register("dev-0"), honest),                                      # an UPDATE on register
        ("fedprune/test/task/dev-0", honest),                              # not a device topic
    ]
    for hostile_topic, message in hostile:
        h.engine.handle(hostile_topic, message)  # returns: nothing escapes
    reasons = [a.reason for a in h.deliver_acks("dev-0")]
    assert h.store.update_count(1) == 0 and h.engine.round.number == 1
    assert any("update topic" in r for r in reasons), reasons         # UPDATE on the register topic
    assert h.store.device("dev-0").num_samples == 150                 # no registration took
    assert h.engine.status()["messages"]["refused"] >= 6
    h.engine.handle(topic, honest)  # the device's real update is still accepted afterwards
    (ack,) = h.deliver_acks("dev-0")
    assert ack.accepted and h.store.update_count(1) == 1


# --- item 6: non-finite numbers, and a commit that fails for good ------------------------------
def test_non_finite_numbers_in_an_update_header_never_reach_the_store(tmp_path, db_url):
    h = Harness(tmp_path, db_url, devices=1)
    topic, honest = h.round_with_updates()["dev-0"]
    for field, value in (("epsilon", float("inf")), ("local_accuracy", float("nan")),
                         ("train_seconds", float("inf"))):
        text = json.dumps({**_header(honest), field: value})  # what a hostile peer can send
        h.engine.handle(topic, raw_envelope(MessageType.UPDATE, text.encode(), _payload(honest)))
        assert h.store.update_count(1) == 0, f"{field} = {value} was stored"
    h.engine.handle(topic, honest)
    assert h.store.update_count(1) == 1


def test_a_commit_that_fails_aborts_the_round_once_and_a_restart_does_not_crash(tmp_path, db_url):
    h = Harness(tmp_path, db_url, devices=2)
    updates = h.round_with_updates()
    h.engine.handle(*updates["dev-0"])
    # An update stored by an earlier coordinator that no longer decodes (or a damaged row).
    task = h.store.task(1, "dev-1")
    h.store.accept_update(1, "dev-1", task.task, b"FPTU not a payload", task.aggregation_weight,
                          150, None)
    h.engine.tick()
    (row,) = h.store.rounds()
    assert row.state == "aborted" and "committing failed" in row.summary["reason"]
    assert "CodecError" in row.summary["reason"] and h.engine.round is None
    h.new_engine()  # a restart finds no half-done commit to fail on again
    h.engine.tick()
    assert [r.state for r in h.store.rounds()] == ["aborted", "collecting"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_round_summary_postgresql_refuses_aborts_the_round_once(tmp_path, db_url):
    """PostgreSQL's json type refuses Infinity: an epsilon stored as inf (before headers were
    checked) made every commit of the round fail, before and after each restart."""
    h = Harness(tmp_path, db_url, devices=2)
    updates = h.round_with_updates()
    h.engine.handle(*updates["dev-0"])
    task = h.store.task(1, "dev-1")
    h.store.accept_update(1, "dev-1", task.task, _payload(updates["dev-1"][1]),
                          task.aggregation_weight, 150, float("inf"))
    h.engine.tick()
    (row,) = h.store.rounds()
    assert row.state == "aborted" and "DataError" in row.summary["reason"]
    h.new_engine()
    h.engine.tick()
    assert [r.state for r in h.store.rounds()] == ["aborted", "collecting"]


# --- item 7: a device's weight is what was planned ---------------------------------------------
def test_an_update_claiming_more_samples_than_planned_is_refused(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=2)
    updates = h.round_with_updates()
    assert {t.aggregation_weight for t in h.store.tasks(1).values()} == {150.0}  # FedAvg: samples
    topic, honest = updates["dev-0"]
    h.engine.handle(topic, update_message(_header(honest), _payload(honest), num_samples=151))
    (ack,) = h.deliver_acks("dev-0")
    assert not ack.accepted and "num_samples 151 is over the 150 samples dev-0 registered" in ack.reason
    assert h.store.update_count(1) == 0
    registration = decode_envelope(h.agents["dev-1"]._registration()).header
    h.engine.handle(h.topics.register("dev-1"), encode_envelope(
        MessageType.REGISTER, {**registration, "num_samples": 1_000_001}))
    assert h.store.device("dev-1").num_samples == 150  # over max_device_samples: not taken


# --- item 8: decoded within what the task's tensors can take; refusals bounded -----------------
def test_a_decompression_bomb_is_refused_before_allocating_and_refusals_are_bounded(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=1)
    topic, honest = h.round_with_updates()["dev-0"]
    header = _header(honest)
    body = bytes(96 * 2**20)  # 96 MiB of zeros: under the codec's default 256 MiB limit
    bomb = codec.HEADER.pack(codec.MAGIC, codec.FORMAT_VERSION, 1, 0, 0, 1, len(body)) + \
        zstandard.ZstdCompressor().compress(body)
    del body
    assert len(bomb) < 16_000
    tracemalloc.start()
    try:
        h.engine.handle(topic, update_message(header, bomb))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20, f"handling the bomb allocated {peak / 2**20:.0f} MiB"
    (ack,) = h.deliver_acks("dev-0")
    assert not ack.accepted and "refusing to decompress" in ack.reason
    for _ in range(h.config.max_refused_updates - 1):
        h.engine.handle(topic, update_message(header, bomb))
    h.engine.handle(topic, honest)  # even a good one: the task had its share of refusals
    *_, ack = h.deliver_acks("dev-0")
    assert not ack.accepted and "no further one is decoded" in ack.reason
    assert h.store.update_count(1) == 0


def test_an_update_that_arrived_in_time_is_not_late_because_the_engine_was_busy(tmp_path, sqlite_url):
    """The engine is one thread: an export at round start can keep it busy past the deadline while
    updates wait in the inbox. Lateness is judged by when the update arrived."""
    h = Harness(tmp_path, sqlite_url, devices=2)
    updates = h.round_with_updates()
    arrived = h.clock.now + 59
    h.clock.now += 75  # the engine gets to the inbox after the 60 s deadline
    h.engine.handle(*updates["dev-0"], received_at=arrived)
    h.engine.handle(*updates["dev-1"])  # arrives now: late
    (on_time,), (late,) = h.deliver_acks("dev-0"), h.deliver_acks("dev-1")
    assert on_time.accepted and not late.accepted and "late" in late.reason


# --- item 12: digest, topic kind, committing, signed ACKs --------------------------------------
def test_an_update_whose_payload_sha256_does_not_match_is_refused(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=1)
    topic, honest = h.round_with_updates()["dev-0"]
    h.engine.handle(topic, encode_envelope(MessageType.UPDATE, {
        **_header(honest), "payload_sha256": hashlib.sha256(b"something else").hexdigest()},
        _payload(honest)))
    (ack,) = h.deliver_acks("dev-0")
    assert not ack.accepted and "does not match the payload's sha256" in ack.reason
    assert h.store.update_count(1) == 0


def test_an_update_on_a_register_topic_is_refused(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=1)
    _, honest = h.round_with_updates()["dev-0"]
    h.engine.handle(h.topics.register("dev-0"), honest)
    (ack,) = h.deliver_acks("dev-0")
    assert not ack.accepted and "an UPDATE goes on the update topic, not on register" in ack.reason
    assert h.store.update_count(1) == 0


def test_updates_arriving_while_a_resumed_round_commits_are_refused(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=2)
    updates = h.round_with_updates()
    h.engine.handle(*updates["dev-0"])
    h.store.set_round(1, state="committing")  # what _commit writes first; then the process died
    h.new_engine()
    assert h.engine.round.state == "committing"
    h.engine.handle(*updates["dev-1"])  # queued by the broker while the coordinator was down
    (ack,) = h.deliver_acks("dev-1")
    assert not ack.accepted and "round 1 is committing" in ack.reason
    h.engine.tick()
    row = h.store.last_committed()
    tasks = h.store.tasks(1)
    assert row.summary["contributions"] == [f"dev-0/{tasks['dev-0'].task}"]
    assert h.store.update_count(1) == 1 and tasks["dev-1"].state == "missing"


def test_acks_are_signed_when_the_coordinator_signs_tasks(tmp_path, sqlite_url):
    key_path, _, key = signing_key_files(tmp_path)
    h = Harness(tmp_path, sqlite_url, devices=1, signing_key=str(key_path))
    topic, honest = h.round_with_updates()["dev-0"]
    h.engine.handle(topic, update_message(_header(honest), b"refused too"))
    h.engine.handle(topic, honest)
    acks = [decode_envelope(p) for _, p in h.take(h.to_devices, "ack", "dev-0")]
    assert [a.header["accepted"] for a in acks] == [False, True]
    for ack in acks:
        verify(ack.header, b"", key.public_key())  # raises if unsigned or altered


# --- contracts 4, 6, 9: privacy policy, contributions, artifacts -------------------------------
def test_the_round_summary_lists_each_contribution_once(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=2)
    updates = h.round_with_updates()
    for device in ("dev-1", "dev-0"):
        h.engine.handle(*updates[device])
    h.engine.handle(*updates["dev-0"])  # a QoS 1 redelivery: counted as a duplicate, added once
    h.engine.tick()
    summary = h.store.last_committed().summary
    tasks = h.store.tasks(1)
    assert sorted(summary["contributions"]) == sorted(f"{d}/{t.task}" for d, t in tasks.items())
    assert len(summary["contributions"]) == 2 and summary["duplicates"] == 1


def test_a_device_refusing_for_its_privacy_policy_is_not_selected_again(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=2, rounds={"min_devices": 1})
    updates = h.round_with_updates()
    task = h.store.task(1, "dev-1")
    # What a device whose own config requires DP answers a task without it (contract 4).
    h.engine.handle(h.topics.refusal("dev-1"), encode_envelope(MessageType.REFUSAL, {
        "device_id": "dev-1", "round": 1, "task": task.task, "code": "privacy_policy",
        "message": "the task asks for no DP; this device has an epsilon budget"}))
    h.engine.handle(*updates["dev-0"])
    h.engine.tick()
    assert h.store.last_committed().summary["refused"] == 1
    assert h.store.device("dev-1").exhausted
    h.engine.tick()
    assert set(h.store.tasks(2)) == {"dev-0"}


def test_a_refused_artifact_is_counted_and_leaves_the_task_running(tmp_path, sqlite_url):
    h = Harness(tmp_path, sqlite_url, devices=1, rounds={"min_devices": 1},
                export={"enabled": True, "verify_samples": 8})
    h.register_all()
    h.engine.tick()
    (artifact,) = h.take(h.to_devices, "artifact", "dev-0")
    task = h.store.task(1, "dev-0")
    header = _header(artifact[1])
    assert header["task"] == task.task and header["round"] == 0
    # The device refuses the exported model (contract 9): information, not an answer to the task.
    h.engine.handle(h.topics.refusal("dev-0"), encode_envelope(MessageType.REFUSAL, {
        "device_id": "dev-0", "round": 1, "task": task.task, "code": "bad_artifact",
        "message": "artifact name '../x' is not one this device stores"}))
    assert h.store.task(1, "dev-0").state == "sent"
    h.deliver_to_devices("task")
    h.deliver_to_coordinator("update")
    h.engine.tick()
    summary = h.store.last_committed().summary
    assert summary["artifact_refusals"] == 1 and summary["accepted"] == 1
