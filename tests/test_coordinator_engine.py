"""The round engine with real edge agents, message by message: rounds, refusals, restarts.

Runs against SQLite and PostgreSQL (127.0.0.1:5432, database `test`).
"""

from __future__ import annotations

import numpy as np

from coordinator.aggregation import StreamingAggregator
from edge_sdk import codec
from edge_sdk.checkpoint import load_checkpoint
from edge_sdk.protocol import MessageType, decode_envelope, encode_envelope, parse_header
from harness.fleet import Harness
from harness.messages import update_message

def test_a_round_commits_with_every_update_counted_once(tmp_path, db_url):
    h = Harness(tmp_path, db_url)
    h.register_all()
    h.engine.tick()
    assert h.engine.round is not None and len(h.store.tasks(1)) == 3
    h.deliver_to_devices("task")
    updates = h.deliver_to_coordinator("update")
    assert len(updates) == 3
    h.engine.handle(*updates[0])  # a QoS 1 redelivery of the first update
    acks = [a for d in h.agents for a in h.deliver_acks(d)]
    assert sum(a.accepted and not a.duplicate for a in acks) == 3
    assert sum(a.duplicate for a in acks) == 1
    h.engine.tick()
    row = h.store.last_committed()
    assert row.number == 1 and row.summary["accepted"] == 3 and h.store.update_count(1) == 3
    assert load_checkpoint(row.checkpoint).round == 1
    for device in h.agents:  # acknowledged: nothing left to resend
        assert h.agents[device].state.outbox() == []


def test_restart_mid_round_resumes_without_losing_or_double_counting(tmp_path, db_url):
    h = Harness(tmp_path, db_url)
    start = {k: v.copy() for k, v in h.engine.global_state.items()}
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task", "dev-0")
    first = h.deliver_to_coordinator("update", "dev-0")
    assert h.store.update_count(1) == 1
    h.to_devices.clear()  # the tasks for dev-1 and dev-2 were lost in the crash

    h.new_engine()  # the coordinator restarts on the same database
    assert h.engine.round.number == 1 and h.engine.round.state == "collecting"
    resent = {h.topics.device_of(t)[1] for t, _ in h.to_devices if h.topics.device_of(t)[0] == "task"}
    assert resent == {"dev-1", "dev-2"}  # unanswered tasks go out again, same task ids
    h.deliver_to_devices("task")
    later = h.deliver_to_coordinator("update")
    h.engine.handle(*first[0])  # dev-0's update replayed after the restart
    h.engine.tick()
    row = h.store.last_committed()
    assert row.number == 1 and row.summary["accepted"] == 3

    # The committed model is exactly the aggregate of the three distinct updates.
    aggregator = StreamingAggregator({k: v.shape for k, v in start.items()})
    for _, payload in first + later:
        aggregator.add_update(codec.decode(decode_envelope(payload).payload))
    expected = aggregator.apply(start)
    saved = load_checkpoint(row.checkpoint).state
    for name, value in expected.items():
        np.testing.assert_allclose(saved[name].numpy(), value, rtol=0, atol=1e-6)


def test_late_stale_foreign_and_oversized_updates_are_refused_and_the_device_told(tmp_path, db_url):
    h = Harness(tmp_path, db_url, broker={"max_payload_bytes": 6_000_000})
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task")
    updates = {h.topics.device_of(t)[1]: (t, p) for t, p in h.to_coordinator
               if h.topics.device_of(t)[0] == "update"}
    h.to_coordinator.clear()
    before = {k: v.copy() for k, v in h.engine.global_state.items()}

    # dev-0 publishes dev-1's update on its own topic: ignored, nothing acknowledged.
    h.engine.handle(h.topics.update("dev-0"), updates["dev-1"][1])
    assert h.deliver_acks("dev-0") == [] and h.store.update_count(1) == 0

    # An update over the coordinator's size limit: refused before decoding, device told why.
    topic, payload = updates["dev-2"]
    env = decode_envelope(payload)
    bloated = encode_envelope(MessageType.UPDATE, env.header, env.payload + b"\0" * 2_000_000)
    h.engine.handle(topic, bloated)
    (ack,) = h.deliver_acks("dev-2")
    assert not ack.accepted and "over the limit" in ack.reason

    # A damaged payload (bit flip inside the codec bytes): refused, device told.
    damaged = bytearray(payload)
    damaged[-40] ^= 0xFF
    h.engine.handle(topic, bytes(damaged))
    (ack,) = h.deliver_acks("dev-2")
    assert not ack.accepted and ack.reason.startswith("update refused")

    # A finite but huge update (a scaled attack): refused for its norm, device told.
    huge = {name: codec.SparseTensor(t.shape, t.indices, t.values * 1e4)
            for name, t in codec.decode(decode_envelope(updates["dev-2"][1]).payload).items()}
    h.engine.handle(topic, update_message(env.header, codec.encode(huge, codec.ValueDtype.FLOAT32)))
    (ack,) = h.deliver_acks("dev-2")
    assert not ack.accepted and "L2 norm" in ack.reason

    # After the deadline: late.
    h.clock.now += 61
    h.engine.handle(*updates["dev-0"])
    (ack,) = h.deliver_acks("dev-0")
    assert not ack.accepted and "late" in ack.reason
    assert h.store.update_count(1) == 0
    for name, value in before.items():  # nothing refused touched the model
        np.testing.assert_array_equal(h.engine.global_state[name], value)

    # The round is below quorum at its deadline: aborted, and a new round opens.
    h.engine.tick()
    assert h.store.rounds()[0].state == "aborted" and h.engine.round is None
    h.engine.tick()
    assert h.engine.round.number == 2
    h.engine.handle(*updates["dev-1"])  # an update for the aborted round is stale now
    (ack,) = h.deliver_acks("dev-1")
    assert not ack.accepted and "not open" in ack.reason


def test_a_device_refuses_a_task_over_its_own_epsilon_budget(tmp_path, db_url):
    h = Harness(tmp_path, db_url, devices=2, budgets={1: 0.05}, dp={"target_epsilon": 8.0},
                rounds={"min_devices": 1})
    h.register_all()
    h.engine.tick()
    h.deliver_to_devices("task")
    (refusal,) = h.deliver_to_coordinator("refusal", "dev-1")
    header = parse_header(decode_envelope(refusal[1]))
    assert header.code.value == "privacy_budget" and "over the device's budget of 0.05" in header.message
    assert h.agents["dev-1"].client.ledger.steps == 0  # it trained nothing
    h.deliver_to_coordinator("update", "dev-0")
    h.engine.tick()
    row = h.store.last_committed()
    assert row.summary["accepted"] == 1 and row.summary["refused"] == 1
    assert 0 < row.summary["epsilon_max"] <= 8.0 * 1.01
    assert h.store.device("dev-1").exhausted
    h.engine.tick()  # round 2 leaves the exhausted device out
    assert set(h.store.tasks(2)) == {"dev-0"}


def test_status_reports_fleet_and_rounds(tmp_path, db_url):
    h = Harness(tmp_path, db_url, devices=2)
    h.register_all()
    h.engine.tick()
    status = h.engine.status()
    assert status["current"]["round"] == 1 and status["current"]["selected"] == 2
    assert {d["id"] for d in status["devices"]} == {"dev-0", "dev-1"}
    assert all(d["fits"] and d["width_ratio"] == 1.0 for d in status["devices"])
