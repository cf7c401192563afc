"""A broker that cannot be reached is no longer silence (issue 24, item 1): `fedprune coordinator
serve` says so in its log (once per change), on /status, /healthz (503 past
broker.unhealthy_after_seconds) and /metrics, and turns healthy when the broker comes up; an edge
agent and the demo give up with a message saying which broker and what to check, rc 2, no
traceback. Each coordinator connects under its own client id, and one whose id another client
takes is told so (item 2)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from coordinator import demo
from coordinator.service import CoordinatorService, ServiceSettings
from edge_sdk.protocol.transport import MqttTransport
from harness.brokers import Mosquitto, running_mosquitto
from harness.ports import free_port
from harness.processes import Process
from harness.waiting import wait_until


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _broker(api: str) -> dict:
    return json.loads(_get(f"{api}/status")[1])["broker"]


def test_serve_reports_a_broker_it_cannot_reach_and_recovers_when_it_comes_up(tmp_path):
    broker = Mosquitto(tmp_path / "broker")  # its port chosen, nothing listening yet
    limit = 3
    http = free_port()
    config = tmp_path / "coordinator.toml"
    config.write_text(f'strategy = "fedavg"\nmodel = "mlp"\nevaluate = false\n'
                      f'state_dir = "{tmp_path / "c"}"\nhttp_port = {http}\n'
                      f'[broker]\nurl = "{broker.url}"\nfleet = "down"\n'
                      f"unhealthy_after_seconds = {limit}\n")
    serve = Process("serve", ["coordinator.cli", "coordinator", "serve", "--config", str(config),
                              "--log-format", "plain"], tmp_path / "serve.log").start()
    api = f"http://127.0.0.1:{http}"
    try:
        def unhealthy() -> bool:
            code = _get(f"{api}/healthz")[0]
            if code == 503:  # not before the stated time
                assert time.time() - _broker(api)["since"] >= limit - 0.5
            return code == 503

        wait_until(lambda: "cannot reach the broker" in serve.tail(), 60,
                   "serve to log that it cannot reach the broker", watch=[serve])
        wait_until(unhealthy, 30, "/healthz to turn unhealthy", watch=[serve])
        problem = json.loads(_get(f"{api}/healthz")[1])["problem"]
        assert f"not connected to the broker at {broker.url}" in problem
        assert "broker.unhealthy_after_seconds (3)" in problem and "Connection refused" in problem
        state = _broker(api)
        assert state["state"] == "retrying" and state["last_error"] == "Connection refused"
        assert state["attempts"] >= 1 and state["retry_in"] is not None and state["reconnects"] == 0
        client_id = state["client_id"]
        assert client_id.startswith("fedprune-coordinator-")
        assert "fedprune_broker_connected 0.0" in _get(f"{api}/metrics")[1]
        log = serve.log.read_text()
        assert f"connecting to the broker at {broker.url} as {client_id}" in log
        assert (f"cannot reach the broker at {broker.url} as {client_id}: Connection refused "
                "(attempt 1); retrying in 1 s. Check that the broker runs, and its address and "
                "port") in log
        if state["attempts"] < 10:  # one line per change, not one per attempt
            assert log.count("cannot reach the broker") == 1, log

        broker.start()
        wait_until(lambda: _get(f"{api}/healthz")[0] == 200, 60, "/healthz to turn healthy",
                   watch=[serve, broker])
        state = _broker(api)
        assert state["state"] == "connected" and state["last_error"] is None
        assert state["client_id"] == client_id and state["reconnects"] == 0
        metrics = _get(f"{api}/metrics")[1]
        assert "fedprune_broker_connected 1.0" in metrics
        assert "fedprune_broker_reconnects_total 0.0" in metrics
        assert f"connected to the broker at {broker.url} as {client_id}" in serve.log.read_text()
    finally:
        serve.stop()
        broker.stop()
    assert "Traceback" not in serve.log.read_text()


def test_an_edge_agent_gives_up_on_a_broker_that_never_answers(tmp_path):
    dead = Mosquitto(tmp_path / "dead")  # a free port with nothing on it
    give_up = 3
    config = tmp_path / "edge.toml"
    config.write_text(f'device_id = "d1"\nbroker = "{dead.url}"\nfleet = "f"\n'
                      f'profile = "catalogue:rpi4-2gb"\nbroker_give_up_seconds = {give_up}\n'
                      "[data]\nclients = 2\ndevice_index = 0\n")
    result = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "run", "--config", str(config),
                             "--new-state", "--log-format", "json"],
                            capture_output=True, text=True, timeout=120)
    ended = time.time()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    error = lines[-1]
    assert records[0]["message"].startswith(f"device d1 of fleet f: loading its profile, data "
                                            f"and model toolchain, then connecting to the "
                                            f"broker at {dead.url}")
    connecting = next(r for r in records
                      if r["message"] == f"connecting to the broker at {dead.url} as f.d1")
    # It gave up the stated time after it began connecting (plus the main loop's half second).
    assert give_up <= ended - connecting["ts"] <= give_up + 5, ended - connecting["ts"]
    assert error.startswith(f"fedprune-edge run: error: no broker answered at {dead.url} in "
                            f"{give_up} s ("), error
    assert "as f.d1; last: Connection refused). Check that the broker runs" in error
    assert "broker_give_up_seconds sets how long to try" in error


class _Lines(logging.Handler):
    """The messages one logger emitted, from any thread."""

    def __init__(self, logger: str):
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(logger)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _Lines:
        self.logger.addHandler(self)
        self.level_was, self.logger.level = self.logger.level, logging.DEBUG
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.level = self.level_was


def test_a_broker_that_refuses_and_a_server_that_is_no_broker_are_told_apart(tmp_path):
    broker = Mosquitto(tmp_path / "refusing")
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true",
                                                           "allow_anonymous false"))
    with _Lines("fedprune.test.refused") as lines:
        broker.start()
        refused = MqttTransport("t1", broker.url, username="nobody", password="x",
                                logger=logging.getLogger("fedprune.test.refused"))
        refused.start()
        try:
            wait_until(lambda: refused.broker_state()["attempts"] >= 2, 30, "two refusals")
            state = refused.broker_state()
            assert state["state"] == "refused", state
            assert state["last_error"] == "the broker refused the connection: Not authorized"
            assert refused.unreachable(0.01) == (
                f"the broker at {broker.url} refused every connection in 0.01 s "
                f"({state['attempts']} attempts as t1; last: the broker refused the "
                "connection: Not authorized)")
            assert refused.unreachable(600) is None
        finally:
            refused.stop()
            broker.stop()
    warned = [m for m in lines.messages if "refused" in m]
    assert warned == [f"the broker at {broker.url} refused the connection as t1: Not authorized "
                      "(attempt 1); retrying in 1 s. Check the user name, password and client "
                      "id it expects"], lines.messages

    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def hang_up() -> None:  # accepts a connection and closes it without a word
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except TimeoutError:
                pass
    hanging = threading.Thread(target=hang_up, daemon=True)
    hanging.start()
    url = f"mqtt://127.0.0.1:{server.getsockname()[1]}"
    odd = MqttTransport("t2", url)
    odd.start()
    try:
        wait_until(lambda: odd.broker_state()["attempts"] >= 1, 30, "a failed attempt")
        state = odd.broker_state()
        assert state["state"] == "retrying" and state["last_error"].startswith("no answer to CONNECT")
    finally:
        odd.stop()
        stop.set()
        hanging.join(10)
        server.close()


def _coordinator(tmp_path: Path, name: str, url: str, **broker) -> CoordinatorService:
    return CoordinatorService(ServiceSettings.model_validate({
        "strategy": "fedavg", "model": "mlp", "evaluate": False,
        "state_dir": str(tmp_path / name), "http_port": 0,
        "broker": {"url": url, "fleet": "shared", **broker}}))


def _serving(services: list[CoordinatorService]) -> list[threading.Thread]:
    threads = [threading.Thread(target=s.run, daemon=True) for s in services]
    for thread in threads:
        thread.start()
    return threads


def _stop(services: list[CoordinatorService], threads: list[threading.Thread]) -> None:
    for service in services:
        service.stopping.set()
    for thread in threads:
        thread.join(30)


def test_two_coordinators_with_default_ids_on_one_broker_keep_their_connections(tmp_path):
    with running_mosquitto(tmp_path / "broker") as broker:
        first = _coordinator(tmp_path, "a", broker.url)
        threads = _serving([first])
        wait_until(lambda: first.http_url and _broker(first.http_url)["state"] == "connected",
                   60, "the first coordinator to connect")
        second = _coordinator(tmp_path, "b", broker.url)
        threads += _serving([second])
        try:
            wait_until(lambda: second.http_url and _broker(second.http_url)["state"] == "connected",
                       60, "the second coordinator to connect")
            # The broker drops a client whose id a newer one takes before it accepts the newer:
            # a subscription the first confirms now proves its connection outlived the second's.
            first.link.subscribe("fedprune/shared/probe", timeout=10)
            a, b = _broker(first.http_url), _broker(second.http_url)
            assert a["client_id"] != b["client_id"], (a, b)
            assert a["state"] == b["state"] == "connected"
            assert a["reconnects"] == b["reconnects"] == 0, (a, b)
            assert first.link.counters["disconnects"] == second.link.counters["disconnects"] == 0
            assert "already connected, closing old connection" not in broker.log.read_text()
        finally:
            _stop([first, second], threads)


def test_a_client_id_two_coordinators_share_is_named_in_the_log_and_on_healthz(tmp_path):
    with running_mosquitto(tmp_path / "broker") as broker, \
            _Lines("fedprune.coordinator.mqtt") as lines:
        services = [_coordinator(tmp_path, name, broker.url, client_id="shared-id")
                    for name in ("a", "b")]
        threads = _serving(services)
        try:
            collision = ("another client connected with client id shared-id and the broker "
                         "disconnected this one (2 times in a row, each within seconds of "
                         "connecting); give each coordinator its own client_id")
            wait_until(lambda: any(m.startswith(collision) for m in lines.messages), 60,
                       "the log line naming the shared client id")
            assert "Client shared-id already connected, closing old connection" in \
                broker.log.read_text()

            def told() -> bool:
                code, body = _get(f"{services[0].http_url}/healthz")
                return code == 503 and "with this coordinator's client id shared-id" in body
            wait_until(told, 30, "/healthz to name the shared client id")
        finally:
            _stop(services, threads)
        # Told once per coordinator, not at every one of the broker's disconnections.
        assert sum(m.startswith("another client connected") for m in lines.messages) <= 4
        assert sum(m.startswith("lost the connection") for m in lines.messages) <= 4


def test_the_demo_gives_up_on_its_broker_and_refuses_a_folder_another_demo_runs_in(
        tmp_path, monkeypatch):
    out = tmp_path / "run"
    holder = demo._lock_run_folder(out)  # another demo's lock
    (out / "theirs.txt").write_text("kept")
    with pytest.raises(demo.DemoError, match=r"another demo \(pid \d+\) is running in"):
        demo.run_demo(devices=1, rounds=1, out_dir=str(out))
    assert (out / "theirs.txt").read_text() == "kept"  # nothing of the running demo deleted
    holder.close()

    monkeypatch.setattr(demo, "BROKER_GIVE_UP_SECONDS", 1)
    dead = Mosquitto(tmp_path / "dead")
    with pytest.raises(demo.DemoError, match=rf"no broker answered at {dead.url} in 1 s .*"
                                             r"leave out --broker"):
        demo.run_demo(devices=1, rounds=1, broker=dead.url, out_dir=str(out), samples=100)
    assert not (out / "theirs.txt").exists()  # the folder is the new run's once it holds the lock
