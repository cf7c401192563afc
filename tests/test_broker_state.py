"""A broker that cannot be reached is no longer silence (issue 24, item 1): the coordinator says
so in its log, on /status, /healthz (503 past broker.unhealthy_after_seconds) and /metrics, and
turns healthy when the broker comes up; an edge agent and the demo give up with a message saying
which broker and what to check, rc 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from coordinator import demo
from coordinator.service import CoordinatorService, ServiceSettings
from harness.brokers import Mosquitto
from harness.waiting import wait_until


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_coordinator_reports_a_broker_it_cannot_reach_and_recovers_when_it_comes_up(tmp_path):
    broker = Mosquitto(tmp_path / "broker")  # its port chosen, nothing listening yet
    service = CoordinatorService(ServiceSettings.model_validate({
        "strategy": "fedavg", "model": "mlp", "evaluate": False, "state_dir": str(tmp_path / "c"),
        "http_port": 0, "broker": {"url": broker.url, "fleet": "down",
                                   "unhealthy_after_seconds": 1}}))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: service.http_url is not None, 30, "the HTTP API to listen")
        api = service.http_url
        wait_until(lambda: _get(f"{api}/healthz")[0] == 503, 30, "/healthz to turn unhealthy")
        code, body = _get(f"{api}/healthz")
        assert code == 503 and f"the broker at {broker.url}" in json.loads(body)["problem"]
        state = json.loads(_get(f"{api}/status")[1])["broker"]
        assert state["state"] == "retrying" and state["attempts"] >= 1
        assert "refused" in state["last_error"].lower(), state
        assert "fedprune_broker_connected 0.0" in _get(f"{api}/metrics")[1]

        broker.start()
        wait_until(lambda: _get(f"{api}/healthz")[0] == 200, 60, "/healthz to turn healthy")
        state = json.loads(_get(f"{api}/status")[1])["broker"]
        assert state["state"] == "connected" and state["last_error"] is None
        assert state["client_id"].startswith("fedprune-coordinator-")
        assert "fedprune_broker_connected 1.0" in _get(f"{api}/metrics")[1]
    finally:
        service.stopping.set()
        thread.join(30)
        broker.stop()


def test_an_edge_agent_gives_up_on_a_broker_that_never_answers(tmp_path):
    dead = Mosquitto(tmp_path / "dead")  # a free port with nothing on it
    config = tmp_path / "edge.toml"
    config.write_text(f'device_id = "d1"\nbroker = "{dead.url}"\nfleet = "f"\n'
                      'profile = "catalogue:rpi4-2gb"\nbroker_give_up_seconds = 2\n'
                      "[data]\nclients = 2\ndevice_index = 0\n")
    result = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "run", "--config", str(config),
                             "--new-state", "--log-format", "plain"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"connecting to the broker at {dead.url} as f.d1" in result.stderr
    assert f"error: no broker answered at {dead.url} in 2 s" in result.stderr
    assert "Connection refused" in result.stderr and "broker_give_up_seconds" in result.stderr


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
