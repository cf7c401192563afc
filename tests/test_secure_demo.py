"""`fedprune demo --secure-aggregation`: the same demo, its rounds under SecAgg+ with distributed
discrete Gaussian noise (user-level) instead of DP-SGD on each device; real processes, embedded
broker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_under_secure_aggregation_commits_and_says_what_it_protects(tmp_path):
    out, report = tmp_path / "demo", tmp_path / "r.json"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    run = subprocess.run([sys.executable, "-m", "coordinator.cli", "demo", "--secure-aggregation",
                          "--devices", "3", "--rounds", "1", "--samples", "300", "--out", str(out),
                          "--json-out", str(report)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PATH": path})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(report.read_text())
    selected = [d for d in result["devices"] if d["selected"]]
    (summary,) = result["rounds"]
    assert summary["accepted"] == len(selected) >= 2 and summary["bytes_up"] > 0
    privacy = result["privacy"]
    assert privacy["unit"].startswith("user-level") and 0 < privacy["epsilon"] <= 8.0 * 1.01
    assert f"secure aggregation: epsilon {privacy['epsilon']:.2f} of 8" in " ".join(run.stdout.split())
    # Each device's line counts the masked input it sent, not 0.
    ups = re.findall(r"^\s+(dev-\d\d): ([\d.]+) MB up", run.stdout, re.MULTILINE)
    assert sorted(device for device, _ in ups) == sorted(d["id"] for d in selected)
    assert all(float(mb) > 0 for _, mb in ups), run.stdout
    # Nothing a device sent is stored: the masked inputs were summed as they came.
    assert "Traceback" not in run.stdout + run.stderr
