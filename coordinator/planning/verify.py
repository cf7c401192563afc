"""Check a plan by measurement: run `fedprune edge rehearse` as a fresh child, read its peak.

The peak comes from the kernel's accounting of that one child (wait4's rusage), not from the
child's own report, so a rehearsal cannot under-report itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edge_sdk.budget import BudgetPlan


class RehearsalFailed(RuntimeError):
    pass


def measure_rehearsal(plan: BudgetPlan, threads: int | None = None) -> tuple[int, dict]:
    """(child's peak RSS in bytes, the child's JSON report)."""
    with tempfile.TemporaryDirectory(prefix="fedprune-rehearse-") as tmp:
        path = Path(tmp) / "plan.json"
        plan.save(path)
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        child = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "edge", "rehearse", "--plan", str(path),
             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        # Drain pipes first (a full pipe would block the child), then reap it with its rusage.
        out, err = child.stdout.read(), child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RehearsalFailed(f"rehearsal of {plan.device} exited with {child.returncode}: "
                              f"{err.decode(errors='replace').strip()[-2000:]}")
    report = json.loads(out.decode().strip().splitlines()[-1])
    return usage.ru_maxrss * 1024, report
