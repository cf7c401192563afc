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
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from device_profiles.files import atomic_write
from edge_sdk.protocol import Topics
from edge_sdk.rehearsal import peak_rss_bytes

from .config import ServiceSettings
from .engine import RoundEngine, is_transient
from .http_api import ApiServer, build_app
from .link import RECONNECTED, CoordinatorLink, Delivery
from .store import Store

log = logging.getLogger("fedprune.coordinator")


class _Stopped(Exception):
    """The service is stopping while waiting to try again: the message stays unacknowledged."""


class CoordinatorService:
    def __init__(self, config: ServiceSettings):
        self.config = config
        self.store = Store(config.database_url)
        broker = config.broker
        self.link = CoordinatorLink(broker.url, Topics(broker.fleet, broker.topic_prefix),
                                    broker.client_id, broker.keepalive, broker.username,
                                    broker.password, broker.tls_ca, broker.inbox_limit)
        self.engine = RoundEngine(config, self.store, self.link.publish)
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

    def status(self) -> dict:
        """The engine's status, plus what the link dropped and what handling retried or kept."""
        return {**self.engine.status(),
                "inbox": {"queued": self.link.inbox.qsize(), "limit": self.link.inbox_limit,
                          "dropped_qos0": self.link.counters["dropped_qos0"],
                          "dropped_inbox_full": self.link.counters["dropped_inbox_full"]},
                "handling": {"transient_failures": self.counters["transient_failures"],
                             "dead_lettered": self.counters["dead_lettered"]}}

    def start(self) -> None:
        """The HTTP API first: an address it cannot listen on stops the service before the link
        connects (ConfigError)."""
        if self.config.http_port is not None:
            self.http = ApiServer(build_app(self.store, self.config, self.status),
                                  self.config.http_host, self.config.http_port,
                                  self.config.http_token).start()
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
                except queue.Empty:
                    pass
                self._tick()
                if self.config.exit_when_done and self.engine.done:
                    log.info("done: %d of %d rounds committed", self.engine.committed_rounds(),
                             self.config.rounds.total,
                             extra={"peak_rss_bytes": peak_rss_bytes(),
                                    "devices_registered": len(self.store.devices())})
                    break
        except _Stopped:
            pass
        finally:
            self.stop()

    def _handle(self, delivery: Delivery) -> None:
        topic, payload = delivery.topic, delivery.payload
        if topic == RECONNECTED:
            if self._attempt(self.engine.resend_unanswered, "re-sending unanswered tasks"):
                log.error("unanswered tasks were not re-sent; they will be on the next reconnect")
            return
        failure = self._attempt(lambda: self.engine.handle(topic, payload, delivery.received_at),
                                f"a message on {topic}")
        if failure is not None and not self._dead_letter(topic, payload, failure):
            return  # kept nowhere: left unacknowledged for the broker to deliver again
        self.link.ack(delivery.mid, delivery.qos)

    def _tick(self) -> None:
        """The engine aborts a round that fails for good; a transient failure is retried here,
        and again at the next tick: the round and its accepted updates are kept meanwhile."""
        failure = self._attempt(self.engine.tick, "the round step")
        if failure is not None:
            log.error("the round step keeps failing (%s: %s); trying again", type(failure).__name__,
                      failure)

    def _attempt(self, action: Callable[[], None], what: str) -> Exception | None:
        """Run `action`, trying a transient failure again with exponential backoff; the last
        failure if it never passed, None once it did."""
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
            try:
                action()
                return None
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
        if self.http is not None:
            self.http.stop()
            self.http = None
        self.store.close()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
