"""A memory-planned heterogeneous fleet vs FedAvg with every device on the full model.

Same data, devices, rounds and local training; the only difference is that with `--fleet` each
device gets a sampled catalogue profile and trains the submodel the planner sized for it (devices
with no fitting submodel sit out), while the reference pretends every device holds the full model.

    python benchmarks/fleet_fmnist.py --clients 30 --max-client-samples 600 --rounds 5 --fleet catalogue:0
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from coordinator.config import load_config
from coordinator.simulation import run_simulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--max-client-samples", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--fleet", default="catalogue:0")
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--out", default="runs/fleet_fmnist")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(strategy=args.strategy, clients=args.clients, rounds=args.rounds,
                  partition="classes:5", max_client_samples=args.max_client_samples, **{"train.local_epochs": args.local_epochs,
                                            "train.momentum": 0.9})
    rows = []
    for label, fleet in (("every device on the full model", None), (f"planned fleet {args.fleet}", args.fleet)):
        result = run_simulation(load_config(None, [], fleet=fleet, **common), progress=False).to_dict()
        (out / f"{'full' if fleet is None else 'fleet'}.json").write_text(json.dumps(result, indent=2))
        rows.append((label, result))
        print(f"done {label}", flush=True)
    print(f"\n{args.strategy}, {args.clients} devices x {args.max_client_samples} samples, S1, "
          f"{args.rounds} rounds x {args.local_epochs} "
          "local epochs, SGD lr 0.01 momentum 0.9, Fashion-MNIST, FedP3 CNN")
    print("| run | personalized acc % | global acc % | bytes up | bytes down | devices trained | widths |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, result in rows:
        final = result["final"]
        planned = result.get("clients")
        widths = (", ".join(f"{w}: {n}" for w, n in sorted(Counter(
            c["width_ratio"] for c in planned if c["fits"]).items(), reverse=True))
            if planned else "1.0: all")
        print(f"| {label} | {100 * final['personalized_accuracy']:.2f} | "
              f"{100 * final['global_accuracy']:.2f} | {final['bytes_up_total']:,} | "
              f"{final['bytes_down_total']:,} | {result['rounds'][-1]['participants']} | {widths} |")


if __name__ == "__main__":
    main()
