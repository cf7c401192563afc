"""An amqtt MQTT 3.1.1 broker in a background thread, bound to loopback: the demo's default.

A fleet in production runs Mosquitto (deploy/mosquitto/); this is only so that `fedprune demo`
needs nothing installed beyond Python packages.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedBroker:
    def __init__(self, port: int | None = None, log_path: str | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="amqtt", daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _run(self) -> None:
        from amqtt.broker import Broker

        # The broker's own log (per-connection lines, and its tracebacks when a client drops and
        # reconnects) goes to a file when one is given, not into the demo's table.
        handler = logging.FileHandler(self.log_path) if self.log_path else None
        for name in ("amqtt", "transitions", "asyncio"):
            logger = logging.getLogger(name)
            logger.setLevel(logging.INFO if handler else logging.WARNING)
            if handler:
                logger.addHandler(handler)
                logger.propagate = False
        self._loop = asyncio.new_event_loop()

        async def main() -> None:
            self._stop = asyncio.Event()
            broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                             "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                                         {"allow_anonymous": True}}})
            await broker.start()
            self._ready.set()
            await self._stop.wait()
            await broker.shutdown()

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the embedded MQTT broker did not start on 127.0.0.1:{self.port}: "
                               f"{self._error or 'timeout'}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
