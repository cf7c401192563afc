"""FedP3's Fashion-MNIST comparison at a reduced budget that fits a 2-core machine.

Runs FedAvg vs FedP3 LowerB / OPU2 / OPU3 on S1 (classes:5) and S2 (dirichlet:0.5), FedP3's
global keep ratio sweep, and DP-FedP3 at three target epsilons, all at the same budget
(clients, rounds, local epochs, lr, batch), and prints a markdown table with the paper's figures
beside ours. Each run's JSON lands in --out.

    OMP_NUM_THREADS=1 python benchmarks/fedp3_fmnist.py --shard 0/2 &
    OMP_NUM_THREADS=1 python benchmarks/fedp3_fmnist.py --shard 1/2; wait
    python benchmarks/fedp3_fmnist.py --report

Runs whose JSON already exists in --out are not repeated (pass --force to redo them); the table is
always printed from the JSON files, so shards can run in parallel, one core each, and with it
`fedprune report`'s figures of each group (S1, S2, global keep, DP) go to --figures/<group>/
(default --out/figures).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from coordinator.config import load_config
from coordinator.simulation import run_simulation

# Paper (FedP3, 100 clients, 500 rounds x 10 local epochs), personalized accuracy %.
PAPER = {
    ("fedavg", "classes:5"): 89.91, ("fedavg", "dirichlet:0.5"): 87.86,
    ("lowerb", "classes:5"): 83.25, ("lowerb", "dirichlet:0.5"): 84.75,
    ("opu2", "classes:5"): 85.29, ("opu2", "dirichlet:0.5"): 85.01,
    ("opu3", "classes:5"): 88.73, ("opu3", "dirichlet:0.5"): 85.59,
}
PAPER_KEEP = {1.0: 89.91, 0.9: 81.75, 0.7: 78.44, 0.5: 64.96}


def experiments(eps_values: list[float]) -> list[tuple[str, str, list[str]]]:
    runs = []
    for partition in ("classes:5", "dirichlet:0.5"):
        runs.append(("fedavg", partition, []))
        for selection in ("lowerb", "opu2", "opu3"):
            runs.append(("fedp3", partition, [f"fedp3.selection={selection}"]))
    for keep in (0.9, 0.7, 0.5):  # keep 1.0 is the OPU2/S1 run above
        runs.append(("fedp3", "classes:5", ["fedp3.selection=opu2", f"fedp3.global_keep={keep}"]))
    for eps in eps_values:
        runs.append(("fedp3", "classes:5", ["fedp3.selection=opu2", f"dp.target_epsilon={eps}",
                                            "dp.delta=1e-5"]))
    return runs


def label(strategy: str, overrides: list[str]) -> str:
    if strategy == "fedavg":
        return "FedAvg"
    parts = dict(o.split("=", 1) for o in overrides)
    name = "FedP3-" + parts["fedp3.selection"].upper().replace("LOWERB", "LowerB")
    if "fedp3.global_keep" in parts:
        name += f" keep {parts['fedp3.global_keep']}"
    if "dp.target_epsilon" in parts:
        name = "DP-" + name + f" eps={parts['dp.target_epsilon']}"
    return name


def paper_figure(strategy: str, partition: str, overrides: list[str]) -> str:
    parts = dict(o.split("=", 1) for o in overrides)
    if "dp.target_epsilon" in parts:
        return "n/a"
    if "fedp3.global_keep" in parts:
        return f"{PAPER_KEEP[float(parts['fedp3.global_keep'])]:.2f}"
    key = "fedavg" if strategy == "fedavg" else parts["fedp3.selection"]
    return f"{PAPER[(key, partition)]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th experiment from i")
    parser.add_argument("--report", action="store_true", help="only print the table")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--only", help="run only labels containing this text")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="runs/fedp3_fmnist")
    parser.add_argument("--figures", help="fedprune report's figures per group (default: OUT/figures)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shard, shards = (int(v) for v in args.shard.split("/"))
    rows = []
    for index, (strategy, partition, overrides) in enumerate(
            experiments([float(e) for e in args.epsilons.split(",")])):
        name = label(strategy, overrides)
        if args.only and args.only not in name:
            continue
        slug = f"{name}_{partition}".replace(" ", "_").replace(":", "").replace("=", "")
        path = out / f"{slug}.json"
        if not args.report and index % shards == shard and (args.force or not path.exists()):
            config = load_config(
                None, overrides, strategy=strategy, partition=partition, clients=args.clients,
                rounds=args.rounds, data_dir=args.data_dir,
                **{"train.local_epochs": args.local_epochs, "train.lr": args.lr,
                   "train.momentum": args.momentum})
            started = time.perf_counter()
            result = run_simulation(config, progress=False).to_dict()
            result["wall_seconds"] = time.perf_counter() - started
            path.write_text(json.dumps(result, indent=2))
            print(f"done {name} {partition} in {result['wall_seconds']:.0f}s", flush=True)
        if path.exists():
            rows.append((name, partition, json.loads(path.read_text()),
                         paper_figure(strategy, partition, overrides)))
    print()
    print(f"{args.clients} clients, {args.rounds} rounds x {args.local_epochs} local epochs, SGD lr "
          f"{args.lr} momentum {args.momentum}, batch 48, full participation, Fashion-MNIST, FedP3 CNN")
    print("| method | partition | personalized acc % | global acc % | paper % (500 rounds x 10 ep) "
          "| bytes up | bytes down | max eps (delta=1e-5) | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, partition, result, paper in rows:
        final = result["final"]
        eps = (f"{max(p['epsilon'] for p in result['privacy']):.2f}" if "privacy" in result else "-")
        print(f"| {name} | {partition} | {100 * final['personalized_accuracy']:.2f} | "
              f"{100 * final['global_accuracy']:.2f} | {paper} | {final['bytes_up_total']:,} | "
              f"{final['bytes_down_total']:,} | {eps} | {result.get('wall_seconds', 0):.0f} |")
    figures(rows, Path(args.figures) if args.figures else out / "figures")


def figures(rows: list[tuple[str, str, dict, str]], folder: Path) -> None:
    """`fedprune report` per group drawn together: the methods on S1 and on S2, FedP3-OPU2's
    global keep sweep, DP-FedP3 at each epsilon (both beside OPU2 on S1 without them)."""
    from coordinator.report import report_results

    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, partition, result, _ in rows:
        plain = "keep" not in name and "eps=" not in name
        if plain:
            groups.setdefault(partition.replace(":", ""), []).append((name, result))
        if name == "FedP3-OPU2" and partition == "classes:5" or not plain:
            group = "dp" if "eps=" in name else "global-keep"
            targets = [group] if not plain else ["global-keep", "dp"]
            for target in targets:
                groups.setdefault(target, []).append((name, result))
    for group, runs in groups.items():
        report = report_results(runs, folder / group, title=f"FedP3 on Fashion-MNIST: {group}",
                                command="python benchmarks/fedp3_fmnist.py --report")
        print(f"figures: {report.index}", flush=True)


if __name__ == "__main__":
    main()
