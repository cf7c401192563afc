"""Proof on the device: plan a model for every catalogue class and measure the plan's peak.

For every class of `device_profiles.catalogue` this runs exactly what a user would,

    fedprune plan --catalogue NAME --model resnet18 --dataset fashion-mnist --verify --json

(plan from the class's profile; when the plan fits, rehearse it, i.e. one real local DP-SGD epoch
with the plan's width, physical batch and local samples, in a fresh child process whose peak RSS
is the kernel's VmHWM), and prints one row per class: the budget, the chosen width and physical
batch, predicted and measured peak, utilisation (measured / budget), whether memory binds (width
below 1 or physical batch below the logical batch) and whether the measured peak is within the
budget. Then the median utilisation over the classes where memory binds, and every plan whose
measured peak is over its budget.

    python benchmarks/verify_catalogue.py --model resnet18
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from device_profiles.catalogue import catalogue_names, catalogue_profile


def plan_and_verify(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "coordinator.cli", "plan", "--catalogue", name,
               "--model", args.model, "--dataset", args.dataset, "--deadline", str(args.deadline),
               "--local-samples", str(args.local_samples), "--batch-size", str(args.batch_size),
               "--verify", "--json"]
    if args.input_shape:  # a model on inputs no dataset has: planned and rehearsed on random ones
        command += ["--input-shape", args.input_shape, "--classes", str(args.classes)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1: the plan does not fit, said in the JSON
        raise RuntimeError(f"`{' '.join(command[1:])}` exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18",
                        help="a registered model or a package.module:function")
    parser.add_argument("--input-shape", help="e.g. 30 or 3,64,64: plan for this input instead of "
                        "the dataset's (the rehearsal then trains on random inputs)")
    parser.add_argument("--classes", type=int, default=10, help="with --input-shape")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--deadline", type=float, default=600.0)
    parser.add_argument("--local-samples", type=int, default=420)
    parser.add_argument("--batch-size", type=int, default=48)
    args = parser.parse_args()
    started = time.perf_counter()
    data = (f"--input-shape {args.input_shape} --classes {args.classes}" if args.input_shape
            else f"--dataset {args.dataset}")
    print(f"`fedprune plan --catalogue NAME --model {args.model} {data} --verify` "
          f"(DP-SGD, ghost clipping, batch {args.batch_size}, {args.local_samples} local samples, "
          f"deadline {args.deadline:.0f} s)\n")
    print("| class | available MB | budget MB | width | physical batch | predicted MB | measured MB | "
          "utilisation | error % | memory binds | within budget |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    binding, over, measured_count = [], [], 0
    for name in catalogue_names():
        available = catalogue_profile(name).memory_available_bytes
        plan = plan_and_verify(name, args)
        budget, peak = plan["memory_limit_bytes"], plan.get("measured_peak_bytes")
        binds = plan["width_ratio"] < 1.0 or plan["physical_batch_size"] < plan["batch_size"]
        row = (f"| {name} | {available / 1e6:.0f} | {budget / 1e6:.0f} | {plan['width_ratio']} | "
               f"{plan['physical_batch_size']} | {plan['predicted_peak_bytes'] / 1e6:.0f} | ")
        if peak is None:
            print(row + f"- | - | - | {'yes' if binds else 'no'} | not planned: "
                  f"{'; '.join(plan['reasons'])} |", flush=True)
            continue
        measured_count += 1
        within = peak <= budget
        if not within:
            over.append(name)
        if binds:
            binding.append(peak / budget)
        error = 100 * (plan["predicted_peak_bytes"] - peak) / peak
        print(row + f"{peak / 1e6:.0f} | {peak / budget:.0%} | {error:+.1f} | "
              f"{'yes' if binds else 'no'} | {'yes' if within else 'NO'} |", flush=True)
    print()
    median = f"{statistics.median(binding):.0%}" if binding else "n/a"
    print(f"{measured_count} of {len(catalogue_names())} classes planned and measured; median "
          f"utilisation where memory binds ({len(binding)} classes): {median}; measured peaks over "
          f"budget: {', '.join(over) if over else 'none'} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
