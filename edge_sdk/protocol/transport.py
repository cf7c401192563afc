"""The one MQTT 3.1.1 client of fedprune: the edge agent, the coordinator's link and the
profiler's network test all connect through `MqttTransport`.

`mqtt://host[:1883]` is plaintext; `mqtts://host[:8883]` is TLS, verified against `tls_ca` (the
fleet's CA from `fedprune coordinator provision`) or the system's trust store. Credentials are
the broker's password-file users; with the provisioned ACLs a device's user name is its id.

paho runs the network in its own thread, which only fills the inbox: whoever owns the transport
drains it from one thread of its own. Everything is published at QoS 1. Sessions are persistent
(clean_session=False) unless asked otherwise, so what is published to a client while it is away
is delivered when it returns, and paho reconnects with exponential backoff (1 s to 30 s).
Deliveries are acknowledged manually, once their owner has handled them (`ack`): a message
received just before a crash is delivered again.

A broker that cannot be reached is not silence: the transport keeps the connection's state
(`broker_state`: connecting, connected, refused with the broker's reason, retrying with the error
and when it tries next) for /status, /healthz and /metrics, and logs each change in words, once
(a broker down for an hour is a line per reason and a reminder every tenth attempt, not one a
second). An owner that cannot work without a broker asks `unreachable` whether to give up. MQTT
3.1.1 tells a client nothing when the broker drops it because another client connected with the
same client id; two such drops in a row within seconds of connecting are logged as that.

The inbox is bounded, in messages (`inbox_limit`) and in payload bytes (`inbox_max_bytes`), by
backpressure: when it is full, paho's thread waits for the owner to take a message before it
reads the next one from the socket, so the rest stays in the broker (and TCP) instead of this
process. The broker's in-flight window does not bound it: Mosquitto 2.0 sends a whole window
more for each acknowledgement (benchmarks/service_overhead.py found a thousand 360 kB updates
queued here at once, most of the coordinator's growth with fleet size). Nothing is left
unacknowledged: a delivery left so would hold one of the broker's in-flight slots until the next
reconnection, and enough of them stop every delivery (the retained registrations of a thousand
devices did). The wait is bounded, so that a stuck owner cannot stop the network thread past
half the keepalive (the broker would drop the connection), and it is not taken while the owner
waits for paho's thread (its publishes acknowledged, a SUBACK): past it, or meanwhile, the
delivery is queued over the limit and counted (`over_limit`). An owner that sends many large
messages therefore asks `can_publish` and sends the rest between deliveries rather than wait:
the broker's acknowledgements come on the same socket after whatever it sent before them, so
waiting for them reads it all in. QoS 0 deliveries, which nothing limits and no fedprune peer
sends, are dropped and counted.

Publishing is bounded too: paho keeps each QoS 1 message until the broker acknowledges it, so
`publish` waits for the oldest once `window` messages (or `window_bytes`) are unacknowledged.
"""

from __future__ import annotations

import logging
import queue
import ssl
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlparse

import paho.mqtt.client as mqtt


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not parsed.hostname:
            raise ValueError(f"broker must look like mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {url!r}")
        tls = parsed.scheme in ("mqtts", "ssl")
        return cls(parsed.hostname, parsed.port or (8883 if tls else 1883), tls)


def make_client(client_id: str, url: str, username: str | None = None, password: str | None = None,
                tls_ca: str | None = None, clean_session: bool = False,
                reconnect_on_failure: bool = True) -> tuple[mqtt.Client, BrokerAddress]:
    address = BrokerAddress.parse(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311, clean_session=clean_session,
                         reconnect_on_failure=reconnect_on_failure)
    if address.tls:
        client.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    elif tls_ca:
        raise ValueError(f"tls_ca is set but {url} is not mqtts://; use mqtts://HOST:PORT for TLS")
    if username is not None:
        client.username_pw_set(username, password)
    return client, address


# A connection the broker closes sooner than this after accepting it counts towards the
# client-id collision warning (two in a row): MQTT 3.1.1 says nothing of why.
SHORT_LIVED_SECONDS = 10.0

RECONNECTED = ""  # inbox marker (no real topic is empty): the transport (re)connected


class TransportError(ConnectionError):
    """The broker could not be reached, refused us, or refused a subscription; the text says which."""


class Delivery(NamedTuple):
    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float  # unix time of arrival: lateness is judged by it, not by handling time
    arrived: float = 0.0  # time.perf_counter() at arrival, for timing round trips


def _settled(info: mqtt.MQTTMessageInfo) -> bool:
    if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
        return True  # not connected, or not queued: paho logged why
    return info.is_published()


class Inbox(queue.Queue):
    """The deliveries waiting for the owner, with their payload bytes counted (`bytes`, read under
    `mutex`) and the most of each there ever were (`most`, `most_bytes`)."""

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self.bytes = self.most = self.most_bytes = 0

    def _put(self, item: Delivery) -> None:
        super()._put(item)
        self.bytes += len(item.payload)
        self.most, self.most_bytes = max(self.most, len(self.queue)), max(self.most_bytes, self.bytes)

    def _get(self) -> Delivery:
        item = super()._get()
        self.bytes -= len(item.payload)
        return item


class MqttTransport:
    """One MQTT connection with reconnect, manual acknowledgement and a bounded inbox.

    `subscriptions` are subscribed at QoS 1 on every (re)connection, then `on_connect` runs (in
    paho's thread: it may publish, never wait), then `connected` is set and, with
    `mark_reconnects`, a `RECONNECTED` delivery is queued so the owner learns of it in order.
    `will` (topic, payload) is the retained last will; `stop` publishes it itself, since a clean
    disconnect does not fire it.
    """

    def __init__(self, client_id: str, url: str, *, username: str | None = None,
                 password: str | None = None, tls_ca: str | None = None,
                 clean_session: bool = False, keepalive: int = 30,
                 subscriptions: Iterable[str] = (), on_connect: Callable[[], None] | None = None,
                 will: tuple[str, bytes] | None = None, inbox_limit: int = 1000,
                 inbox_max_bytes: int = 64 * 1024 * 1024, manual_ack: bool = True,
                 reconnect: bool = True, mark_reconnects: bool = False,
                 max_inflight: int = 20, window: int | None = 32, window_bytes: int | None = None,
                 logger: logging.Logger | None = None):
        self.client, self.address = make_client(client_id, url, username, password, tls_ca,
                                                clean_session, reconnect_on_failure=reconnect)
        self.client_id, self.url, self.keepalive = client_id, url, keepalive
        self.subscriptions = tuple(subscriptions)
        self.on_connect = on_connect
        self.will = will
        self.inbox = Inbox()
        self.inbox_limit, self.inbox_max_bytes = inbox_limit, inbox_max_bytes
        # Set while the owner waits for its own publishes to be sent, which only paho's thread
        # can do: that thread then queues past the limit rather than wait for room.
        self._owner_waits = threading.Event()
        self._overflowing = False  # a wait for room timed out: queue without waiting until room
        self._flushed = 0.0  # perf_counter of the last `_flush`
        self.mark_reconnects = mark_reconnects
        self.log = logger or logging.getLogger("fedprune.mqtt")
        # connects, disconnects; dropped_qos0: deliveries at QoS 0 (the protocol sends none);
        # inbox_full: deliveries that waited for room in the inbox; over_limit: those queued
        # past its limits because the owner made no room in time (or waited on a publish).
        self.counters: Counter[str] = Counter()
        self.connected = threading.Event()
        self.stopping = threading.Event()
        self.refusal: str | None = None  # why the broker refused the last connection attempt
        # The connection's state, for logs, /status, /healthz and the agent's give-up:
        # connecting (first attempt), connected, refused (the broker answered no), retrying (no
        # answer, or the connection was lost), stopped. `last_error` says why it is not connected.
        self.state, self.state_since, self.last_error = "connecting", time.time(), None
        self.attempts = 0          # failed attempts since the last connection
        self._retries = reconnect  # paho reconnects by itself
        self._started: float | None = None   # monotonic time of `start`
        self._connected_at: float | None = None  # monotonic time of the current connection
        self._lost_at: float | None = None       # and of the last one's loss
        self._short_lived = 0      # connections in a row the broker closed soon after accepting
        self._tried = False        # paho's reconnect() ran since its last wait
        self._connack = False      # the current attempt got a CONNACK (accepted or not)
        self._retry_at: float | None = None  # monotonic time of paho's next attempt
        # (what happened, what to check): logged once paho's retry delay is known
        self._unlogged: tuple[str, str] | None = None
        self._hooked = False  # paho's retry wait is observed (`_hook_retries`)
        self._answered = threading.Event()  # CONNACK received (accepted or not)
        self._own_subscriptions: set[int] = set()  # mids of the subscriptions made on connect
        self._subacks: dict[int, list] = {}  # mid -> reason codes, for `subscribe` to collect
        self._subacked = threading.Condition()
        self._network_thread: threading.Thread | None = None
        # paho keeps every queued message in memory; waiting for the oldest once `window` are
        # unsent keeps a publisher's memory independent of how many messages it sends.
        # `window_bytes` bounds their payload bytes too; `can_publish` tells an owner that sends
        # many large messages (the coordinator's tasks) whether one more fits without waiting.
        self.pending: deque[tuple[mqtt.MQTTMessageInfo, int]] = deque()
        self.pending_bytes = 0
        self._pending_lock = threading.Lock()
        self.window, self.window_bytes = window, window_bytes
        client = self.client
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)  # exponential backoff
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)
        client.manual_ack_set(manual_ack)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._hook_retries()

    # --- connection state -----------------------------------------------------------------------
    def broker_state(self) -> dict:
        """The connection as an operator reads it (/status, the dashboard): state, since when,
        why not connected, the failed attempts and when the next one is, reconnections so far,
        and the connections in a row the broker closed within seconds (another client with
        this client id)."""
        now = time.monotonic()
        retry_in = None
        if self.state in ("refused", "retrying") and self._retry_at is not None:
            retry_in = round(max(0.0, self._retry_at - now), 1)
        # Counted while it goes on: connected or lost within the last few seconds.
        recent = self._connected_at if self._connected_at is not None else self._lost_at
        short = self._short_lived if recent is not None and now - recent < SHORT_LIVED_SECONDS \
            else 0
        return {"url": self.url, "client_id": self.client_id, "state": self.state,
                "since": self.state_since, "last_error": self.last_error,
                "attempts": self.attempts, "retry_in": retry_in,
                "reconnects": max(0, self.counters["connects"] - 1), "short_connections": short}

    def unreachable(self, give_up: float) -> str | None:
        """Why an owner that cannot work without the broker should stop: no connection accepted
        `give_up` seconds after `start` (a broker lost later is waited for: it was right once).
        None while there is time, or once connected. The owner adds what to check in its own
        configuration's words."""
        if (self.counters["connects"] or self._started is None
                or time.monotonic() - self._started < give_up):
            return None
        tries = f"{self.attempts} attempt{'s' * (self.attempts != 1)} as {self.client_id}"
        if self.state == "refused":
            return (f"the broker at {self.url} refused every connection in {give_up:g} s "
                    f"({tries}; last: {self.last_error})")
        return (f"no broker answered at {self.url} in {give_up:g} s "
                f"({tries}; last: {self.last_error or 'no answer'})")

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            self.state, self.state_since = state, time.time()
        self.last_error = error

    def _failed_attempt(self, error: str, line: str, hint: str) -> None:
        """A connection attempt that failed. `line`, when paho tries again and `hint` (what to
        check) are logged on the first failure, on a new reason, and every tenth attempt: not
        once a second for as long as the broker is down. A transport that does not reconnect
        logs nothing: its owner gets the TransportError."""
        self.attempts += 1
        changed = error != self.last_error
        self._set_state("refused" if self.refusal else "retrying", error)
        if self._retries and (changed or self.attempts == 1 or self.attempts % 10 == 0):
            self._tell(f"{line} (attempt {self.attempts})", hint)

    def _tell(self, line: str, hint: str) -> None:
        """Log a failure with when paho tries next: from the wait hook, which knows it (or now,
        without the delay, if this paho has no `_reconnect_wait` to hook)."""
        if self._hooked:
            self._unlogged = (line, hint)
        else:
            self.log.warning("%s; retrying%s", line, hint and f". {hint}")

    def _hook_retries(self) -> None:
        """paho retries by itself, sleeping in `_reconnect_wait` (1 s doubling to 30 s, back to
        1 s once connected); these two hooks learn when it will try next, so the state and the
        log say "retrying in N s". paho's very first failure (from `connect_async`) also waits
        twice before its next try, once per loop of `loop_forever`; a wait with no attempt since
        the last one returns at once, so the waits are 1, 2, 4, ... s as its documentation says."""
        client = self.client
        paho_reconnect = client.reconnect

        def reconnect():
            self._tried, self._connack = True, False
            return paho_reconnect()

        client.reconnect = reconnect
        # paho's private names (2.1, 2.2): without them no "in N s", and the double wait stays.
        self._hooked = all(hasattr(client, name) for name in (
            "_reconnect_wait", "_reconnect_delay_mutex", "_reconnect_delay",
            "_reconnect_min_delay", "_reconnect_max_delay"))
        if not self._hooked:
            return
        paho_wait = client._reconnect_wait

        def reconnect_wait() -> None:
            if not self._tried:
                return
            self._tried = False
            with client._reconnect_delay_mutex:  # what paho_wait will compute
                delay = client._reconnect_delay
                delay = client._reconnect_min_delay if delay is None else \
                    min(delay * 2, client._reconnect_max_delay)
            self._retry_at = time.monotonic() + delay
            if self._unlogged is not None:
                line, hint = self._unlogged
                self.log.warning("%s; retrying in %g s%s", line, delay, hint and f". {hint}")
                self._unlogged = None
            paho_wait()

        client._reconnect_wait = reconnect_wait

    def wait_connected(self, timeout: float) -> bool:
        """Whether the broker accepted a connection within `timeout` seconds."""
        return self.connected.wait(timeout)

    # --- paho's network thread ------------------------------------------------------------------
    def _on_connect_fail(self, client, userdata) -> None:
        """No answer: paho calls this inside its `except OSError`, so the error is at hand."""
        error = sys.exc_info()[1]
        self.refusal = None
        error = f"{getattr(error, 'strerror', None) or error or 'no answer'}"
        self._failed_attempt(error, f"cannot reach the broker at {self.url} as {self.client_id}: "
                                    f"{error}", "Check that the broker runs, and its address and port")

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self._network_thread = threading.current_thread()
        self._connack = True
        if reason_code.is_failure:
            self.refusal = str(reason_code)
            self._answered.set()
            self._failed_attempt(
                f"the broker refused the connection: {reason_code}",
                f"the broker at {self.url} refused the connection as {self.client_id}: "
                f"{reason_code}", "Check the user name, password and client id it expects")
            return
        self.refusal = None
        self.attempts = 0
        self._retry_at = None
        self._connected_at = time.monotonic()
        was = self.state_since
        self._set_state("connected")
        self.counters["connects"] += 1
        self._own_subscriptions.clear()
        for topic in self.subscriptions:
            self._own_subscriptions.add(client.subscribe(topic, qos=1)[1])
        if self.on_connect is not None:
            self.on_connect()
        self.connected.set()
        self._answered.set()
        if self.mark_reconnects:  # e.g. a task published while the broker went down may be lost
            self.inbox.put(Delivery(RECONNECTED, b"", 0, 0, time.time(), time.perf_counter()))
        if self.counters["connects"] == 1:
            self.log.info("connected to the broker at %s as %s", self.url, self.client_id)
        else:  # quiet while another client takes the id in turn: `_on_disconnect` says so
            self.log.log(logging.DEBUG if self._short_lived >= 2 else logging.INFO,
                         "reconnected to the broker at %s as %s after %.0f s without a connection "
                         "(reconnection %d)", self.url, self.client_id, time.time() - was,
                         self.counters["connects"] - 1)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self.connected.clear()
        self.counters["disconnects"] += 1
        if self.stopping.is_set():
            self._set_state("stopped")
            return
        lasted = None if self._connected_at is None else time.monotonic() - self._connected_at
        self._connected_at = None
        # paho's word for a socket that closed (MQTT 3.1.1 sends no reason) is "Unspecified error"
        why = "the socket closed" if str(reason_code) == "Unspecified error" else str(reason_code)
        if lasted is None:
            if not self._connack:
                # The socket opened but closed before any CONNACK: not a broker, or TLS on
                # one side only. (A refusal was told by `_on_connect`.)
                self.refusal = None
                self._failed_attempt(
                    f"no answer to CONNECT ({why})",
                    f"the server at {self.url} closed the connection without answering as an "
                    f"MQTT broker ({why})", "Check the port, and mqtt:// (plain) against "
                    "mqtts:// (TLS)")
            return
        self._lost_at = time.monotonic()
        self._set_state("retrying", f"connection lost ({why})")
        # MQTT 3.1.1 gives no reason: a broker drops the older of two clients with one id as the
        # newer connects, and then the other way round, each within seconds of accepting it.
        self._short_lived = self._short_lived + 1 if lasted < SHORT_LIVED_SECONDS else 0
        if self._short_lived < 2:
            if self._retries:  # else its owner learns it from `connected` and says so
                self._tell(f"lost the connection to the broker at {self.url} after "
                           f"{lasted:.0f} s connected ({why})", "")
            return
        if self._short_lived in (2, 10) or self._short_lived % 50 == 0:
            self.log.error("another client connected with client id %s and the broker "
                           "disconnected this one (%d times in a row, each within seconds of "
                           "connecting); give each coordinator its own client_id (broker.client_id,"
                           " or leave it unset for one of its own) and each device its own "
                           "device_id", self.client_id, self._short_lived)

    def _on_message(self, client, userdata, msg) -> None:
        """The inbox's only producer: its size check is exact."""
        if msg.qos == 0:
            self.counters["dropped_qos0"] += 1
            dropped = self.counters["dropped_qos0"]
            if dropped in (1, 10, 100) or dropped % 1000 == 0:
                self.log.warning("dropped %d QoS 0 messages (latest on %s): fedprune peers "
                                 "publish at QoS 1 only", dropped, msg.topic)
            return
        received_at, arrived = time.time(), time.perf_counter()
        if arrived - self._flushed >= 0.5:  # paho may read many packets before it writes
            self._flush()
        if self._room():
            self._overflowing = False
        else:
            self.counters["inbox_full"] += 1
            # After a wait that timed out, the next deliveries do not wait until there is room
            # again: paho's thread must get back to its own loop (keepalive pings) meanwhile.
            if self._overflowing or not self._wait_for_room(max(1.0, self.keepalive / 2)):
                self._overflowing = not self._owner_waits.is_set()
                self.counters["over_limit"] += 1
                over = self.counters["over_limit"]
                if over in (1, 10, 100) or over % 1000 == 0:
                    self.log.warning("inbox full (%d messages, %.0f MB) while its owner waited "
                                     "for the broker or made no room in time; %d deliveries "
                                     "queued past its limits (latest on %s)",
                                     self.inbox.qsize(), self.inbox.bytes / 1e6, over, msg.topic)
        self.inbox.put(Delivery(msg.topic, msg.payload, msg.mid, msg.qos, received_at, arrived))

    def _room(self) -> bool:
        """Whether one more delivery fits (an empty inbox takes any one)."""
        with self.inbox.mutex:
            return self._has_room()

    def _has_room(self) -> bool:  # under inbox.mutex
        queued = len(self.inbox.queue)
        return queued == 0 or (queued < self.inbox_limit and self.inbox.bytes < self.inbox_max_bytes)

    def _wait_for_room(self, timeout: float) -> bool:
        """Wait (in paho's thread: the socket is not read meanwhile) until the owner has taken
        enough; False if it did not within `timeout`, or waits for paho's thread, or is stopping.
        Meanwhile what the owner queued (its acknowledgements, publishes) is written every half
        second, as on arrival: paho reads up to one packet per unacknowledged message before it
        writes, and the broker drops a client it hears nothing from for 1.5 keepalives."""
        deadline = time.monotonic() + timeout
        while True:
            with self.inbox.not_full:  # notified by every get
                self.inbox.not_full.wait_for(
                    lambda: self._has_room() or self._owner_waits.is_set() or self.stopping.is_set(),
                    max(0.0, min(0.5, deadline - time.monotonic())))
                if self._has_room():
                    return True
                if self._owner_waits.is_set() or self.stopping.is_set():
                    return False
            if time.monotonic() >= deadline:
                return False
            if time.perf_counter() - self._flushed >= 0.5:
                self._flush()

    def _flush(self) -> None:
        """Write what is queued for the broker, from paho's thread inside its message callback.
        paho's `_packet_write` (not `loop_write`, whose error handling calls on_disconnect under
        the callback lock this thread holds); never once stopping (the DISCONNECT packet would
        do the same). A failure is left for paho's own loop to find on its next write."""
        self._flushed = time.perf_counter()
        if self.stopping.is_set() or not self.client.want_write():
            return
        try:
            self.client._packet_write()
        except Exception:  # noqa: BLE001 - paho's loop reports the connection's state itself
            pass

    def _release_network_thread(self) -> None:
        with self.inbox.not_full:
            self.inbox.not_full.notify_all()

    @property
    def subscribed(self) -> bool:
        """Connected, and the broker has acknowledged every subscription made on connecting:
        from now on a message another client publishes on them reaches this one. (`connected`
        and the RECONNECTED marker come with CONNACK, a moment before the SUBACKs.)"""
        return self.connected.is_set() and not self._own_subscriptions

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:
        if mid not in self._own_subscriptions:
            with self._subacked:
                self._subacks[mid] = reason_codes
                self._subacked.notify_all()
            return
        self._own_subscriptions.discard(mid)
        if any(code.is_failure for code in reason_codes):
            self.log.error("the broker refused a subscription (%s): check its ACL", reason_codes)

    # --- the owner's thread ---------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background: paho retries (with backoff) until the broker answers."""
        self.log.info("connecting to the broker at %s as %s", self.url, self.client_id)
        self._started = time.monotonic()
        self.client.connect_async(self.address.host, self.address.port, keepalive=self.keepalive)
        self.client.loop_start()

    def connect(self, timeout: float) -> None:
        """Connect now and wait for the broker's answer; TransportError says why it failed."""
        self.client.connect_timeout = timeout
        try:
            self.client.connect(self.address.host, self.address.port, keepalive=self.keepalive)
        except OSError as exc:
            raise TransportError(f"cannot connect ({exc.strerror or exc})") from None
        self.client.loop_start()
        if not self._answered.wait(timeout):
            raise TransportError("no answer to CONNECT")
        if not self.connected.is_set():
            raise TransportError(f"connection refused by the broker ({self.refusal})")

    def subscribe(self, topic: str, timeout: float) -> None:
        """Subscribe at QoS 1 now (not again after a reconnect) and wait for the broker's SUBACK."""
        result, mid = self.client.subscribe(topic, qos=1)
        granted = None
        if result == mqtt.MQTT_ERR_SUCCESS:
            self._owner_waits.set()  # the SUBACK comes through paho's thread: it must not wait
            self._release_network_thread()
            try:
                with self._subacked:
                    self._subacked.wait_for(lambda: mid in self._subacks, timeout)
                    granted = self._subacks.pop(mid, None)
            finally:
                self._owner_waits.clear()
        if not granted or any(code.is_failure for code in granted):
            raise TransportError(f"cannot subscribe to {topic} ({granted or result})")

    def _over_window(self, extra: int = 0) -> bool:  # under _pending_lock
        """Whether the unacknowledged messages, and `extra` more messages and bytes, are past
        `window` or `window_bytes` (None: that one is unbounded)."""
        return (self.window is not None and len(self.pending) + extra > self.window) or (
            self.window_bytes is not None and self.pending_bytes + extra > self.window_bytes)

    def _settle(self) -> None:
        """Forget the oldest pending messages that the broker has acknowledged, or that were
        published while disconnected (paho sends those on reconnecting, and the owner re-sends
        what matters then: they are not waited for, as before)."""
        with self._pending_lock:
            while self.pending and _settled(self.pending[0][0]):
                self.pending_bytes -= self.pending.popleft()[1]

    def can_publish(self) -> bool:
        """Whether a message can be published now without waiting: fewer than `window` messages
        and `window_bytes` bytes published and not yet acknowledged by the broker (an owner that
        waits for that keeps paho's thread reading: see the module's docstring)."""
        self._settle()
        with self._pending_lock:
            return not self.pending or not self._over_window(extra=1)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """QoS 1; paho queues it while disconnected and sends it on reconnect. Past `window`
        unacknowledged messages (or `window_bytes`), waits for the oldest (never in paho's own
        thread, which sends them; never for the message just published)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._pending_lock:
            self.pending.append((info, len(payload)))
            self.pending_bytes += len(payload)
        while True:
            self._settle()
            with self._pending_lock:
                if len(self.pending) <= 1 or not self._over_window():
                    break
                oldest, size = self.pending.popleft()
                self.pending_bytes -= size
            if self.connected.is_set() and threading.current_thread() is not self._network_thread:
                self._owner_waits.set()  # paho's thread must not wait for room meanwhile
                self._release_network_thread()
                try:
                    oldest.wait_for_publish(timeout=30)
                except (RuntimeError, ValueError):  # not queued: paho logged why
                    pass
                finally:
                    self._owner_waits.clear()
        return info

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a delivery to the broker, once it has been handled."""
        self.client.ack(mid, qos)

    def stop(self) -> None:
        """Publish the will (if connected; a clean disconnect does not fire it) and disconnect."""
        self.stopping.set()
        self._release_network_thread()
        if self.will is not None and self.connected.is_set():
            info = self.client.publish(self.will[0], self.will[1], qos=1, retain=True)
            try:
                info.wait_for_publish(5)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
