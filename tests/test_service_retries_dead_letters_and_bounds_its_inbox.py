"""The coordinator service over a real Mosquitto when its database fails or its inbox is flooded
(issue 11, items 9 and 10): an update the database cannot store for a while is not acknowledged,
retried with backoff and stored once it can (one ACK, accepted); one that always fails is kept in
state_dir/dead-letter/ (0600, with topic and reason) and acknowledged, never delivered again; a
QoS 0 flood is dropped on arrival and counted; the inbox holds at most `broker.inbox_limit`
messages and `broker.inbox_max_bytes` bytes, and what it cannot hold waits in the broker, never
left unacknowledged.

The database is broken for real (a lock held by another connection, SQLite and PostgreSQL), never
with a patched store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
import uuid

import psycopg
import sqlalchemy

from coordinator.service import CoordinatorService
from edge_sdk.protocol import MessageType, decode_envelope, encode_envelope
from harness.brokers import Mosquitto, MqttPeer
from harness.fleet import Harness
from harness.waiting import wait_until


class _Lock:
    """Another connection holding the database (or its updates table) exclusively."""

    def __init__(self, db_url: str):
        url = sqlalchemy.make_url(db_url)
        if url.get_backend_name() == "sqlite":
            self.conn = sqlite3.connect(url.database, isolation_level=None, check_same_thread=False)
            self.conn.execute("BEGIN EXCLUSIVE")
        else:
            self.conn = psycopg.connect(url.set(drivername="postgresql", query={})
                                        .render_as_string(hide_password=False))
            self.conn.execute("LOCK TABLE updates IN ACCESS EXCLUSIVE MODE")

    def release(self) -> None:
        self.conn.rollback() if isinstance(self.conn, psycopg.Connection) else self.conn.execute("ROLLBACK")
        self.conn.close()


def _failing_fast(db_url: str) -> str:
    """The same database, waiting 0.2 s for a lock instead of 30 s before failing."""
    if db_url.startswith("sqlite"):
        return f"{db_url}?timeout=0.2"
    return f"{db_url}?options=-c%20lock_timeout%3D200"


def _service(h: Harness, broker: Mosquitto, name: str, wait_subscribed: bool = True,
             **retry) -> CoordinatorService:
    changes = {"broker": h.config.broker.model_copy(update={"url": broker.url, "client_id": name})}
    if retry:
        changes["retry"] = h.config.retry.model_copy(update=retry)
    config = h.config.model_copy(update=changes)
    service = CoordinatorService(config)
    service.start()
    assert _next(service)[0] == ""  # connected (the RECONNECTED marker)
    # ...and subscribed: a device's message sent now is not published before the SUBSCRIBE (under
    # load it was, and never arrived)
    # (not where retained messages fill the inbox first: paho reads the SUBACKs behind them)
    if wait_subscribed:
        wait_until(lambda: service.link.subscribed, 30, "the broker to acknowledge the subscriptions")
    return service


def _next(service: CoordinatorService) -> tuple:
    """The next message the service's link received (waiting for it: an event, not a sleep)."""
    try:
        return service.link.inbox.get(timeout=30)
    except queue.Empty:
        raise AssertionError("the service received nothing within 30 s") from None


def _device(broker: Mosquitto, device: str) -> MqttPeer:
    """A device's MQTT client, subscribed to its ACKs."""
    return MqttPeer(broker.url, f"{device}-{time.monotonic_ns()}", [f"fedprune/test/ack/{device}"],
                    timeout=30)


class _LogEvent(logging.Handler):
    def __init__(self, text: str):
        super().__init__()
        self.text, self.seen = text, threading.Event()

    def emit(self, record):
        if self.text in record.getMessage():
            self.seen.set()


def _handle_next(service: CoordinatorService) -> None:
    """One turn of the service's loop, for the message that arrives next."""
    service._handle(_next(service))


def test_an_update_the_database_cannot_store_for_a_while_is_stored_once_it_can(tmp_path, db_url, broker):
    h = Harness(tmp_path, _failing_fast(db_url), devices=1)
    h.clock.now = time.time()  # the service's engine runs on the real clock
    topic, honest = h.round_with_updates()["dev-0"]
    service = _service(h, broker, f"retry-{uuid.uuid4().hex[:8]}")
    device = _device(broker, "dev-0")
    retrying = _LogEvent(f"a message on {topic} failed")
    logging.getLogger("fedprune.coordinator").addHandler(retrying)
    lock = _Lock(db_url)
    try:
        # The lock goes once the service has failed to store the update and is waiting to retry.
        releaser = threading.Thread(target=lambda: (retrying.seen.wait(30), lock.release()))
        releaser.start()
        device.publish(topic, honest, timeout=30)
        _handle_next(service)
        releaser.join()
        assert retrying.seen.is_set(), "the service never retried the update: it was dropped"
        assert device.wait_for(lambda: device.of("ack"), 30), "the device got no ACK"
    finally:
        logging.getLogger("fedprune.coordinator").removeHandler(retrying)
        device.close()
        service.stop()
    (ack,) = [decode_envelope(a).header for a in device.of("ack")]
    assert ack["accepted"] and not ack["duplicate"]
    assert h.store.has_update(1, "dev-0", ack["task"])
    assert service.status()["handling"]["transient_failures"] >= 1
    assert not (tmp_path / "coordinator" / "dead-letter").exists()


def test_an_update_that_always_fails_is_dead_lettered_and_acknowledged(tmp_path, db_url, broker):
    h = Harness(tmp_path, _failing_fast(db_url), devices=1)
    h.clock.now = time.time()
    topic, honest = h.round_with_updates()["dev-0"]
    session = f"dead-{uuid.uuid4().hex[:8]}"
    service = _service(h, broker, session, attempts=2, first_delay_seconds=0.05)
    device = _device(broker, "dev-0")
    lock = _Lock(db_url)
    try:
        device.publish(topic, honest, timeout=30)
        _handle_next(service)
    finally:
        lock.release()
        service.stop()
    name = hashlib.sha256(honest).hexdigest()
    folder = tmp_path / "coordinator" / "dead-letter"
    assert (folder / f"{name}.bin").read_bytes() == honest
    kept = json.loads((folder / f"{name}.json").read_text())
    assert kept["topic"] == topic and "OperationalError" in kept["reason"] and kept["attempts"] == 2
    assert (folder / f"{name}.bin").stat().st_mode & 0o777 == 0o600
    assert service.status()["handling"]["dead_lettered"] == 1
    # Acknowledged: the same persistent session, reconnected, is not sent it again; the next
    # message it receives is one published after it reconnected.
    again = _service(h, broker, session)
    try:
        device.publish(h.topics.status("dev-0"), encode_envelope(
            MessageType.STATUS, {"device_id": "dev-0", "online": True}), timeout=30)
        assert _next(again)[0] == h.topics.status("dev-0")
    finally:
        device.close()
        again.stop()
    assert h.store.update_count(1) == 0  # kept for the operator; the device resends on its timer


def test_a_qos0_flood_does_not_grow_the_inbox_and_is_counted(tmp_path, broker):
    h = Harness(tmp_path, f"sqlite:///{tmp_path / 'c.db'}", devices=1)
    service = _service(h, broker, f"flood-{uuid.uuid4().hex[:8]}")
    flooder = _device(broker, "dev-0")
    try:
        for _ in range(500):
            flooder.client.publish(h.topics.update("dev-0"), b"x" * 1000, qos=0)
        # Sent after the flood on the same connection: delivered after it.
        flooder.publish(h.topics.status("dev-0"), encode_envelope(
            MessageType.STATUS, {"device_id": "dev-0", "online": True}))
        received = []
        while True:
            topic, *_ = _next(service)
            if topic == h.topics.status("dev-0"):
                break
            received.append(topic)
        assert received == [] and service.link.inbox.qsize() == 0
        assert service.status()["inbox"]["dropped_qos0"] == 500
    finally:
        flooder.close()
        service.stop()


def _drain(service: CoordinatorService, count: int) -> list[tuple[str, bytes]]:
    """Take `count` deliveries off the inbox as the engine would: each acknowledged once taken."""
    taken = []
    for _ in range(count):
        delivery = _next(service)
        service.link.ack(delivery.mid, delivery.qos)
        taken.append((delivery.topic, delivery.payload))
    return taken


def test_retained_state_past_the_inbox_limit_waits_in_the_broker_and_is_all_delivered(tmp_path, broker):
    """The retained registrations or status of more devices than the inbox holds arrive at once
    when the coordinator subscribes (Mosquitto's in-flight window does not hold them back). The
    link stops reading at the limit instead of leaving any unacknowledged (which held the
    broker's in-flight slots until a reconnect: a coordinator of a thousand devices stopped
    receiving updates), and takes the rest as the engine makes room."""
    h = Harness(tmp_path, f"sqlite:///{tmp_path / 'c.db'}", devices=1, broker={"inbox_limit": 10})
    tag = uuid.uuid4().hex[:8]
    topics = [h.topics.status(f"retained-{tag}-{i:02d}") for i in range(25)]
    device = _device(broker, "dev-0")
    for i, topic in enumerate(topics):
        device.client.publish(topic, f"status {i}".encode(), qos=1, retain=True).wait_for_publish(30)
    service = _service(h, broker, f"retained-{tag}", wait_subscribed=False)
    try:
        # Full at 10 (the connection marker taken off may free a place a waiting delivery takes).
        wait_until(lambda: service.link.counters["inbox_full"] >= 1 and service.link.inbox.qsize() == 10,
                   30, "the link to find the inbox full at its limit of 10", interval=0.05)
        taken = _drain(service, 25)
        assert sorted(p for t, p in taken if t in topics) == sorted(f"status {i}".encode() for i in range(25))
        # Nothing was left unacknowledged: a live message comes through at once.
        device.publish(h.topics.status("dev-0"), b"live", timeout=30)
        assert _next(service)[:2] == (h.topics.status("dev-0"), b"live")
        inbox = service.status()["inbox"]
        assert inbox["full_waits"] >= 1 and inbox["over_limit"] == 0 and inbox["queued"] == 0
    finally:
        for topic in topics:  # the module's broker keeps retained messages: clear them
            device.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(30)
        device.close()
        service.stop()


def test_the_inbox_is_bounded_in_bytes(tmp_path, broker):
    h = Harness(tmp_path, f"sqlite:///{tmp_path / 'c.db'}", devices=1,
                broker={"inbox_max_bytes": 1024})
    service = _service(h, broker, f"bytes-{uuid.uuid4().hex[:8]}")
    device = _device(broker, "dev-0")
    topic = h.topics.status("dev-0")
    try:
        for i in range(5):
            device.publish(topic, bytes([i]) * 600, timeout=30)
        wait_until(lambda: service.link.counters["inbox_full"] >= 1, 30,
                   "the link to find the inbox full", interval=0.05)
        assert service.link.inbox.qsize() == 2 and service.status()["inbox"]["bytes"] == 1200
        assert [p for _, p in _drain(service, 5)] == [bytes([i]) * 600 for i in range(5)]
        assert service.status()["inbox"]["over_limit"] == 0
    finally:
        device.close()
        service.stop()
