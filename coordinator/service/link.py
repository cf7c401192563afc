"""The coordinator's MQTT connection: a persistent QoS 1 session and an inbox for the engine.

paho's network thread only enqueues; the engine consumes from one thread. The session is
persistent (clean_session=False) under a fixed client id, so updates published while the
coordinator is down or restarting are queued by the broker and delivered when it returns; and
messages are acknowledged only once handled (see `__init__`).

The inbox is bounded: every topic of the protocol is QoS 1, whose deliveries the broker limits to
its in-flight window; QoS 0 ones, which nothing limits, are dropped on arrival and counted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from typing import NamedTuple

import paho.mqtt.client as mqtt

from edge_sdk.protocol import Topics
from edge_sdk.protocol.transport import make_client

log = logging.getLogger("fedprune.coordinator.mqtt")

RECONNECTED = ""  # inbox marker (no real topic is empty): the link (re)connected


class Delivery(NamedTuple):
    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float  # unix time of arrival: lateness is judged by it, not by handling time


class CoordinatorLink:
    def __init__(self, url: str, topics: Topics, client_id: str, keepalive: int = 30,
                 username: str | None = None, password: str | None = None, tls_ca: str | None = None,
                 inbox_limit: int = 1000):
        self.topics = topics
        self.inbox: queue.Queue[Delivery] = queue.Queue()
        self.inbox_limit = inbox_limit
        # dropped_qos0: deliveries at QoS 0 (the protocol sends none); dropped_inbox_full:
        # deliveries past inbox_limit (not acknowledged, so the broker sends them again).
        self.counters: Counter[str] = Counter()
        self.connected = threading.Event()
        self.client, address = make_client(client_id, url, username, password, tls_ca)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        # Manual acknowledgement: a message is acknowledged to the broker only after the engine
        # has handled it (an update: stored). The broker sends at most its in-flight window
        # (max_inflight_messages) of unacknowledged messages, so the inbox, and the
        # coordinator's memory, stay small however many devices answer at once; and a message
        # the coordinator received but had not stored when it crashed is delivered again.
        self.client.manual_ack_set(True)
        self.client.on_message = self._on_message
        self.host, self.port, self.keepalive = address.host, address.port, keepalive
        self.pending: deque[mqtt.MQTTMessageInfo] = deque()
        self.window = 32
        self.stopping = False

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        for topic in self.topics.coordinator_subscriptions():
            client.subscribe(topic, qos=1)
        self.connected.set()
        # Tell the engine: a task published while the broker was going down may be lost.
        self.inbox.put(Delivery(RECONNECTED, b"", 0, 0, time.time()))
        log.info("connected to mqtt://%s:%d", self.host, self.port)

    def _on_message(self, client, userdata, msg) -> None:
        """paho's network thread, the inbox's only producer: its size check is exact."""
        if msg.qos == 0:
            self.counters["dropped_qos0"] += 1
            if self.counters["dropped_qos0"] in (1, 10, 100) or self.counters["dropped_qos0"] % 1000 == 0:
                log.warning("dropped %d QoS 0 messages (latest on %s): fedprune peers publish at "
                            "QoS 1 only", self.counters["dropped_qos0"], msg.topic)
            return
        if self.inbox.qsize() >= self.inbox_limit:
            self.counters["dropped_inbox_full"] += 1
            log.warning("inbox full (%d messages); a message on %s is left unacknowledged for the "
                        "broker to deliver again", self.inbox_limit, msg.topic)
            return
        self.inbox.put(Delivery(msg.topic, msg.payload, msg.mid, msg.qos, time.time()))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        self.connected.clear()
        if not self.stopping:
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()

    def ack(self, mid: int, qos: int) -> None:
        self.client.ack(mid, qos)

    def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1; paho queues it while disconnected and sends it on reconnect.

        paho keeps every queued message in memory, so a round's tasks to a thousand devices would
        all sit here at once; waiting for the oldest once `window` are unsent keeps the
        coordinator's memory independent of the fleet's size.
        """
        self.pending.append(self.client.publish(topic, payload, qos=1))
        while len(self.pending) > self.window:
            oldest = self.pending.popleft()
            if self.connected.is_set():
                try:
                    oldest.wait_for_publish(timeout=30)
                except (RuntimeError, ValueError):  # not queued: paho logged why
                    pass

    def stop(self) -> None:
        self.stopping = True
        self.client.disconnect()
        self.client.loop_stop()
