"""Devices and coordinators as the tests run them.

As processes: an edge agent is the real `fedprune-edge run` (`python -m edge_sdk.cli run`), a
coordinator the real `fedprune coordinator serve`, each a `harness.processes.Process` with its own
log. In the test process: an `EdgeAgent` whose publish is captured, or one running its MQTT loop
in a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from edge_sdk.agent import EdgeAgent, EdgeSettings
from edge_sdk.protocol import Topics, decode_envelope, parse_header
from harness.brokers import kind_of
from harness.processes import Process

TOPICS = Topics("test")  # the fleet of the in-process agents and of harness.fleet.Harness
DEVICE = "dev-0"         # the device a single-device test drives


# --- processes -----------------------------------------------------------------------------------
def edge_agent_process(config_path: Path, log: Path, name: str, *, args: Sequence[str] = (),
                       python_flags: Sequence[str] = (), stderr_only: bool = False) -> Process:
    """`fedprune-edge run --config config_path --new-state` (not started yet): the tests' devices
    are new, or restarted on the state folder their first start made."""
    return Process(name, ["edge_sdk.cli", "run", "--config", str(config_path), "--new-state", *args], log,
                   python_flags=python_flags, stderr_only=stderr_only)


def start_edge_agent(config: EdgeSettings, folder: Path, stem: str | None = None) -> Process:
    """Save `config` as folder/<stem>.toml and start the device on it, logging to
    folder/<stem>.log (`stem` defaults to the device id)."""
    stem = stem or config.device_id
    path = config.save(folder / f"{stem}.toml")
    return edge_agent_process(path, folder / f"{stem}.log", config.device_id).start()


def coordinator_process(name: str, settings: Sequence[str], log: Path, *, args: Sequence[str] = (),
                        stderr_only: bool = False) -> Process:
    """`fedprune coordinator serve [args] --set KEY=VALUE ...` (not started yet)."""
    sets = [item for setting in settings for item in ("--set", setting)]
    return Process(name, ["coordinator.cli", "coordinator", "serve", *args, *sets], log,
                   stderr_only=stderr_only)


# --- agents in the test process ------------------------------------------------------------------
def capture(queue: list[tuple[str, bytes]]):
    """A publish function that appends (topic, payload) to `queue` instead of sending."""
    def publish(topic, payload, retain=False):
        queue.append((topic, bytes(payload)))
    return publish


def captured_agent(tmp_path: Path, device: str = DEVICE, **settings
                   ) -> tuple[EdgeAgent, list[tuple[str, bytes]]]:
    """A real agent of fleet "test" (device 0 of 3, 150 samples) whose publish is captured: the
    agent and the list of what it sent."""
    config = EdgeSettings(device_id=device, fleet="test", state_dir=str(tmp_path / device),
                          profile="catalogue:rpi4-4gb", max_samples=150,
                          data={"clients": 3, "device_index": 0}, **settings)
    sent: list[tuple[str, bytes]] = []
    return EdgeAgent(config, publish=capture(sent)), sent


def running_agent(config: EdgeSettings) -> tuple[EdgeAgent, threading.Thread]:
    """A real agent on its broker, its run loop in a thread."""
    agent = EdgeAgent(config)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    return agent, thread


def halt(agent: EdgeAgent, thread: threading.Thread) -> None:
    agent.stopping.set()
    thread.join(20)
    assert not thread.is_alive()


def refusals_in(sent: list[tuple[str, bytes]]):
    """The REFUSAL headers among captured messages."""
    return [parse_header(decode_envelope(p)) for t, p in sent if kind_of(t) == "refusal"]


def files_outside(root: Path, *inside: Path) -> set[Path]:
    """Every path under `root` that is not under one of `inside` (symlinks not followed)."""
    return {p for p in root.rglob("*")
            if not any(p == folder or folder in p.parents for folder in inside)}
