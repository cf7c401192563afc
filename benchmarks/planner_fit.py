"""Does every plan fit? Predicted vs measured peak memory over a sampled catalogue fleet.

For each sampled device: plan the FedP3 CNN (DP-SGD, ghost clipping) from its profile, then run
the plan's rehearsal (`fedprune-edge rehearse`) as a fresh child and read its peak RSS from the
kernel. Prints one row per device and the fit rate, median utilisation (measured / budget), how
many measured peaks exceed the prediction (an upper bound: none should) and the worst
measured / predicted ratio.

    python benchmarks/planner_fit.py --devices 24 --seed 0
"""

from __future__ import annotations

import argparse
import statistics

from coordinator.planning.memory import MemoryCoefficients
from coordinator.planning.planner import PlannerSettings, plan_device
from coordinator.planning.verify import measure_rehearsal
from device_profiles import sample_fleet
from edge_sdk.models import model_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="fedp3_cnn")
    parser.add_argument("--deadline", type=float, default=600.0)
    args = parser.parse_args()
    base = model_spec(args.model, (1, 28, 28), 10)
    coefficients = MemoryCoefficients.load()
    settings = PlannerSettings(deadline_seconds=args.deadline)
    print(f"{args.model}, DP-SGD (ghost), batch 48, 420 local samples, deadline {args.deadline:.0f} s, "
          f"safety margin {settings.safety_margin}; memory model: {coefficients.source}")
    print("| device | available MB | budget MB | width | physical batch | predicted MB | "
          "measured MB | utilisation | error % | fits |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    utilisation, ratios, planned, fitting = [], [], 0, 0
    for profile in sample_fleet(args.devices, args.seed):
        plan = plan_device(profile, base, args.model, settings, coefficients)
        row = (f"| {profile.name} | {profile.memory_available_bytes / 1e6:.0f} | "
               f"{plan.memory_limit_bytes / 1e6:.0f} | {plan.width_ratio} | {plan.physical_batch_size} | "
               f"{plan.predicted_peak_bytes / 1e6:.0f} | ")
        if not plan.fits:
            print(row + f"- | - | - | refused: {'; '.join(plan.reasons)} |", flush=True)
            continue
        planned += 1
        peak, _ = measure_rehearsal(plan)
        fits = peak <= plan.memory_limit_bytes
        fitting += fits
        utilisation.append(peak / plan.memory_limit_bytes)
        ratios.append(peak / plan.predicted_peak_bytes)
        print(row + f"{peak / 1e6:.0f} | {peak / plan.memory_limit_bytes:.0%} | "
              f"{100 * (plan.predicted_peak_bytes - peak) / peak:+.1f} | {'yes' if fits else 'NO'} |",
              flush=True)
    print()
    print(f"planned {planned} of {args.devices} devices (the rest refused with a reason); "
          f"{fitting} of {planned} measured peaks within budget; median utilisation "
          f"{statistics.median(utilisation):.0%}; {sum(r > 1 for r in ratios)} of {planned} measured "
          f"peaks over the predicted (upper bound); worst measured/predicted {max(ratios):.3f}")


if __name__ == "__main__":
    main()
