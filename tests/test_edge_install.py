"""A lean edge install: `pip install ".[edge]"` resolves to what a device needs, and a device
process (`fedprune-edge`, `python -m edge_sdk.cli`) never imports the coordinator.

The resolution test asks pip's own resolver from scratch (a dry run with a report: nothing is
installed); the process test runs a real edge agent under `-X importtime` through a real round
with a real coordinator and broker, and reads every module the device imported.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

from harness.devices import coordinator_process, edge_agent_process
from harness.processes import stop_processes
from harness.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent

# Never on a device: the coordinator's own packages and the exporters.
NOT_ON_A_DEVICE = {"sqlalchemy", "psycopg", "psycopg-binary", "psycopg-c", "amqtt", "onnx",
                   "onnxscript", "onnx-ir", "litert-torch", "ai-edge-torch"}
# Modules (and their submodules) a device process must not import.
FORBIDDEN_MODULES = ("coordinator", "export", "sqlalchemy", "psycopg", "amqtt", "onnx",
                     "onnxscript", "litert_torch")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _forbidden(modules) -> list[str]:
    return sorted(m for m in modules
                  if any(m == top or m.startswith(top + ".") for top in FORBIDDEN_MODULES))


# --- what `pip install ".[edge]"` pulls ---------------------------------------------------------


def test_edge_extra_resolves_without_the_coordinators_packages(tmp_path):
    """pip's resolver, from scratch (`--ignore-installed`: what this machine has installed plays
    no part), on this pyproject.toml (copied, so the build of its metadata writes nothing into
    the checkout), with the repository's constraints.txt as the README says."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    constraints = ROOT / "constraints.txt"
    report = tmp_path / "report.json"
    resolve = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
         "--quiet", "--report", str(report), f"{project}[edge]", "-c", str(constraints)],
        capture_output=True, text=True, timeout=300)
    assert resolve.returncode == 0, resolve.stderr[-3000:]
    resolved = {_normalise(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert {"fedprune", "torch", "opacus", "paho-mqtt", "cryptography"} <= resolved.keys(), resolved
    assert resolved["torch"].split("+")[0] == "2.13.0"
    assert not NOT_ON_A_DEVICE & resolved.keys(), sorted(NOT_ON_A_DEVICE & resolved.keys())
    # The runtimes for exported models are opt-in extras (edge-onnx, edge-tflite), not in [edge].
    assert not {"onnxruntime", "ai-edge-litert"} & resolved.keys()


def test_console_scripts_split_the_device_from_the_coordinator():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fedprune-edge"] == "edge_sdk.cli:main"
    assert project["scripts"]["fedprune"] == "coordinator.cli:main"
    extras = project["optional-dependencies"]
    assert extras["edge-onnx"] == [d for d in extras["onnx"] if d.startswith("onnxruntime")]

    from coordinator.cli import build_parser as coordinator_parser
    from edge_sdk.cli import build_parser as edge_parser

    def commands(parser) -> set[str]:
        return set(next(a for a in parser._actions if a.dest == "command").choices)

    assert commands(edge_parser()) == {"run", "rehearse", "profile"}
    assert not {"edge", "profile"} & commands(coordinator_parser())


# --- what a device process imports ---------------------------------------------------------------


def test_importing_every_device_module_imports_no_coordinator_code():
    """Every module of edge_sdk and device_profiles, imported in a fresh interpreter (the optional
    runtimes are imported lazily, so their absence does not matter here)."""
    code = """
import importlib, json, pkgutil, sys
import device_profiles, edge_sdk
names = [m.name for package in (device_profiles, edge_sdk)
         for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "modules": sorted(sys.modules)}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert {"edge_sdk.cli", "edge_sdk.agent.runner", "edge_sdk.client", "edge_sdk.profiling",
            "edge_sdk.rehearsal", "device_profiles.readers", "device_profiles.network",
            "device_profiles.throughput"} <= set(result["imported"])
    assert _forbidden(result["modules"]) == []


def test_device_profiles_imports_nothing_of_fedprune_above_it():
    code = """
import json, sys
import device_profiles, device_profiles.readers, device_profiles.network, device_profiles.throughput
print(json.dumps(sorted(sys.modules)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [m for m in json.loads(proc.stdout)
            if m.split(".")[0] in ("edge_sdk", "coordinator", "export")]
    assert ours == []


def _imported(stderr: str) -> list[str]:
    """Module names from `-X importtime` lines: "import time: self | cumulative | name"."""
    return [line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2]


def test_an_edge_agent_through_a_real_round_imports_no_coordinator_code(tmp_path, broker):
    fleet, device = "lean", "lean-dev-0"
    state = tmp_path / "device"
    config = tmp_path / "edge.toml"
    config.write_text(f'device_id = "{device}"\nbroker = "{broker.url}"\nfleet = "{fleet}"\n'
                      f'state_dir = "{state}"\nprofile = "catalogue:rpi4-4gb"\nmax_samples = 300\n'
                      'epsilon_budget = 8.0\n\n[data]\nclients = 2\ndevice_index = 0\n')
    device_log, coordinator_log = tmp_path / "device.log", tmp_path / "coordinator.log"
    # Logs and `-X importtime` go to stderr: each log holds its process's stderr alone.
    agent = edge_agent_process(config, device_log, "the edge agent", args=["--plain-logs"],
                               python_flags=["-X", "importtime"], stderr_only=True).start()
    coordinator = coordinator_process(
        "the coordinator", [f"broker.url={broker.url}", f"broker.fleet={fleet}",
                            f"state_dir={tmp_path / 'coordinator'}", "http_port=0",
                            "exit_when_done=true", "strategy=fedavg", "model=mlp",
                            "evaluate=false", "export.enabled=false", "train.lr=0.05",
                            "dp.target_epsilon=8",
                            "rounds.total=1", "rounds.devices_per_round=1",
                            "rounds.min_devices=1", "rounds.deadline_seconds=120",
                            "rounds.registration_grace_seconds=0"],
        coordinator_log, args=["--plain-logs"], stderr_only=True).start()
    tasks = state / "tasks.json"
    try:
        # The coordinator exits once its one round is committed: the device's update is in it.
        wait_until(lambda: coordinator.exited() is not None, 240, "the coordinator to commit its round",
                   watch=[agent], interval=0.2)
        assert coordinator.exited() == 0, coordinator_log.read_text()[-3000:]
        wait_until(lambda: tasks.exists() and "acked" in json.loads(tasks.read_text()).values(), 60,
                   "the device to record the coordinator's ACK of its update", watch=[agent],
                   interval=0.2)
        assert agent.stop(timeout=30) == 0
    finally:
        stop_processes([agent, coordinator], signal.SIGKILL)
    stderr = device_log.read_text(errors="replace")
    assert "round 1: sent" in stderr, stderr[-3000:]
    modules = _imported(stderr)
    # The parse sees the agent and its lazy imports during the round (DP training); edge_sdk.cli
    # itself runs as __main__.
    assert {"edge_sdk.agent.runner", "edge_sdk.client", "torch", "opacus"} <= set(modules)
    assert _forbidden(modules) == []
