"""Brokers for the tests: a real Mosquitto started from the shipped deploy/mosquitto/mosquitto.conf,
one configured by `fedprune coordinator provision` (TLS, passwords, ACLs), and a plain MQTT client
of the test's own.

Only the listener port (a free one) and persistence_location (a temporary folder) of the shipped
configuration are rewritten, so the tests exercise the configuration operators deploy.
`restart()` really stops the process (by its pid) and starts it again on the same port and
persistence file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from edge_sdk.protocol.transport import make_client
from harness.ports import free_port
from harness.processes import stop_processes
from harness.waiting import wait_until

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"


class Mosquitto:
    name = "mosquitto"

    def __init__(self, workdir: Path, extra: str = ""):
        self.port = free_port()
        self.workdir = workdir
        self.data = workdir / "mosquitto-data"
        self.data.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data, 0o777)  # mosquitto drops root privileges to its own user
        lines = []
        for line in SHIPPED.read_text().splitlines():
            if line.startswith("listener "):
                line = f"listener {self.port} 127.0.0.1"
            elif line.startswith("persistence_location "):
                line = f"persistence_location {self.data}/"
            lines.append(line)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n" + extra)
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def exited(self) -> int | None:
        return self.proc.poll()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "(no log)"

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def start(self) -> Mosquitto:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                         stderr=log)
        wait_until(self._listening, 10, f"mosquitto to listen on port {self.port}", watch=[self],
                   interval=0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_processes([self.proc], timeout=10)
        self.proc = None

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop, stay down for `down_seconds` (the fault being simulated), start again."""
        self.stop()
        time.sleep(down_seconds)
        self.start()


@contextmanager
def running_mosquitto(workdir: Path, extra: str = "") -> Iterator[Mosquitto]:
    """A started `Mosquitto` in `workdir`, stopped by its pid on the way out."""
    broker = Mosquitto(workdir, extra=extra).start()
    try:
        yield broker
    finally:
        broker.stop()


@contextmanager
def provisioned_mosquitto(fleet: str, devices: Sequence[str], hosts: Sequence[str], prefix: str,
                          before_start: Callable[[Path], None] | None = None,
                          coordinators: int = 1) -> Iterator[tuple[Path, int]]:
    """`fedprune coordinator provision` for `devices` on a free TLS port, and a Mosquitto running
    the generated configuration: (the provisioned folder, the TLS port). `before_start` may change
    the generated broker folder (passwords, ACL) before the broker reads it. The secrets go into
    the same folder (out == secrets_dir): one folder, the layout of ca/, broker/, coordinator/
    and devices/<id>/ that provision.py describes.

    The files live outside pytest's 0700 temporary tree: Mosquitto drops root privileges and must
    read them."""
    from coordinator.provision import provision

    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    try:
        port = free_port()
        prov = root / "prov"
        provision(prov, list(devices), f"mqtts://127.0.0.1:{port}", list(hosts), fleet, port,
                  coordinators=coordinators, secrets_dir=prov)
        broker_dir = prov / "broker"
        if before_start is not None:
            before_start(broker_dir)
        # The broker drops root privileges; in production chown the files to mosquitto.
        for folder in (prov, prov / "ca", broker_dir):
            folder.chmod(0o755)
        for path in broker_dir.iterdir():
            path.chmod(0o644)
        with running_mosquitto(root / "broker",
                               extra=(broker_dir / "fedprune-security.conf").read_text()):
            yield root / "prov", port
    finally:
        shutil.rmtree(root, ignore_errors=True)


def kind_of(topic: str) -> str:
    """The message kind of a fleet topic (prefix/fleet/KIND/device)."""
    return topic.split("/")[-2]


class MqttPeer:
    """A plain MQTT client of the test's own: connects (with credentials and TLS when given),
    subscribes at QoS 1 to `watch` on every connection, records every message it is sent (under a
    condition, so tests wait on what arrived), and publishes at QoS 1, waiting for the broker's
    PUBACK. The constructor returns once the broker accepted the connection and, with `watch`,
    confirmed the subscription."""

    def __init__(self, url: str, client_id: str, watch: Sequence[str] = (), *,
                 username: str | None = None, password: str | None = None,
                 tls_ca: str | None = None, clean_session: bool = True, timeout: float = 10):
        self.client, address = make_client(client_id, url, username, password, tls_ca, clean_session)
        self.name = client_id
        self.watch = list(watch)
        self.received: list[tuple[str, bytes]] = []
        self.disconnects: list[str] = []
        self.changed = threading.Condition()
        connected, subscribed = threading.Event(), threading.Event()

        def on_connect(client, userdata, flags, rc, properties=None):
            if rc.is_failure:
                return
            connected.set()
            if self.watch:
                client.subscribe([(topic, 1) for topic in self.watch])

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_disconnect = lambda c, u, f, rc, p=None: self.disconnects.append(str(rc))
        self.client.on_message = self._record
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        assert connected.wait(timeout), f"{client_id} could not connect to {url}"
        assert not self.watch or subscribed.wait(timeout), \
            f"the broker did not confirm {client_id}'s subscription to {self.watch}"

    def _record(self, client, userdata, message) -> None:
        with self.changed:
            self.received.append((message.topic, bytes(message.payload)))
            self.changed.notify_all()

    def messages(self, kind: str | None = None, topic: str | None = None) -> list[tuple[str, bytes]]:
        """What arrived so far, in order: all of it, or one kind of message, or one topic."""
        with self.changed:
            return [(t, p) for t, p in self.received
                    if (kind is None or kind_of(t) == kind) and (topic is None or t == topic)]

    def of(self, kind: str | None = None) -> list[bytes]:
        """The payloads that arrived so far: all of them, or one kind of message."""
        return [p for _, p in self.messages(kind)]

    def wait_for(self, condition: Callable[[], object], timeout: float = 10) -> bool:
        """Block until `condition()` holds after a message arrived (or already does); whether it
        held within `timeout` seconds."""
        with self.changed:
            return self.changed.wait_for(condition, timeout)

    def wait(self, kind: str, count: int, timeout: float = 60) -> list[bytes]:
        """Block until `count` messages of `kind` arrived; their payloads."""
        assert self.wait_for(lambda: len(self.of(kind)) >= count, timeout), \
            f"{count} {kind} message(s) did not arrive within {timeout} s"
        return self.of(kind)

    def subscribe(self, topic: str, timeout: float = 10) -> None:
        """Subscribe to one more topic at QoS 1, waiting for the broker's SUBACK."""
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(timeout), f"the broker did not confirm {self.name}'s subscription to {topic}"

    def publish(self, topic: str, payload: bytes, timeout: float = 10) -> None:
        """QoS 1, and wait for the broker's PUBACK: the broker has processed what came before."""
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def fleet_wire(url: str, name: str, fleet: str = "test") -> MqttPeer:
    """The test's own MQTT client on `fleet`: publishes what a coordinator would and records every
    message the devices send (fedprune/<fleet>/+/+), so tests wait on what crossed the broker."""
    return MqttPeer(url, f"wire-{name}", [f"fedprune/{fleet}/+/+"])


def recording_subscriber(port: int, fleet: str, topics: Sequence[str], line_format: str
                         ) -> tuple[subprocess.Popen, threading.Thread, list[str]]:
    """A plain `mosquitto_sub` of `topics` (under `fedprune/<fleet>/`), printing one
    `line_format` line per message (e.g. `%t %l`, `%t %x`), collected by a thread; returned once
    its subscription is in place: a probe on `fedprune/<fleet>/probe` is published until the
    subscriber prints it."""
    probe = f"fedprune/{fleet}/probe"
    args = ["mosquitto_sub", "-p", str(port), "-q", "1", "-v", "-F", line_format]
    for topic in (*topics, *(() if "#" in topics else ("probe",))):
        args += ["-t", f"fedprune/{fleet}/{topic}"]
    sub = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in sub.stdout),
                              daemon=True)
    reader.start()

    def probed() -> bool:
        subprocess.run(["mosquitto_pub", "-p", str(port), "-q", "1", "-t", probe, "-m", "probe"],
                       check=True, timeout=10)
        return any(line.startswith(f"{probe} ") for line in lines)
    try:
        wait_until(probed, 10, "mosquitto_sub's subscription")
    except BaseException:
        sub.kill()
        raise
    return sub, reader, lines
