"""Check a plan by measurement: run `fedprune-edge rehearse` as a fresh child, read its peak.

The peak is the kernel's high-water mark of the child's own address space (VmHWM, read by the
child at the end). Not wait4's ru_maxrss: on Linux that also counts the pre-exec address space,
i.e. the parent's memory at fork, so a large parent would inflate every measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edge_sdk.sizing import DevicePlan


class RehearsalFailed(RuntimeError):
    pass


def measure_rehearsal(plan: DevicePlan, threads: int | None = None) -> tuple[int, dict]:
    """(child's peak RSS in bytes, the child's JSON report)."""
    with tempfile.TemporaryDirectory(prefix="fedprune-rehearse-") as tmp:
        path = Path(tmp) / "plan.json"
        plan.save(path)
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        child = subprocess.Popen(
            [sys.executable, "-m", "edge_sdk.cli", "rehearse", "--plan", str(path),
             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        out, err = child.communicate()
    if child.returncode != 0:
        raise RehearsalFailed(f"rehearsal of {plan.device_id} exited with {child.returncode}: "
                              f"{err.decode(errors='replace').strip()[-2000:]}")
    report = json.loads(out.decode().strip().splitlines()[-1])
    return int(report["peak_rss_bytes"]), report
