"""The README's sizing flow, as a user types it: `fedprune plan ... --json --out plan.json`, then
`fedprune-edge rehearse --plan plan.json` on that file prints the device, the samples trained
and the peak RSS (it crashed with KeyError: 'device'), and `--json` prints the same report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent  # the console scripts pip installed beside this interpreter


def test_rehearse_runs_the_plan_file_fedprune_plan_writes(tmp_path):
    plan = tmp_path / "plan.json"
    made = subprocess.run([BIN / "fedprune", "plan", "--catalogue", "rpi3b", "--model", "mlp",
                           "--local-samples", "64", "--json", "--out", str(plan)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    run = subprocess.run([BIN / "fedprune-edge", "rehearse", "--plan", "plan.json"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    match = re.fullmatch(r"rpi3b: trained (\d+) samples in [\d.]+ s, peak RSS ([\d.]+) MB\n", run.stdout)
    assert match, run.stdout
    assert 32 <= int(match[1]) <= 128 and float(match[2]) > 50  # DP: Poisson-sampled batches
    as_json = subprocess.run([BIN / "fedprune-edge", "rehearse", "--plan", "plan.json", "--json"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = json.loads(as_json.stdout.strip().splitlines()[-1])
    assert report["device_id"] == "rpi3b" and report["samples"] > 0
