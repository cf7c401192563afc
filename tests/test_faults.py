"""Faults survived against a real Mosquitto (shipped config): broker restart, coordinator SIGKILL,
devices vanishing mid-round. Each test adds a row to the fault matrix (docs/RELIABILITY.md is
rendered from it by `python benchmarks/fault_matrix.py`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.service.store import Store
from edge_sdk.agent import EdgeConfig
from mqtt_brokers import Mosquitto

pytestmark = pytest.mark.faults


@pytest.fixture
def broker(tmp_path):
    mosquitto = Mosquitto(tmp_path / "broker").start()
    yield mosquitto
    mosquitto.stop()


def _device(tmp: Path, url: str, fleet: str, i: int, devices: int, samples: int = 300) -> subprocess.Popen:
    config = EdgeConfig(device_id=f"{fleet}-{i}", broker=url, fleet=fleet, state_dir=str(tmp / f"d{i}"),
                        profile="catalogue:rpi4-4gb", max_samples=samples,
                        data={"clients": devices, "client_id": i})
    path = config.save(tmp / f"d{i}.toml")
    return subprocess.Popen([sys.executable, "-m", "coordinator.cli", "edge", "run", "--config", str(path)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=open(tmp / f"d{i}.log", "a"), stderr=subprocess.STDOUT)


def _coordinator(tmp: Path, url: str, fleet: str, devices: int, **rounds) -> subprocess.Popen:
    settings = {"rounds.total": 2, "rounds.devices_per_round": devices, "rounds.min_devices": devices,
                "rounds.deadline_seconds": 60, "rounds.registration_grace_seconds": 0,
                **{f"rounds.{k}": v for k, v in rounds.items()}}
    overrides = [f"broker.url={url}", f"broker.fleet={fleet}", f"broker.client_id=coord-{fleet}",
                 f"state_dir={tmp / 'coordinator'}", "http_port=0", "exit_when_done=true",
                 "strategy=fedavg", "export.enabled=false", "train.lr=0.05",
                 *(f"{k}={v}" for k, v in settings.items())]
    return subprocess.Popen([sys.executable, "-m", "coordinator.cli", "coordinator", "serve",
                             *sum((["--set", o] for o in overrides), [])],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=open(tmp / "coordinator.log", "a"), stderr=subprocess.STDOUT)


def _store(tmp: Path) -> Store:
    return Store(f"sqlite:///{tmp / 'coordinator' / 'coordinator.db'}")


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - the database may not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _accounting(store: Store, rounds: int) -> dict:
    """Tasks answered with an accepted update, updates stored (unique by key), and second copies
    that arrived and were acknowledged as duplicates without being counted again."""
    numbers = range(1, rounds + 1)
    accepted = sum(sum(t.state == "accepted" for t in store.tasks(n).values()) for n in numbers)
    stored = sum(store.update_count(n) for n in numbers)
    duplicates = sum((store.round_row(n).summary or {}).get("duplicates", 0) for n in numbers)
    return {"accepted": accepted, "stored": stored, "duplicates_received": duplicates}


def _stop(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_broker_restart_mid_round(tmp_path, broker, fault_matrix):
    devices = [_device(tmp_path, broker.url, "brk", i, 3) for i in range(3)]
    coordinator = _coordinator(tmp_path, broker.url, "brk", 3)
    try:
        _wait(lambda: _store(tmp_path).current_round() is not None, 90, "round 1 to open")
        broker.restart(down_seconds=3)  # every connection drops; sessions survive on disk
        assert coordinator.wait(180) == 0
        store = _store(tmp_path)
        rounds = [r for r in store.rounds() if r.state == "committed"]
        counts = _accounting(store, 2)
        assert len(rounds) == 2 and counts["accepted"] == counts["stored"] == 6
        fault_matrix("broker stopped 3 s and restarted mid-round (3 devices, 2 rounds)",
                     "devices and coordinator reconnected; both rounds committed",
                     accepted=counts["stored"], lost=6 - counts["stored"],
                     duplicated=counts["accepted"] - counts["stored"],
                     redelivered=counts["duplicates_received"])
    finally:
        _stop(devices + [coordinator])


def test_coordinator_sigkill_mid_round_resumes(tmp_path, broker, fault_matrix):
    # One slow device, so the kill lands while its update is still outstanding.
    devices = [_device(tmp_path, broker.url, "kill", i, 3, samples=6000 if i == 2 else 300)
               for i in range(3)]
    coordinator = _coordinator(tmp_path, broker.url, "kill", 3)
    try:
        _wait(lambda: _store(tmp_path).update_count(1) >= 1, 120, "a first accepted update")
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(10)
        before = _store(tmp_path).update_count(1)
        coordinator = _coordinator(tmp_path, broker.url, "kill", 3)  # same state dir and database
        assert coordinator.wait(180) == 0
        store = _store(tmp_path)
        counts = _accounting(store, 2)
        assert [r.state for r in store.rounds()] == ["committed", "committed"]
        assert store.update_count(1) == 3 and 1 <= before < 3 and counts["stored"] == 6
        fault_matrix("coordinator SIGKILLed mid-round after accepting an update, then restarted",
                     f"resumed round 1 from the database ({before} update(s) already stored), "
                     "both rounds committed", accepted=counts["stored"], lost=6 - counts["stored"],
                     duplicated=counts["accepted"] - counts["stored"],
                     redelivered=counts["duplicates_received"])
    finally:
        _stop(devices + [coordinator])


def test_a_third_of_the_devices_vanish_mid_round(tmp_path, broker, fault_matrix):
    devices = [_device(tmp_path, broker.url, "gone", i, 3) for i in range(3)]
    coordinator = _coordinator(tmp_path, broker.url, "gone", 3, deadline_seconds=25, min_fraction=0.6)
    try:
        _wait(lambda: _store(tmp_path).current_round() is not None, 90, "round 1 to open")
        devices[0].send_signal(signal.SIGKILL)
        _wait(lambda: _store(tmp_path).last_committed() is not None, 90, "round 1 to commit at quorum")
        first = _store(tmp_path).last_committed().summary
        devices[0] = _device(tmp_path, broker.url, "gone", 0, 3)  # comes back
        assert coordinator.wait(180) == 0
        store = _store(tmp_path)
        second = store.last_committed().summary
        counts = _accounting(store, 2)
        assert first["accepted"] == 2 and first["missing"] == 1 and second["accepted"] == 3
        fault_matrix("1 of 3 selected devices SIGKILLed mid-round, restarted later",
                     "round 1 committed at its deadline with quorum 2 of 3; the device rejoined "
                     "round 2", accepted=counts["stored"], lost=0,
                     duplicated=counts["accepted"] - counts["stored"],
                     redelivered=counts["duplicates_received"])
    finally:
        _stop(devices + [coordinator])
