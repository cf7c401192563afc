"""`fedprune coordinator serve`: the engine, its MQTT link, the store and the status endpoint.

One thread runs the engine: it drains the link's inbox and ticks the clock. Nothing else
touches the engine's state, so it needs no locks.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading

from edge_sdk.protocol import Topics
from edge_sdk.rehearsal import peak_rss_bytes

from .config import ServiceConfig
from .engine import RoundEngine
from .link import RECONNECTED, CoordinatorLink
from .status_http import serve_status
from .store import Store

log = logging.getLogger("fedprune.coordinator")


class CoordinatorService:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.store = Store(config.database_url)
        broker = config.broker
        self.link = CoordinatorLink(broker.url, Topics(broker.fleet, broker.topic_prefix),
                                    broker.client_id, broker.keepalive, broker.username,
                                    broker.password, broker.tls_ca)
        self.engine = RoundEngine(config, self.store, self.link.publish)
        self.stopping = threading.Event()
        self.http = None

    @property
    def status_url(self) -> str | None:
        if self.http is None:
            return None
        host, port = self.http.server_address[:2]
        return f"http://{host}:{port}/status"

    def start(self) -> None:
        self.link.start()
        if self.config.http_port is not None:
            self.http = serve_status(self.config.http_host, self.config.http_port, self.engine.status)

    def run(self) -> None:
        """Serve until stopped, or until every round is committed when exit_when_done is set."""
        self.start()
        try:
            while not self.stopping.is_set():
                try:
                    self._handle(*self.link.inbox.get(timeout=0.2))
                    while True:  # drain what arrived meanwhile before ticking
                        self._handle(*self.link.inbox.get_nowait())
                except queue.Empty:
                    pass
                self.engine.tick()
                if self.config.exit_when_done and self.engine.done:
                    log.info("all %d rounds committed", self.config.rounds.total,
                             extra={"peak_rss_bytes": peak_rss_bytes(),
                                    "devices_registered": len(self.store.devices())})
                    break
        finally:
            self.stop()

    def _handle(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        if topic == RECONNECTED:
            self.engine.resend_unanswered()
            return
        try:
            self.engine.handle(topic, payload)
        except Exception:  # noqa: BLE001 - one bad message must not stop the fleet
            log.exception("failed to handle a message on %s; it was dropped", topic)
        self.link.ack(mid, qos)

    def stop(self) -> None:
        self.stopping.set()
        self.link.stop()
        if self.http is not None:
            self.http.shutdown()
            self.http = None
        self.store.close()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
