"""A real Mosquitto per test module, started from the shipped deploy/mosquitto/mosquitto.conf.

Only the listener port (a free one) and persistence_location (a temporary folder) are
rewritten, so the tests exercise the configuration operators deploy. `restart()` really stops
the process and starts it again on the same port and persistence file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "mosquitto.conf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mosquitto:
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

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()
