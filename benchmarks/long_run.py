"""Methods at a research budget: section 8's setting run for 50+ rounds, over several seeds.

Section 8 compares every method at 5 rounds, where the width methods and FedDP are far from their
papers' figures; this runs a few of them long enough for their curves to flatten, on section 8's
budget otherwise (benchmarks/methods_table.py: 20 devices, 10 per round, 2 local epochs, SGD lr
0.05, at most 600 samples a device, FedP3's CNN, widths 1 / 0.5 / 0.25 by device for the width
methods). A seed draws the partition, the initial weights and the devices of every round.

    OMP_NUM_THREADS=1 python benchmarks/long_run.py --shard 0/2 &
    OMP_NUM_THREADS=1 python benchmarks/long_run.py --shard 1/2 &
    wait; python benchmarks/long_run.py --report

Each (method, seed) run is a JSON file in --out, skipped when it is there (a stopped grid
resumes). --report prints the table (final accuracies as mean, standard deviation and range over
the seeds, the round where the mean curve first reaches 99% of its final value) and the mean
personalized curve every 10 rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from coordinator.config import load_config
from coordinator.simulation import run_simulation
from methods_table import BASE, SETTINGS, STRATEGIES

METHODS = ("fedavg", "fedp3 (opu2)", "heterofl", "fjord")


def jobs(args: argparse.Namespace) -> list[tuple[str, int, dict]]:
    return [(method, seed, {**BASE, **SETTINGS[args.setting], "strategy": method,
                            **STRATEGIES[method], "rounds": args.rounds, "seed": seed})
            for method in args.methods.split(",") for seed in range(args.seeds)]


def path_of(out: Path, method: str, seed: int) -> Path:
    return out / f"{''.join(c if c.isalnum() else '-' for c in method)}-seed{seed}.json"


def run(args: argparse.Namespace, out: Path) -> None:
    index, count = (int(v) for v in args.shard.split("/"))
    torch.set_num_threads(1)
    for n, (method, seed, options) in enumerate(jobs(args)):
        target = path_of(out, method, seed)
        if n % count != index or target.exists():
            continue
        options = dict(options)
        strategy = options.pop("strategy").split(" ")[0]
        result = run_simulation(load_config(None, [], strategy=strategy, **options),
                                progress=False).to_dict()
        target.write_text(json.dumps({"method": method, "seed": seed, "final": result["final"],
                                      "rounds": [{k: r[k] for k in ("round", "personalized_accuracy",
                                                                    "global_accuracy", "seconds")}
                                                 for r in result["rounds"]]}))
        print(f"{method} seed {seed}: {result['final']['personalized_accuracy']:.4f}", flush=True)


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * sd:.2f} [{100 * min(values):.2f}, {100 * max(values):.2f}]"


def report(args: argparse.Namespace, out: Path) -> None:
    print(f"{args.setting}, {args.rounds} rounds, seeds 0-{args.seeds - 1}; mean ± sd [min, max]\n")
    print("| method | seeds | personalized % | global % | flat by round (personalized) "
          "| s a run |\n|---|---:|---|---|---:|---:|")
    curves = {}
    for method in args.methods.split(","):
        runs = [json.loads(p.read_text()) for seed in range(args.seeds)
                if (p := path_of(out, method, seed)).exists()]
        if not runs:
            continue
        length = min(len(r["rounds"]) for r in runs)
        curve = [statistics.fmean(r["rounds"][i]["personalized_accuracy"] for r in runs)
                 for i in range(length)]
        curves[method] = curve
        flat = next(i + 1 for i, v in enumerate(curve) if v >= 0.99 * curve[-1])
        seconds = statistics.fmean(sum(x["seconds"] for x in r["rounds"]) for r in runs)
        print(f"| {method} | {len(runs)} | {spread([r['final']['personalized_accuracy'] for r in runs])} "
              f"| {spread([r['final']['global_accuracy'] for r in runs])} | {flat} | {seconds:.0f} |")
    marks = list(range(9, max(map(len, curves.values()), default=0), 10))
    if not marks:
        return
    print("\nmean personalized accuracy (%) by round\n")
    print("| method | " + " | ".join(f"r{i + 1}" for i in marks) + " |\n|---|"
          + "---:|" * len(marks))
    for method, curve in curves.items():
        print(f"| {method} | " + " | ".join(f"{100 * curve[i]:.1f}" if i < len(curve) else "-"
                                            for i in marks) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from: {', '.join(STRATEGIES)}")
    parser.add_argument("--setting", default="FMNIST S1", choices=SETTINGS)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--out", default="runs/long")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in STRATEGIES]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(STRATEGIES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (report if args.report else run)(args, out)


if __name__ == "__main__":
    main()
