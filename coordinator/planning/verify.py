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

from edge_sdk.models import ModelSpec
from edge_sdk.references import reference_folders
from edge_sdk.sizing import DevicePlan


class RehearsalFailed(RuntimeError):
    pass


def measure_rehearsal(plan: DevicePlan, threads: int | None = None,
                      spec: ModelSpec | None = None) -> tuple[int, dict]:
    """(child's peak RSS in bytes, the child's JSON report).

    With `spec` (a plan made from an input shape, no data source): the plan's training on random
    inputs of the spec's shape (`python -m edge_sdk.rehearsal`), since there is no data to load.
    """
    # OpenMP threads that sleep while they wait, as the memory calibration ran: spinning ones on
    # shared cores made a rehearsal of a MobileNet 20x slower (66 s instead of 3 s), same peak.
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    # The child imports what this process imports: a package.module:function model included,
    # from the config folder it was imported from.
    search = [*reference_folders(), env.get("PYTHONPATH", ""), *sys.path]
    env["PYTHONPATH"] = os.pathsep.join(p for p in search if p)
    with tempfile.TemporaryDirectory(prefix="fedprune-rehearse-") as tmp:
        if spec is None:
            path = Path(tmp) / "plan.json"
            plan.save(path)
            command = ["-m", "edge_sdk.cli", "rehearse", "--plan", str(path), "--json"]
        else:
            command = ["-m", "edge_sdk.rehearsal", json.dumps({
                "spec": spec.base.to_dict(), "width": plan.width_ratio,
                "physical_batch": plan.physical_batch_size, "dp": plan.dp,
                "batch_size": plan.batch_size, "samples": plan.local_samples,
                "momentum": plan.momentum, "optimizer": plan.optimizer,
                "seed": plan.data.seed})]
        child = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env)
        out, err = child.communicate()
    if child.returncode != 0:
        raise RehearsalFailed(f"rehearsal of {plan.device_id} exited with {child.returncode}: "
                              f"{err.decode(errors='replace').strip()[-2000:]}")
    report = json.loads(out.decode().strip().splitlines()[-1])
    return int(report["peak_rss_bytes"]), report
