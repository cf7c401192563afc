"""A device resends an update whose publish (or ACK) was lost on its timer, without waiting for a
reconnect: the same envelope, every `resend_seconds`, until the coordinator's ACK empties its
outbox; an acknowledged update is not sent again.

The real agent on a real Mosquitto; the test's own MQTT client plays the coordinator's side.
"""

from __future__ import annotations

import threading
import time

from edge_sdk.agent import EdgeAgent
from harness.brokers import fleet_wire
from harness.devices import DEVICE, TOPICS, halt
from harness.fleet import Harness
from harness.waiting import wait_until


def test_an_update_whose_publish_was_lost_is_resent_on_the_timer_without_a_reconnect(tmp_path, sqlite_url,
                                                                                     broker):
    h = Harness(tmp_path, sqlite_url, devices=1)
    h.register_all()
    h.engine.tick()
    [(task_topic, genuine)] = h.take(h.to_devices, "task", DEVICE)
    wire = fleet_wire(broker.url, "resend")
    dropped = []

    def lossy(topic, payload, retain=False):
        if TOPICS.device_of(topic)[0] == "update" and not dropped:
            dropped.append(bytes(payload))  # lost on the way: the broker never sees it
            return None
        return agent.transport.publish(topic, payload, retain)

    agent = EdgeAgent(h.on_broker(DEVICE, broker.url, tmp_path / "on-the-broker", resend_seconds=1),
                      publish=lossy)
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
