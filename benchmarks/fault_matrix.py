"""Run the fault tests against real Mosquitto and render docs/RELIABILITY.md from their rows.

    python benchmarks/fault_matrix.py   # runs `pytest -m faults`, writes docs/RELIABILITY.md
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATIC_ROWS = [  # covered by tests/test_coordinator_engine.py (SQLite and PostgreSQL), asserted there
    ("QoS 1 redelivery of an accepted update", "acknowledged as a duplicate, counted once",
     "test_a_round_commits_with_every_update_counted_once"),
    ("coordinator restarted mid-round (engine on the same database), first update replayed after it",
     "round resumed, unanswered tasks re-sent with the same ids, replay counted once, the committed "
     "model equals the aggregate of the 3 distinct updates",
     "test_restart_mid_round_resumes_without_losing_or_double_counting"),
    ("late update (after the deadline), stale update (round closed), update on another device's "
     "topic, oversized and bit-flipped updates", "each refused and, where its header is readable, "
     "the device told why; the model untouched",
     "test_late_stale_foreign_and_oversized_updates_are_refused_and_the_device_told"),
]


def main() -> None:
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as handle:
        rows_path = handle.name
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "faults", "tests/test_faults.py"],
                         cwd=ROOT,
                         env={**os.environ, "FEDPRUNE_FAULT_MATRIX": rows_path})
    rows = [json.loads(line) for line in Path(rows_path).read_text().splitlines()]
    lines = ["# Reliability: the fault matrix", "",
             "Produced by `python benchmarks/fault_matrix.py`, which runs the fault tests "
             "(`pytest -m faults`, real Mosquitto 2.0 with `deploy/mosquitto/mosquitto.conf`, the "
             "coordinator and devices as separate processes, SQLite) and writes this file from the "
             "rows they record. Machine: " + f"{platform.machine()}, {os.cpu_count()} cores. "
             f"pytest exit status: {run.returncode}.", "",
             "Updates: accepted = stored once under their (device, round, task) key; lost = "
             "accepted by a device's task but absent from the database; duplicated = counted "
             "twice; redelivered = second copies that arrived and were acknowledged as duplicates.",
             "", "| scenario | what happened | accepted | lost | duplicated | redelivered |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['scenario']} | {row['outcome']} | {row['accepted']} | {row['lost']} | "
                     f"{row['duplicated']} | {row['redelivered']} |")
    lines += ["", "Also asserted by the suite (engine-level, message by message, on SQLite and "
              "PostgreSQL; no broker):", "", "| scenario | what happened | test |", "|---|---|---|"]
    lines += [f"| {a} | {b} | `{c}` |" for a, b, c in STATIC_ROWS]
    (ROOT / "docs" / "RELIABILITY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
