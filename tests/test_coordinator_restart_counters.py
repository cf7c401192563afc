"""What the coordinator counts against a device survives its restart (issue 22, item 6): the updates
refused for one task, past `max_refused_updates`, are no longer decoded. Before, the count was in
the engine's memory: a device (or whoever holds its credentials) got a fresh allowance of
decompressions after every restart. Run against a real `fedprune coordinator serve` process and
Mosquitto; the device is a client of the test's own, publishing what an agent would.
"""

from __future__ import annotations

import signal

import pytest

from coordinator.service.store import Store
from edge_sdk.protocol import decode_envelope, parse_header
from harness.brokers import MqttPeer, running_mosquitto
from harness.devices import DEVICE, TOPICS, captured_agent, coordinator_process
from harness.messages import update_message
from harness.processes import stop_processes
from harness.waiting import wait_until

pytestmark = pytest.mark.faults


def _acks(wire: MqttPeer, count: int) -> list:
    return [parse_header(decode_envelope(p)) for p in wire.wait("ack", count, timeout=60)]


def test_the_refused_update_count_survives_a_coordinator_restart(tmp_path):
    # Two devices: the round stays open while the second one's task is unanswered (a task whose
    # update was refused counts as answered).
    agents = [captured_agent(tmp_path, device)[0] for device in (DEVICE, "dev-1")]
    database = f"sqlite:///{tmp_path / 'coordinator' / 'coordinator.db'}"
    store = Store(database)
    with running_mosquitto(tmp_path / "broker") as broker:
        settings = [f"broker.url={broker.url}", "broker.fleet=test", f"state_dir={tmp_path / 'coordinator'}",
                    f"database={database}", "http_port=0", "strategy=fedavg", "model=mlp",
                    "evaluate=false", "export.enabled=false", "rounds.total=1",
                    "rounds.devices_per_round=2", "rounds.min_devices=2",
                    "rounds.deadline_seconds=600", "rounds.registration_grace_seconds=0",
                    "max_refused_updates=3"]
        coordinator = coordinator_process("coordinator", settings, tmp_path / "coordinator.log").start()
        wire = MqttPeer(broker.url, "wire-counters", [TOPICS.ack(DEVICE)])
        try:
            # Retained, as an agent registers: the coordinator may not have subscribed yet.
            for agent in agents:
                wire.client.publish(TOPICS.register(agent.config.device_id), agent._registration(),
                                    qos=1, retain=True).wait_for_publish(10)
            wait_until(lambda: store.current_round() is not None, 90, "round 1 to open", [coordinator])
            task = store.tasks(1)[DEVICE].task
            junk = update_message({"device_id": DEVICE, "round": 1, "task": task, "num_samples": 1},
                                  b"not a tensor payload")
            for _ in range(2):
                wire.publish(TOPICS.update(DEVICE), junk)
            before = _acks(wire, 2)
            assert coordinator.stop(signal.SIGTERM) == 0, coordinator.tail()
            wire.publish(TOPICS.update(DEVICE), junk)  # queued in the coordinator's session
            coordinator.start()
            third = _acks(wire, 3)[-1]
            wire.publish(TOPICS.update(DEVICE), junk)
            fourth = _acks(wire, 4)[-1]
            # The third refusal was counted across the restart: the fourth is not decoded at all.
            assert not fourth.accepted and "3 updates for task" in fourth.reason \
                and "no further one is decoded" in fourth.reason, fourth.reason
            refused = store.refused_updates(1, DEVICE)
        finally:
            wire.close()
            stop_processes([coordinator], signal.SIGKILL)
            store.close()
    assert all(not a.accepted and a.reason.startswith("update refused") for a in [*before, third]), \
        [a.reason for a in [*before, third]]
    assert refused == 3
