"""A mistyped flag, key or value gets a message naming it and what to do, rc 2, no traceback
(issue 24, items 6, 7 and 9). Each case runs the installed command as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DATA = os.environ.get("FEDPRUNE_DATA")


def _fedprune(*words: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *words], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("words, says", [
    (("demo", "--rounds", "0"), "argument --rounds: must be at least 1, got 0"),
    (("demo", "--devices", "0"), "argument --devices: must be at least 1, got 0"),
    (("demo", "--epsilon", "nan"), "argument --epsilon: must be a finite number above 0"),
    (("demo", "--http-port", "70000"), "argument --http-port: must be 0 (a free port) to 65535"),
    (("simulate", "--rounds", "1", "--set", "rounds=2"),
     "rounds is given twice: 1 by its own flag and 2 by --set rounds=2; give it once"),
    (("simulate", "--set", "roundz=2"), "roundz: not a setting; did you mean rounds?"),
    (("simulate", "--set", "train.lrr=0.1"), "train.lrr: not a setting; did you mean lr?"),
    (("coordinator", "serve", "--set", "broker.flet=x"), "broker.flet: not a setting; did you mean fleet?"),
    (("simulate", "--set", "rounds=0"),
     "invalid configuration: rounds: Input should be greater than or equal to 1 (got 0)"),
    (("coordinator", "serve", "--set", "rounds=2"), "rounds: a section of settings ([rounds] in a "
     "file, rounds.KEY=VALUE in --set), not a value (got 2)"),
    # a typo in a data folder used to start a download into it
    (("simulate", "--data-dir", "/no/such/data"), "argument --data-dir: folder /no/such/data does "
     "not exist; check the path, or create it (mkdir -p /no/such/data) to download the dataset into it"),
    (("demo", "--data-dir", "/no/such/data"), "argument --data-dir: folder /no/such/data does not exist"),
    (("plan", "--catalogue", "rpi3b", "--data-dir", "/no/such/data"),
     "argument --data-dir: folder /no/such/data does not exist"),
    (("simulate", "--set", "data_dir=/no/such/data"),
     "invalid configuration: data_dir: folder /no/such/data does not exist"),
])
def test_a_bad_flag_or_key_is_named_with_what_to_do(words, says):
    result = _fedprune(*words)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "errors.pydantic.dev" not in result.stderr


def test_a_relative_data_dir_is_read_from_where_the_command_runs(tmp_path, monkeypatch):
    """The demo writes --data-dir into each device's edge.toml, where a relative path would be
    read from that file's folder (and start a download there)."""
    from coordinator.cli import build_parser

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    for command in ("demo", "simulate"):
        args = build_parser().parse_args([command, "--data-dir", "data"])
        assert args.data_dir == str(tmp_path.resolve() / "data")


def test_a_config_file_with_several_problems_names_each_on_its_own_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('roundz = 2\nclients = "ten"\n[fedp3]\nglobal_keep = 0\n')
    result = _fedprune("simulate", "--config", str(path), "--set", "train.lr=-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "invalid configuration (2 problems):" in result.stderr, result.stderr
    assert "\n  clients: Input should be a valid integer, unable to parse string as an integer " \
           "(got 'ten')\n" in result.stderr, result.stderr
    assert "\n  train.lr: Input should be greater than 0 (got -1)" in result.stderr, result.stderr
    # the keys pydantic knows are checked first; the rest once they pass
    path.write_text('roundz = 2\n[fedp3]\nglobal_keep = 0\n')
    result = _fedprune("simulate", "--config", str(path))
    assert result.returncode == 2 and "errors.pydantic.dev" not in result.stderr
    assert "roundz: not a setting; did you mean rounds?" in result.stderr, result.stderr


def test_help_says_the_defaults():
    for words in (("demo", "--help"), ("simulate", "--help"), ("coordinator", "serve", "--help")):
        result = _fedprune(*words)
        assert result.returncode == 0 and "(default: " in result.stdout, words
    assert "federated rounds (default: 3)" in " ".join(_fedprune("demo", "--help").stdout.split())
    simulate = " ".join(_fedprune("simulate", "--help").stdout.split())  # the config's defaults
    assert "federated rounds (default: 3)" in simulate and "(default: fedavg)" in simulate
    edge = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "run", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert "(default: auto)" in edge.stdout


def test_the_demo_on_a_port_in_use_names_the_flag(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _fedprune("demo", "--rounds", "1", "--devices", "1", "--samples", "100",
                           "--http-port", str(port), "--out", str(tmp_path / "demo"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert (f"the HTTP API cannot listen on 127.0.0.1:{port}" in result.stderr
            and "give another --http-port, or 0 for a free one" in result.stderr), result.stderr


def test_serve_without_a_config_says_what_it_uses(tmp_path):
    """It used to start on 127.0.0.1:1883 and port 8080 without a word."""
    serve = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "coordinator", "serve",
                              "--log-format", "plain", "--set", "http_port=0", "--set",
                              f"state_dir={tmp_path}", "--set", "broker.url=mqtt://127.0.0.1:1"],
                             stderr=subprocess.PIPE, text=True)
    try:
        first = serve.stderr.readline()
    finally:
        serve.terminate()
        serve.wait(30)
    assert ("no --config, so the defaults (and any --set): broker mqtt://127.0.0.1:1, fleet default, "
            f"HTTP API http://127.0.0.1:0, state in {tmp_path}") in first, first


def test_the_gateway_is_told_the_runtime_alone_is_over_its_memory():
    """Item 7: no model, width or flag fits a 512 MB gateway; the refusal and the catalogue say so
    (they used to say only that width 0.125 did not fit, as if a smaller model might)."""
    import re

    plan = _fedprune("plan", "--catalogue", "gateway-512mb")
    assert plan.returncode == 1 and "Traceback" not in plan.stderr, plan.stderr
    assert re.search(r"DOES NOT FIT: memory: the runtime alone \(Python, torch, Opacus\) needs about "
                     r"\d+ MB of this device's 362 MB \(403 MB available x 0.9\); no model or width "
                     r"fits", plan.stdout), plan.stdout
    table = _fedprune("catalogue")
    assert table.returncode == 0, table.stderr
    assert re.search(r"^gateway-512mb .* no$", table.stdout, re.MULTILINE), table.stdout
    assert re.search(r"^rpi3b .* yes$", table.stdout, re.MULTILINE), table.stdout
    said = " ".join(table.stdout.split())
    assert "gateway-512mb does not fit: memory: the runtime alone (Python, torch, Opacus)" in said


def test_setup_is_a_no_op_when_the_install_is_current():
    """Item 9: `scripts/demo.sh` runs `scripts/setup.sh` first, which used to reinstall the package
    every time (a minute and 80 lines of pip's notes). With the install current it returns
    without pip: silent, and its stamp (written only after an install) is not rewritten."""
    root = Path(__file__).resolve().parents[1]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

    def setup() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(root / "scripts" / "setup.sh")], capture_output=True,
                              text=True, timeout=1800, env={**os.environ, "PATH": path})

    first = setup()  # installs only if this checkout's install is not current
    assert first.returncode == 0, first.stderr[-3000:]
    assert "is ignored: it is neither a file nor a directory" not in first.stderr
    stamp = Path(sys.prefix) / "fedprune-setup.stamp"
    written = stamp.stat().st_mtime_ns
    second = setup()
    assert second.returncode == 0 and second.stdout == second.stderr == "", second.stderr[-3000:]
    assert stamp.stat().st_mtime_ns == written
