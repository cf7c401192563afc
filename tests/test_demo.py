"""`fedprune demo`, the README's main job, as a user runs it: real processes, embedded broker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end_and_reports_accuracy_bytes_and_epsilon(tmp_path):
    out, report = tmp_path / "demo", tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "coordinator.cli", "demo", "--devices", "3",
                          "--rounds", "2", "--samples", "400", "--out", str(out),
                          "--json-out", str(report)], capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(report.read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for summary in result["rounds"]:
        assert summary["accepted"] == 3 and summary["bytes_up"] > 0 and summary["bytes_down"] > 0
        assert 0 < summary["epsilon_max"] <= 8.0 * 1.01
    assert result["rounds"][-1]["personalized_accuracy"] > 0.25  # chance is 0.10
    assert "final: personalized accuracy" in run.stdout and "checkpoints:" in run.stdout
    assert len(list(Path(result["checkpoints"]).glob("global-r*.pt"))) == 2
    for device in result["devices"]:
        assert (Path(device["artifact"]) / "manifest.json").exists()
