"""The coordinator's MQTT connection: the shared `MqttTransport` with the coordinator's
subscriptions, a persistent QoS 1 session and an inbox for the engine.

paho's network thread only enqueues; the engine consumes from one thread. The session is
persistent (clean_session=False) under a fixed client id, so updates published while the
coordinator is down or restarting are queued by the broker and delivered when it returns; and
messages are acknowledged only once handled. Every (re)connection puts a `RECONNECTED` marker in
the inbox, so the engine re-sends its unanswered tasks (one published while the broker was going
down may be lost).

The inbox is bounded in messages and bytes (`inbox_limit`, `inbox_max_bytes`) by backpressure:
when it is full the link stops reading from the broker until the engine takes a message, so the
coordinator's memory stays the same however many devices answer at once (the broker's in-flight
window does not bound it: see edge_sdk/protocol/transport.py). Every topic of the protocol is
QoS 1; QoS 0 deliveries are dropped on arrival and counted. Publishing waits for the oldest
message once 16 MiB are unacknowledged, so a round's tasks to a thousand devices never all sit
in paho's queue at once; the engine sends tasks only while `can_publish`, between deliveries, so
that it never waits. The messages are not counted (`window=None`): ACKs are a few hundred bytes
each, and a count window filled with the ACKs of a 5,000-device round while the link was holding back,
and the engine's wait read every update in.

In cluster mode (service.py, [cluster]) the service passes its own subscriptions (updates and
refusals through the broker's shared subscription) and a clean session: see `cluster_subscriptions`.
"""

from __future__ import annotations

import logging

from edge_sdk.protocol import Topics
from edge_sdk.protocol.transport import RECONNECTED, Delivery, MqttTransport

__all__ = ["RECONNECTED", "CoordinatorLink", "Delivery", "cluster_subscriptions"]

log = logging.getLogger("fedprune.coordinator.mqtt")


def cluster_subscriptions(topics: Topics, group: str) -> list[str]:
    """A cluster member's subscriptions: updates and refusals through the shared subscription
    `$share/<group>/...`, which the broker hands to one member of the group each (Mosquitto 2.0,
    EMQX and HiveMQ accept it from MQTT 3.1.1 clients); registrations and status, retained, to
    every member (only the leader acts on them, and it subscribes again when it takes the lead,
    which makes the broker send every retained one again)."""
    return [f"$share/{group}/{topics.root}/{kind}/+" for kind in ("update", "refusal")] + \
           [f"{topics.root}/{kind}/+" for kind in ("register", "status")]


class CoordinatorLink(MqttTransport):
    def __init__(self, url: str, topics: Topics, client_id: str, keepalive: int = 30,
                 username: str | None = None, password: str | None = None, tls_ca: str | None = None,
                 inbox_limit: int = 1000, subscriptions: list[str] | None = None,
                 clean_session: bool = False, inbox_max_bytes: int = 16 * 1024 * 1024):
        super().__init__(client_id, url, username=username, password=password, tls_ca=tls_ca,
                         keepalive=keepalive, clean_session=clean_session,
                         subscriptions=(topics.coordinator_subscriptions() if subscriptions is None
                                        else subscriptions),
                         inbox_limit=inbox_limit, inbox_max_bytes=inbox_max_bytes,
                         mark_reconnects=True, max_inflight=100, window=None,
                         window_bytes=16 * 1024 * 1024,
                         logger=log)
        self.topics = topics
