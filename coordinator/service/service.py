"""`fedprune coordinator serve`: the engine, its MQTT link, the store and the HTTP API.

One thread runs the engine: it drains the link's inbox and ticks the clock. Nothing else
touches the engine's state, so it needs no locks. The HTTP API (http_api.py) serves from its own
threads and reads the store through its own sessions.

Acknowledgement policy: a message is acknowledged to the broker once the engine has handled it,
or refused it (the engine tells the device why). One whose handling failed for a reason that may
pass (`is_transient`: the database is down or locked, the disk is full) is not: it is tried again
with exponential backoff ([retry] in coordinator.toml), and if it still fails it is kept in
state_dir/dead-letter/ (the raw bytes as <sha256>.bin, topic and reason in <sha256>.json) and only
then acknowledged, so it is neither lost nor redelivered forever. The device, which got no ACK,
sends the update again on its resend timer.

Cluster mode ([cluster] enabled; docs/ARCHITECTURE.md, "Several coordinators"): several of these
processes share one PostgreSQL database. Each connects to the broker with a clean session under
its own client id and takes in updates and refusals from a shared subscription; the one holding
the leader lock (cluster.py) also acts on registrations and status, ticks and commits rounds.
Every `takeover_poll_seconds` a follower tries the lock (and reads the open round) and the leader
checks it still holds it. A follower that takes the lead resumes the open round from the
database and subscribes again to registrations and status, whose retained messages the broker
then sends again (what arrived while no one led).

Fencing (cluster.py): the leader's store writes under its leader epoch. Before each retry of a
leader's step (the round step, taking the lead, re-sending tasks, a registration) the service
asks the lock again, so a leader that was paused and woke to a failing query steps down instead
of trying again; a step the store refuses as `Deposed` steps down too, and a message it was
handling is handled again as a follower's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from device_profiles.files import atomic_write
from edge_sdk.protocol import Topics
from edge_sdk.rehearsal import peak_rss_bytes

from ..config import ConfigError
from .cluster import Leadership, member_url
from .config import ServiceSettings
from .engine import RoundEngine, is_transient
from .http_api import ApiServer, build_app
from .link import RECONNECTED, CoordinatorLink, Delivery, cluster_subscriptions
from .store import Deposed, Store

log = logging.getLogger("fedprune.coordinator")


class _Stopped(Exception):
    """The service is stopping while waiting to try again: the message stays unacknowledged."""


CLIENT_ID_FILE = "mqtt-client-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def coordinator_client_id(config: ServiceSettings) -> str:
    """The MQTT client id this coordinator connects with. With broker credentials it is the user
    name (the broker binds them); a cluster member's is `<client_id>-<node>` (its node name is
    unique in the cluster). Otherwise `broker.client_id` if set, else an id made on the first start
    and kept in state_dir: the same coordinator gets its persistent session (updates queued while it
    was away) back after a restart, and a second coordinator on the broker (another state_dir, such
    as `fedprune demo --broker` beside `serve`) cannot take it over and evict the first."""
    broker, cluster = config.broker, config.cluster
    if broker.username:
        return broker.username
    if cluster.enabled:
        return f"{broker.client_id or 'fedprune-coordinator'}-{cluster.node}"
    if broker.client_id:
        return broker.client_id
    path = Path(config.state_dir) / CLIENT_ID_FILE
    try:
        kept = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        kept = None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}); remove it to make a new client id, or set "
                          "broker.client_id") from None
    if kept is not None:
        if not _CLIENT_ID.fullmatch(kept):
            raise ConfigError(f"{path} does not hold a client id (1-64 letters, digits, '_.-'); "
                              "remove it to make a new one, or set broker.client_id")
        return kept
    made = f"fedprune-coordinator-{secrets.token_hex(4)}"
    atomic_write(path, made.encode("ascii"))
    return made


class CoordinatorService:
    def __init__(self, config: ServiceSettings):
        self.config = config
        broker, cluster = config.broker, config.cluster
        self.store = Store(member_url(config.database_url, cluster.node) if cluster.enabled
                           else config.database_url)
        topics = Topics(broker.fleet, broker.topic_prefix)
        if cluster.enabled:
            # A clean session: the broker drops a dead member from the shared subscription as soon
            # as its connection closes. (Mosquitto 2.0 keeps handing a disconnected member with a
            # persistent session its share of the updates, queued until it returns.) With a
            # broker user, the client id is the user name: give each coordinator its own user.
            self.link = CoordinatorLink(broker.url, topics, coordinator_client_id(config),
                                        broker.keepalive,
                                        broker.username, broker.password, broker.tls_ca,
                                        broker.inbox_limit,
                                        subscriptions=cluster_subscriptions(topics, cluster.group),
                                        clean_session=True, inbox_max_bytes=broker.inbox_max_bytes)
            self.leadership: Leadership | None = Leadership(config.database_url, cluster)
        else:
            self.link = CoordinatorLink(broker.url, topics, coordinator_client_id(config),
                                        broker.keepalive,
                                        broker.username, broker.password, broker.tls_ca,
                                        broker.inbox_limit, inbox_max_bytes=broker.inbox_max_bytes)
            self.leadership = None
        self.engine = RoundEngine(config, self.store, self.link.publish,
                                  leading=not cluster.enabled, can_publish=self.link.can_publish)
        self.polled_at = float("-inf")  # when the leader lock was last polled (cluster mode)
        self.dead_letters = Path(config.state_dir) / "dead-letter"
        # transient_failures: attempts that failed and were tried again; dead_lettered: messages
        # kept in dead-letter/ after the last attempt.
        self.counters: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.http: ApiServer | None = None

    @property
    def http_url(self) -> str | None:
        """The HTTP API's base URL while it serves (http_port 0: the port the OS picked)."""
        return None if self.http is None else self.http.url

    @property
    def status_url(self) -> str | None:
        return None if self.http is None else f"{self.http.url}/status"

    def unhealthy(self) -> str | None:
        """Why /healthz fails (None: healthy): no connection to the broker for longer than
        broker.unhealthy_after_seconds, or the broker closing each connection within seconds
        because another client connects with this coordinator's client id."""
        broker = self.link.broker_state()
        if broker["short_connections"] >= 2:
            return (f"another client is connecting to the broker at {broker['url']} with this "
                    f"coordinator's client id {broker['client_id']}: the broker disconnected it "
                    f"{broker['short_connections']} times in a row; give each coordinator its own "
                    "broker.client_id (or leave it unset)")
        out_for = time.time() - broker["since"]
        limit = self.config.broker.unhealthy_after_seconds
        if broker["state"] == "connected" or out_for < limit:
            return None
        return (f"not connected to the broker at {broker['url']} for {out_for:.0f} s, more than "
                f"broker.unhealthy_after_seconds ({limit:g}): {broker['state']}, last error: "
                f"{broker['last_error'] or 'no answer'}")

    def status(self) -> dict:
        """The engine's status, plus the broker connection, what the link dropped or held back
        and what handling retried or kept."""
        link = self.link
        return {**self.engine.status(), "broker": link.broker_state(),
                "inbox": {"queued": link.inbox.qsize(), "limit": link.inbox_limit,
                          "bytes": link.inbox.bytes, "max_bytes": link.inbox_max_bytes,
                          "dropped_qos0": link.counters["dropped_qos0"],
                          "full_waits": link.counters["inbox_full"],
                          "over_limit": link.counters["over_limit"]},
                "handling": {"transient_failures": self.counters["transient_failures"],
                             "dead_lettered": self.counters["dead_lettered"]},
                **({} if self.leadership is None else {"cluster": {
                    "node": self.config.cluster.node,
                    "role": "leader" if self.engine.leading else "follower",
                    "leader_since": self.leadership.since,
                    "leader_epoch": self.store.fence,
                    "updates_accepted": self.engine.counters["updates_accepted"]}})}

    def start(self) -> None:
        """The HTTP API first: an address it cannot listen on stops the service before the link
        connects (ConfigError)."""
        if self.config.http_port is not None:
            self.http = ApiServer(build_app(self.store, self.config, self.status,
                                            health=self.unhealthy),
                                  self.config.http_host, self.config.http_port,
                                  self.config.http_token).start()
        if self.leadership is not None:
            self._poll_leadership()
        self.link.start()

    def run(self) -> None:
        """Serve until stopped, or until every round is committed when exit_when_done is set."""
        self.start()
        try:
            while not self.stopping.is_set():
                try:
                    self._handle(self.link.inbox.get(timeout=0.2))
                    while True:  # drain what arrived meanwhile before ticking
                        self._handle(self.link.inbox.get_nowait())
                        if self.leadership is not None:  # a takeover waits for one message at most
                            self._poll_leadership()
                except queue.Empty:
                    pass
                if self.leadership is not None:
                    self._poll_leadership()
                if self.engine.leading:
                    self._tick()
                if self.config.exit_when_done and self._done():
                    log.info("done: %d of %d rounds committed", self.engine.committed_rounds(),
                             self.config.rounds.total,
                             extra={"peak_rss_bytes": peak_rss_bytes(),
                                    "devices_registered": len(self.store.devices()),
                                    "inbox": {"most_queued": self.link.inbox.most,
                                              "most_bytes": self.link.inbox.most_bytes,
                                              **self.link.counters}})
                    break
        except _Stopped:
            pass
        finally:
            self.stop()

    def _done(self) -> bool:
        """Whether every round is committed; a database that does not answer now (a connection a
        takeover ended while this coordinator was paused, a restart) is asked again next loop,
        rather than ending the process."""
        try:
            return self.engine.done
        except Exception as exc:  # noqa: BLE001 - only a transient failure is waited out
            if not is_transient(exc):
                raise
            self.counters["transient_failures"] += 1
            log.warning("could not read whether every round is committed (%s: %s); asking again",
                        type(exc).__name__, exc)
            return False

    def _poll_leadership(self, force: bool = False) -> None:
        """Cluster mode, every takeover_poll_seconds: take the lead if it is free, keep it, or
        step down when its lock connection is gone; a follower reads the open round."""
        now = time.monotonic()
        if not force and now - self.polled_at < self.config.cluster.takeover_poll_seconds:
            return
        self.polled_at = now
        leading = self.leadership.poll()
        if leading and not self.engine.leading:
            self._take_lead()
        elif not leading and self.engine.leading:
            self._step_down()
        if not self.engine.leading:
            self._attempt(self.engine.follow_round, "reading the open round")

    def _take_lead(self) -> None:
        node = self.config.cluster.node
        log.info("node %s took the leader lock (leader epoch %d); resuming round control from the "
                 "database", node, self.leadership.epoch,
                 extra={"node": node, "event": "took_lead", "epoch": self.leadership.epoch})
        self.store.fence = self.leadership.epoch  # before the engine writes or sends anything
        if self._attempt(self.engine.take_lead, "taking the lead", leader=True) is not None:
            self.leadership.close()  # let another coordinator lead; try again next poll
            self.store.fence = None
            self.engine.step_down()
            return
        for kind in ("register", "status") if self.link.connected.is_set() else ():
            try:  # the retained registrations and status, sent again: what no one led for
                self.link.subscribe(f"{self.link.topics.root}/{kind}/+", timeout=10)
            except ConnectionError as exc:  # on (re)connect the link subscribes anyway
                log.warning("could not subscribe again to %s (%s); the next connection will", kind, exc)

    def _step_down(self, why: Exception | None = None) -> None:
        """Stop leading: the lock was lost, or the store refused a write (`why`, Deposed), when
        the lock connection is given up too (another coordinator leads; this one may take the
        lead again later, under a new epoch)."""
        node = self.config.cluster.node
        if why is not None:
            self.leadership.close()
        log.error("node %s lost the lead%s; it only takes in updates now", node,
                  f" ({why})" if why is not None else "", extra={"node": node, "event": "lost_lead"})
        self.store.fence = None
        self.engine.step_down()

    def _still_leading(self) -> bool:
        """Ask the lock again (on its connection, now): a leader that lost it steps down."""
        if self.leadership is None:
            return True
        if self.engine.leading and self.leadership.leading and self.leadership.poll():
            return True
        if self.engine.leading:
            self._step_down()
        return False

    def _handle(self, delivery: Delivery) -> None:
        topic, payload = delivery.topic, delivery.payload
        if topic == RECONNECTED:
            if not self.engine.leading:
                return
            failure = self._attempt(self.engine.resend_unanswered, "re-sending unanswered tasks",
                                    leader=True)
            if failure is not None and self.engine.leading:
                log.error("unanswered tasks were not re-sent; they will be on the next reconnect")
            return
        leading = self.engine.leading
        if not leading:
            kind = topic.split("/")[-2] if topic.count("/") >= 2 else ""
            if kind in ("register", "status"):  # the leader's; it re-reads the retained ones
                self.link.ack(delivery.mid, delivery.qos)
                return
            def action() -> None:
                self.engine.follow_round()
                self.engine.handle(topic, payload, delivery.received_at)
        else:
            def action() -> None:
                self.engine.handle(topic, payload, delivery.received_at)
        failure = self._attempt(action, f"a message on {topic}", leader=leading)
        if leading and not self.engine.leading:  # deposed meanwhile: as a follower now
            self._handle(delivery)
            return
        if failure is not None and not self._dead_letter(topic, payload, failure):
            return  # kept nowhere: left unacknowledged for the broker to deliver again
        self.link.ack(delivery.mid, delivery.qos)

    def _tick(self) -> None:
        """The engine aborts a round that fails for good; a transient failure is retried here,
        and again at the next tick: the round and its accepted updates are kept meanwhile."""
        failure = self._attempt(self.engine.tick, "the round step", leader=True)
        if failure is not None and self.engine.leading:
            log.error("the round step keeps failing (%s: %s); trying again", type(failure).__name__,
                      failure)

    def _attempt(self, action: Callable[[], None], what: str, leader: bool = False) -> Exception | None:
        """Run `action`, trying a transient failure again with exponential backoff; the last
        failure if it never passed, None once it did. A `leader` step (cluster mode) is tried
        again only while the lock is still held (asked before each retry), and one the store
        refuses as Deposed steps down: the failure is returned, and the engine no longer leads."""
        retry = self.config.retry
        delay = retry.first_delay_seconds
        failure: Exception | None = None
        for attempt in range(1, retry.attempts + 1):
            if failure is not None:
                log.warning("%s failed (%s: %s); attempt %d of %d in %.2g s", what,
                            type(failure).__name__, failure, attempt, retry.attempts, delay)
                if self.stopping.wait(delay):
                    raise _Stopped from failure
                delay = min(2 * delay, retry.max_delay_seconds)
                if leader and not self._still_leading():
                    return failure
            try:
                action()
                return None
            except Deposed as exc:
                self._step_down(exc)
                return exc
            except Exception as exc:  # noqa: BLE001 - one failure must not stop the fleet
                if not is_transient(exc):  # the engine refuses bad content itself: a defect
                    log.exception("%s failed", what)
                    return exc
                self.counters["transient_failures"] += 1
                failure = exc
        return failure

    def _dead_letter(self, topic: str, payload: bytes, failure: Exception) -> bool:
        """Keep a message that could not be handled, so the broker can be told it was received.
        False: it could not be written either."""
        name = hashlib.sha256(payload).hexdigest()
        reason = f"{type(failure).__name__}: {failure}"
        try:
            atomic_write(self.dead_letters / f"{name}.bin", payload, private=True)
            atomic_write(self.dead_letters / f"{name}.json", json.dumps({
                "topic": topic, "reason": reason, "attempts": self.config.retry.attempts,
                "at": time.time()}, indent=1).encode(), private=True)
        except OSError as exc:
            log.error("could not keep a failed message in %s (%s); it is not acknowledged",
                      self.dead_letters, exc)
            return False
        self.counters["dead_lettered"] += 1
        log.error("a message on %s failed %d times (%s); kept as %s and acknowledged", topic,
                  self.config.retry.attempts, reason, self.dead_letters / f"{name}.bin")
        return True

    def stop(self) -> None:
        self.stopping.set()
        self.link.stop()
        if self.leadership is not None:
            self.leadership.close()
        if self.http is not None:
            self.http.stop()
            self.http = None
        self.store.close()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
