"""`fedprune demo`, the README's main job, as a user runs it (`bash scripts/demo.sh`, on fewer
devices, rounds and samples): real processes, embedded broker."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_plans_devices_differently_and_reports_rounds_accuracy_bytes_and_epsilon(tmp_path):
    out, report = tmp_path / "demo", tmp_path / "r.json"
    token = secrets.token_hex(16)  # the dashboard's API token: never printed nor logged
    # The script's own arguments come first; later ones win (argparse), as its comment says.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    run = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--devices", "3",
                          "--rounds", "2", "--samples", "400", "--out", str(out),
                          "--json-out", str(report)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FEDPRUNE_HTTP_TOKEN": token, "PATH": path})
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/ \(the page asks for the API token, "
                     r"the value of \$FEDPRUNE_HTTP_TOKEN", " ".join(run.stdout.split()))  # wrapped
    assert token not in run.stdout + run.stderr
    assert not [f for f in out.rglob("*") if f.is_file() and token.encode() in f.read_bytes()]
    result = json.loads(report.read_text())

    # Each device's plan is the coordinator's (DevicePlan dict from its store), and the planner's
    # work is visible: rpi3b and phone-low cannot hold leaf_cnn at full width.
    devices = result["devices"]
    assert [d["device_class"] for d in devices] == ["rpi3b", "phone-low", "rpi4-4gb"]
    plans = [d["plan"] for d in devices]
    assert all(p["model"] == result["model"] and p["decisions"]["width"] for p in plans)
    assert len({(p["width_ratio"], p["download_keep"], p["upload_keep"]) for p in plans}) >= 2
    selected = [d for d in devices if d["selected"]]
    assert all(d["plan"]["fits"] for d in selected) and len(selected) >= 2
    assert all(p["predicted_peak_bytes"] <= p["memory_limit_bytes"] for p in plans if p["fits"])
    for d in devices:  # the printed plan table has every device with its class and width
        assert re.search(rf"{d['id']} {d['device_class']} .* {d['plan']['width_ratio']:g} ", run.stdout)

    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for summary in result["rounds"]:
        assert summary["selected"] == len(selected)
        assert summary["accepted"] == len(selected) and summary["straggled"] == 0
        assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
        assert 0 < summary["epsilon_max"] <= 8.0 * 1.01
        # The per-round row: accepted/selected, straggled, refused.
        assert re.search(rf"^\s*{summary['round']}\s+{len(selected)}/{len(selected)}\s+0\s+0\s",
                         run.stdout, re.MULTILINE)

    # Each round's row is followed by each selected device's MB up/down, which add up to the
    # row, its personal model's accuracy, whose mean is the row's, and the epsilon it has spent.
    line = (r"\n\s+(\S+): ([\d.]+) MB up, ([\d.]+) MB down, personal accuracy ([\d.]+), "
            r"epsilon ([\d.]+)")
    for summary in result["rounds"]:
        found = re.search(rf"^\s*{summary['round']}\s+{len(selected)}/.*((?:{line})+)", run.stdout,
                          re.MULTILINE)
        assert found, run.stdout
        items = re.findall(line, found.group(1))
        moved = {device: (float(up), float(down)) for device, up, down, _, _ in items}
        assert sorted(moved) == [d["id"] for d in selected]
        personal = [float(accuracy) for *_, accuracy, _ in items]
        assert abs(sum(personal) / len(personal) - summary["personalized_accuracy"]) < 0.01
        assert all(0 < float(epsilon) <= 8.0 * 1.01 for *_, epsilon in items)
        assert abs(sum(up for up, _ in moved.values()) - summary["bytes_up"] / 1e6) < 0.01 * len(moved)
        assert abs(sum(down for _, down in moved.values()) - summary["bytes_down"] / 1e6) < 0.01 * len(moved)
    # The plan table says the bytes a task and an update are planned to weigh (not 'keep 1').
    for d in devices:
        row = next(line for line in run.stdout.splitlines() if line.startswith(f"{d['id']} "))
        assert f"{d['plan']['upload_bytes'] / 1e6:.2f}MB" in row and "k1" not in row

    # Redirected (as here), it reads as lines: no progress bar frames, no Opacus warning about
    # its RDP orders, nothing wider than 100 columns but a path that is (`database: sqlite:///...`).
    assert "\r" not in run.stdout + run.stderr
    assert "Optimal order" not in run.stdout + run.stderr
    assert not [line for line in run.stdout.splitlines()
                if len(line) > 100 and len(line.split(": ", 1)[-1].split()) > 1]

    final = result["final"]
    rounds = result["rounds"]
    assert final["rounds"] == 2
    assert final["updates_aggregated"] == 2 * len(selected) and final["updates_lost"] == 0
    assert final["bytes_up_total"] == sum(r["bytes_up"] for r in rounds)
    assert final["bytes_down_total"] == sum(r["bytes_down"] for r in rounds)
    assert 0 < final["epsilon_max"] <= 8.0 * 1.01
    assert final["global_accuracy"] == rounds[-1]["global_accuracy"]
    # S1 gives each device 5 classes: chance is its majority class's share, about 0.2, not 0.1.
    assert 0.18 < final["chance_accuracy"] < 0.35
    assert final["personalized_accuracy"] > final["chance_accuracy"] + 0.03
    assert f"chance {final['chance_accuracy']:.2f}" in run.stdout
    assert "official" in run.stdout and "checkpoints:" in run.stdout

    assert len(list(Path(result["checkpoints"]).glob("global-r*.pt"))) == 2
    for device in selected:
        assert Path(device["model"]).exists()
