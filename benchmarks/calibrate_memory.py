"""Calibrate the planner's memory model against measured rehearsal peaks.

Runs `fedprune edge rehearse` as a fresh child for a grid of width ratios and physical batch
sizes (DP-SGD, ghost clipping, FedP3 CNN on a Fashion-MNIST shard), reads each child's peak RSS
from the kernel (its VmHWM), fits the three coefficients of coordinator/planning/memory.py by
non-negative least squares, prints predicted vs measured, and writes memory_calibration.json.

    python benchmarks/calibrate_memory.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
from datetime import date

import numpy as np
from scipy.optimize import nnls

from coordinator.planning.memory import CALIBRATION_FILE, MemoryCoefficients, footprint, predict_peak_bytes
from coordinator.planning.verify import measure_rehearsal
from edge_sdk.budget import BudgetPlan
from edge_sdk.models import model_spec
from edge_sdk.slicing import width_spec

GRID = [(w, b) for w in (1.0, 0.75, 0.5, 0.25) for b in (8, 48, 192)]


def rehearsal_plan(model: str, width: float, physical: int, samples: int) -> BudgetPlan:
    spec = width_spec(model_spec(model, (1, 28, 28), 10), width)
    return BudgetPlan(device=f"calibration-w{width}-b{physical}", model=model, width_ratio=width,
                      batch_size=max(physical, 48), physical_batch_size=physical, local_steps=0,
                      local_samples=samples, parameters=footprint(spec).parameters,
                      predicted_peak_bytes=0, budget_bytes=0, download_bytes=0, upload_bytes=0,
                      transfer_seconds=0, compute_seconds=0, deadline_seconds=1, fits=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fedp3_cnn")
    parser.add_argument("--samples", type=int, default=420)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = []
    for width, physical in GRID:
        plan = rehearsal_plan(args.model, width, physical, args.samples)
        peak, _ = measure_rehearsal(plan, threads=args.threads)
        spec = width_spec(model_spec(args.model, (1, 28, 28), 10), width)
        rows.append((width, physical, spec, peak))
        print(f"measured width {width} physical batch {physical}: {peak / 1e6:.1f} MB", flush=True)
    design = np.array([[1.0, footprint(s).parameters, 4.0 * footprint(s).activation_elements * b]
                       for _, b, s, _ in rows])
    target = np.array([peak - 4.0 * footprint(s).input_elements * args.samples
                       for _, _, s, peak in rows])
    (baseline, per_param, act), _ = nnls(design, target)
    coefficients = MemoryCoefficients(
        baseline, per_param, act,
        source=f"benchmarks/calibrate_memory.py --threads {args.threads} on {platform.machine()} "
               f"{socket.gethostname()} ({date.today()}), {len(rows)} rehearsals of {args.model}")
    print()
    print(f"fit: baseline {baseline / 1e6:.1f} MB, {per_param:.1f} bytes/parameter, "
          f"activation factor {act:.2f}")
    print("| width | physical batch | parameters | measured MB | predicted MB | error % |")
    print("|---:|---:|---:|---:|---:|---:|")
    for width, physical, spec, peak in rows:
        predicted = predict_peak_bytes(spec, physical, args.samples, coefficients)
        print(f"| {width} | {physical} | {footprint(spec).parameters:,} | {peak / 1e6:.1f} | "
              f"{predicted / 1e6:.1f} | {100 * (predicted - peak) / peak:+.1f} |")
    if not args.no_write:
        CALIBRATION_FILE.write_text(json.dumps(coefficients.to_dict(), indent=2) + "\n")
        print(f"\nwrote {CALIBRATION_FILE}")


if __name__ == "__main__":
    main()
