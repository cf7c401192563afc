"""Every command the README shows, run as a user types it, in the README's order, so the README
cannot drift from the CLI.

The commands are read from the README itself (its indented code blocks: a line whose first word
is a program a user runs, with or without a `$ ` prompt). Each has a recipe below saying how it is
run here: the same words, with only the sizes shrunk (fewer clients and rounds) and site-specific
values replaced (the broker's port, a free HTTP port, a temporary state folder). A command added
to or changed in the README without a recipe fails `test_every_readme_command_has_a_recipe`, and
one whose recipe no longer matches the CLI fails its own run. Output the README prints after a
`$ ` command is compared with what the command prints.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.ports import free_port
from harness.processes import Process, stop_processes
from harness.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PROGRAMS = ("fedprune", "fedprune-edge", "python", "bash", "pip")
DATA = Path(os.environ.get("FEDPRUNE_DATA", ROOT.parent / "shared" / "data"))


@dataclass(frozen=True)
class Shown:
    """A command of the README and the output it shows after it (`$ ` blocks only)."""
    command: str
    output: tuple[str, ...] = ()


def readme_commands(text: str) -> list[Shown]:
    """The README's commands in order, each as `shlex.join` of its words (comments dropped)."""
    shown: list[Shown] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("    "):
            continue
        body = line.strip()
        prompt = body.startswith("$ ")
        body = body.removeprefix("$ ")
        if body.split(" ", 1)[0] not in PROGRAMS:
            continue
        output: list[str] = []
        if prompt:  # the output shown runs to the end of the code block
            for after in lines[i + 1:]:
                if not after.startswith("    ") or after.strip().startswith("$ "):
                    break
                output.append(after[4:])
        shown.append(Shown(shlex.join(shlex.split(body, comments=True)), tuple(output)))
    return shown


@dataclass(frozen=True)
class Recipe:
    """How a README command runs here.

    `shrink` replaces a flag's value (`{"--rounds": "1"}`) or a `--set` key's (`"set:KEY"`);
    `add` appends words; `exit` is the status the README promises; `expect` are patterns the
    output must hold. `elsewhere` names the test file that runs the command instead (the command's
    distinctive words must appear there), for the two set-up scripts and the edge install, whose
    full cost a second run here would only repeat.
    """
    shrink: dict[str, str] = field(default_factory=dict)
    add: tuple[str, ...] = ()
    exit: int = 0
    expect: tuple[str, ...] = ()
    elsewhere: tuple[str, str] | None = None   # (test file, words it must contain)
    tour: bool = False                         # run by test_the_tour, against a real broker


SMALL = {"--clients": "3", "--rounds": "1"}
FEW_SAMPLES = ("--set", "max_client_samples=120")
ROUND_TABLE = (r"round\s+personal\s+global", r"\n\s+1\s+0\.\d+\s+0\.\d+")

RECIPES: dict[str, Recipe] = {
    "bash scripts/demo.sh": Recipe(elsewhere=("tests/test_demo.py", "scripts/demo.sh")),
    "bash scripts/test.sh": Recipe(elsewhere=(".ci/run", "bash scripts/test.sh")),
    "pip install '.[edge]' -c constraints.txt": Recipe(
        elsewhere=("tests/test_edge_install.py", '".[edge]"')),
    "fedprune new my-project": Recipe(elsewhere=("tests/test_new_project.py", '"new", "my-project"')),
    "fedprune simulate --config my-project/fedprune.toml": Recipe(
        elsewhere=("tests/test_new_project.py", '"--config", "my-project/fedprune.toml"')),
    "fedprune coordinator serve --config deploy/coordinator.example.toml": Recipe(tour=True),
    "fedprune status --url http://127.0.0.1:8080": Recipe(tour=True),
    "fedprune devices --url http://127.0.0.1:8080": Recipe(tour=True),
    "fedprune-edge run --config deploy/edge.example.toml --new-state": Recipe(tour=True),
    "fedprune demo --devices 8 --rounds 5 --broker mqtt://127.0.0.1:1883": Recipe(tour=True),
    "fedprune coordinator provision --count 20 --broker mqtts://broker.lan:8883 --broker-host "
    "broker.lan --out fleet/": Recipe(shrink={"--count": "2"}),
    "fedprune simulate --strategy fedavg --clients 10 --partition classes:5 --rounds 3 "
    "--local-epochs 1 --json-out runs/fedavg.json": Recipe(SMALL, FEW_SAMPLES, expect=ROUND_TABLE),
    "fedprune simulate --strategy fedp3 --set fedp3.selection=opu2 --clients 10 --partition "
    "classes:5 --rounds 3 --local-epochs 1 --json-out runs/fedp3.json": Recipe(
        SMALL, FEW_SAMPLES, expect=ROUND_TABLE),
    "fedprune report runs/fedavg.json runs/fedp3.json --out runs/report": Recipe(
        expect=(r"index\.html",)),
    "fedprune simulate --strategy fedp3 --set dp.target_epsilon=4 --set dp.delta=1e-5 --clients 10 "
    "--rounds 3": Recipe(SMALL, FEW_SAMPLES, expect=(*ROUND_TABLE, r"epsilon")),
    "fedprune-edge profile --bandwidth 2M,8M --out my-device.json": Recipe(
        add=("--quick",), expect=(r"network: up 2\.00 MB/s, down 8\.00 MB/s \(given\)",)),
    "fedprune plan --profile my-device.json --deadline 600 --json --out plan.json --verify": Recipe(
        expect=(r'"measured_peak_bytes": \d+',)),
    "fedprune catalogue --model leaf_cnn": Recipe(),
    "fedprune plan --catalogue gateway-512mb": Recipe(exit=1, expect=(
        r"DOES NOT FIT: memory: the runtime alone \(Python, torch, Opacus\) needs about",)),
    "fedprune-edge rehearse --plan plan.json": Recipe(
        expect=(r"^\S+: trained \d+ samples in [\d.]+ s, peak RSS [\d.]+ MB$",)),
    "fedprune simulate --fleet catalogue:0 --clients 20 --rounds 3": Recipe(
        SMALL, FEW_SAMPLES, expect=(*ROUND_TABLE, r"peak/limit MB\s+fits")),
    "fedprune plan --catalogue rpi3b --model leaf_cnn": Recipe(),
    "fedprune simulate --strategy fedp3 --model leaf_cnn --fleet catalogue:0 --clients 6 --set "
    "max_client_samples=600 --rounds 1 --local-epochs 1 --json-out runs/fleet.json": Recipe(
        {"set:max_client_samples": "48"}),
    "fedprune simulate --strategy fedp3 --clients 10 --rounds 3 --export-dir runs/export": Recipe(
        {"--clients": "2", "--rounds": "1"}, (*FEW_SAMPLES, "--set", "export_formats=['onnx']"),
        expect=(r"exported 2 client bundles \(checkpoint, artifacts, manifest\.json\) to runs/export",)),
    "fedprune export --checkpoint runs/export/global/checkpoint.pt --plan plan.json --format all "
    "--quantize int8 --out runs/pi-12": Recipe(expect=(r"tflite", r"onnx")),
    "fedprune export --checkpoint runs/export/global/checkpoint.pt --device jetson-nano-4gb --out "
    "runs/jetson": Recipe(add=("--format", "onnx"), expect=(r"jetson-nano-4gb",)),
    "python -c 'import numpy as np; from edge_sdk.runtime import Predictor; p = Predictor.open("
    "'\"'\"'runs/pi-12'\"'\"', fmt='\"'\"'tflite'\"'\"'); print(p.classify(np.zeros((2, 28, 28), "
    "np.uint8)))'": Recipe(expect=(r"^\[\d \d\]$",)),
}

SHOWN = readme_commands(README.read_text())


def shrunk(command: str, recipe: Recipe, **values: str) -> list[str]:
    """The command's words with the recipe's sizes, then `values` replacing literal words
    (a URL, a port) where the README's are site-specific."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word in recipe.shrink and i + 1 < len(words):
            words[i + 1] = recipe.shrink[word]
        key = word.split("=", 1)[0]
        if i and words[i - 1] == "--set" and f"set:{key}" in recipe.shrink:
            words[i] = f"{key}={recipe.shrink['set:' + key]}"
    words = [values.get(word, word) for word in words] + list(recipe.add)
    return words


def started(name: str, words: list[str], cwd: Path, logs: Path) -> Process:
    """A long-running README command (a service), its output in `logs/<name>.log`."""
    process = Process(name, words, logs / f"{name}.log")
    with open(process.log, "w") as out:
        process.popen = subprocess.Popen(words, cwd=cwd, env=environment(), stdout=out,
                                         stderr=subprocess.STDOUT)
    return process


def environment() -> dict[str, str]:
    """A user's shell: this interpreter's console scripts on PATH, the data folder known."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FEDPRUNE_DATA": str(DATA), "OMP_NUM_THREADS": "2"}


def run(words: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command as a user's shell would, and wait for it."""
    return subprocess.run(words, cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=timeout)


def check(result: subprocess.CompletedProcess, command: str, exit: int = 0,
          expect: tuple[str, ...] = ()) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == exit, (f"`{command}` exited {result.returncode}, the README "
                                       f"promises {exit}:\n{output[-3000:]}")
    assert "Traceback" not in output, f"`{command}` printed a traceback:\n{output[-3000:]}"
    for pattern in expect:
        assert re.search(pattern, output, re.MULTILINE), (
            f"`{command}` did not print {pattern!r}:\n{output[-3000:]}")
    return output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One folder the commands share, as a user's: `deploy/` beside them, as in the checkout."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "deploy").symlink_to(ROOT / "deploy")
    (folder / "constraints.txt").symlink_to(ROOT / "constraints.txt")
    return folder


def test_every_readme_command_has_a_recipe():
    commands = [shown.command for shown in SHOWN]
    assert len(commands) == len(set(commands)), "a README command appears twice"
    missing = [c for c in commands if c not in RECIPES]
    stale = [c for c in RECIPES if c not in commands]
    assert not missing, f"README commands without a recipe here (add one): {missing}"
    assert not stale, f"recipes for commands no longer in the README (remove them): {stale}"


@pytest.mark.parametrize("shown", [s for s in SHOWN if RECIPES.get(s.command)
                                   and not RECIPES[s.command].tour], ids=lambda s: s.command[:60])
def test_readme_command(shown: Shown, workspace):
    recipe = RECIPES[shown.command]
    if recipe.elsewhere:
        path, words = recipe.elsewhere
        assert words in (ROOT / path).read_text(), f"{path} no longer runs `{shown.command}`"
        return
    output = check(run(shrunk(shown.command, recipe), workspace), shown.command, recipe.exit,
                   recipe.expect)
    if shown.output and not recipe.shrink:
        printed = output.splitlines()
        assert printed[:len(shown.output)] == list(shown.output), (
            f"`{shown.command}` printed\n" + "\n".join(printed) + "\nwhere the README shows\n"
            + "\n".join(shown.output))
    elif shown.output:  # shrunk: the README's table rows, but for the columns sizes change
        for row in shown.output:
            if re.match(r"\S+#\d+\s+\d+MB", row):
                name, memory, width, batch = row.split()[:4]
                assert re.search(rf"^{re.escape(name)}\s+{memory}\s+{width}\s+{batch}\s",
                                 output, re.MULTILINE), f"the README's row {row!r} was not printed"


def test_the_tour(workspace, broker, tmp_path):
    """The README's tour: a coordinator from the example config, an edge agent from the example
    config, `fedprune status` and `fedprune devices` against it, then the demo on the same broker.
    Only site-specific values change: the broker's address, a free HTTP port, state folders,
    and the edge's profile (a catalogue class, which the example config names as the
    alternative to a measured profile.json)."""
    by_command = {s.command: RECIPES[s.command] for s in SHOWN if RECIPES[s.command].tour}
    serve, status, devices, edge, demo = by_command
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    coordinator = started("coordinator", shlex.split(serve) + [
        "--set", f"state_dir={tmp_path / 'coordinator'}", "--set", f"http_port={port}",
        "--set", f"broker.url={broker.url}", "--plain-logs"], workspace, tmp_path)
    edge_config = tmp_path / "edge.toml"
    edge_config.write_text(with_values((ROOT / "deploy" / "edge.example.toml").read_text(), {
        "broker": broker.url, "state_dir": str(tmp_path / "edge"),
        "profile": "catalogue:rpi4-2gb"}))
    agent = None
    try:
        wait_until(lambda: answers(f"{url}/healthz"), 60, "the coordinator's HTTP API",
                   watch=[coordinator])
        check(run(shrunk(status, by_command[status], **{"http://127.0.0.1:8080": url}),
                  workspace), status)
        agent_words = shrunk(edge, by_command[edge], **{"deploy/edge.example.toml": str(edge_config)})
        agent = started("edge", agent_words + ["--plain-logs"], workspace, tmp_path)
        device_words = shrunk(devices, by_command[devices], **{"http://127.0.0.1:8080": url})
        wait_until(lambda: "pi-kitchen-01" in run(device_words, workspace).stdout, 90,
                   "the example edge device in `fedprune devices`", watch=[coordinator, agent])
        check(run(device_words, workspace), devices, expect=(r"pi-kitchen-01",))
        # The demo on the same broker while the coordinator serves: neither takes the other's
        # client id (before, both were `fedprune-coordinator` and evicted each other all round).
        recipe = Recipe({"--devices": "2", "--rounds": "1"},
                        ("--samples", "100", "--out", str(tmp_path / "demo")))
        check(run(shrunk(demo, recipe, **{"mqtt://127.0.0.1:1883": broker.url}), workspace), demo,
              expect=(r"after 1 rounds?", r"0\s+lost"))
        assert coordinator.popen.poll() is None, coordinator.tail()
        served = coordinator.log.read_text()
        assert len(re.findall(r"connected to the broker at \S+ as ", served)) == 1, \
            f"the serving coordinator connected more than once while the demo ran:\n{served[-3000:]}"
        assert "lost the connection to the broker" not in served, served[-3000:]
    finally:
        stop_processes([p for p in (agent, coordinator) if p is not None])


def answers(address: str) -> bool:
    try:
        with urllib.request.urlopen(address, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def with_values(toml: str, values: dict[str, str]) -> str:
    """The example config's text with the named top-level keys' values replaced (the rest of the
    example, comments and all, stays as shipped)."""
    for key, value in values.items():
        toml, count = re.subn(rf"^{key} = .*$", f"{key} = {value!r}".replace("'", '"'), toml,
                              count=1, flags=re.MULTILINE)
        assert count == 1, f"the example config has no top-level key {key!r}"
    return toml
