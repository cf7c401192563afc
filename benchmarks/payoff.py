"""The payoff of per-device sizing, on data that follows the device (issue 26).

Every cell is one simulation: a partition x a policy x a seed. The seed decides the fleet
(`sample_fleet`, catalogue classes but the 512 MB gateways, which hold no model at any width and
would be lost by every policy alike), the partition, the initial weights and the draws, so the
policies of one seed are paired: same devices, same data, same rounds, deadline, model and
training; only the policy differs.

Policies (POLICIES): planned sizing with HeteroFL's nested prefixes, FedRolex's rolling windows
and FjORD's ordered dropout; one width for everyone (uniform: the widest the weakest device holds);
the full model with the devices that cannot hold it left out (full) or sent it anyway (full-all:
out of memory is a lost update); and the local-only floor (each device trains its planned
submodel alone). Each device is scored on its own test split with the model it runs at the end
(`final.devices`: its width of the final global model; a device left out of training runs the
full global model), and each tier is the mean of its devices (`device_profiles.tiers`).

    # resumable: finished cells are skipped; --shard i/n takes every n-th cell, so two shells
    # (or two sessions) share the grid
    OMP_NUM_THREADS=1 python benchmarks/payoff.py run --out runs/payoff --shard 0/2 &
    OMP_NUM_THREADS=1 python benchmarks/payoff.py run --out runs/payoff --shard 1/2
    python benchmarks/payoff.py report --out runs/payoff     # docs/BENCHMARKS.md section 5

`report` prints the tables (markdown) with 95% bootstrap intervals of every paired difference,
and draws `fedprune report`'s figures of each partition into <out>/figures/<partition>/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.report import bootstrap_interval as interval

POLICIES: dict[str, dict[str, str]] = {
    "planned": {"sizing": "planned", "strategy": "heterofl"},
    "planned-fedrolex": {"sizing": "planned", "strategy": "fedrolex"},
    "planned-fjord": {"sizing": "planned", "strategy": "fjord"},
    "uniform": {"sizing": "uniform", "strategy": "heterofl"},
    "full": {"sizing": "full", "strategy": "heterofl"},
    "full-all": {"sizing": "full-all", "strategy": "heterofl"},
    "local": {"sizing": "planned", "strategy": "local"},
}
BASELINES = ("uniform", "full", "full-all")  # what planned sizing must beat
TIERS = ("low", "mid", "high")
MIN_SEEDS = 5  # no claim on fewer paired seeds
FLEET_CLASSES = ("rpi3b", "rpi4-2gb", "rpi4-4gb", "rpi5-8gb", "jetson-nano-4gb", "phone-low",
                 "phone-mid", "phone-high")


def log(message: str) -> None:
    print(f"[payoff {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cells(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    return [(partition, policy, seed) for seed in args.seeds for partition in args.partitions
            for policy in args.policies]


def cell_path(out: Path, partition: str, policy: str, seed: int) -> Path:
    return out / partition.replace(":", "_") / policy / f"seed{seed}.json"


def _folder(args: argparse.Namespace) -> Path:
    """Cells without DP in --out; under DP in --out/eps<E> (a second table, same grid)."""
    return args.out / f"eps{args.epsilon:g}" if args.epsilon else args.out


def overrides(args: argparse.Namespace, partition: str, policy: str, seed: int) -> dict[str, Any]:
    return {"dataset": args.dataset, "model": args.model, "clients": args.devices,
            "partition": partition, "rounds": args.rounds, "fraction": args.fraction,
            "max_client_samples": args.max_client_samples, "deadline_seconds": args.deadline,
            "target_accuracies": args.targets, "seed": seed, "train.lr": args.lr,
            "train.momentum": args.momentum, "train.batch_size": args.batch_size,
            "train.local_epochs": args.local_epochs, **POLICIES[policy],
            **({"dp.target_epsilon": args.epsilon} if args.epsilon else {})}


def run_cell(path: str, settings: dict[str, Any], devices: int, seed: int,
             threads: int) -> tuple[str, float]:
    """One simulation in a worker process; its results JSON written atomically at `path`."""
    import torch

    torch.set_num_threads(threads)
    from coordinator.config import load_config
    from coordinator.simulation import run_simulation
    from device_profiles import sample_fleet

    config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()])
    started = time.perf_counter()
    result = run_simulation(config, progress=False,
                            profiles=sample_fleet(devices, seed, names=list(FLEET_CLASSES)))
    wall = time.perf_counter() - started
    record = {**result.to_dict(), "wall_seconds": wall}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_text(json.dumps(record))
    partial.replace(target)
    return path, wall


def run(args: argparse.Namespace) -> None:
    index, count = args.shard
    todo = [c for i, c in enumerate(cells(args)) if i % count == index
            and not cell_path(_folder(args), *c).exists()]
    log(f"shard {index}/{count}: {len(todo)} cells to run, {args.jobs} at a time")
    context = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {pool.submit(run_cell, str(cell_path(_folder(args), *c)), overrides(args, *c),
                               args.devices, c[2], args.threads): c for c in todo}
        for future in as_completed(futures):
            path, wall = future.result()
            log(f"done {' '.join(map(str, futures[future]))} in {wall:.0f} s "
                f"({time.perf_counter() - started:.0f} s elapsed)")


# --- report ----------------------------------------------------------------------------------


def tier_accuracies(result: dict[str, Any]) -> dict[str, float]:
    """Each tier's accuracy, the worst tier's and the fleet's, as the run scored them."""
    final = result["final"]
    return {**{t: v["accuracy"] for t, v in final["tiers"].items()},
            "worst": final["worst_tier_accuracy"], "fleet": final["fleet_accuracy"]}


def _ci(values: list[float], scale: float = 100.0) -> str:
    mean, low, high = interval(values)
    return f"{scale * mean:.1f} [{scale * low:.1f}, {scale * high:.1f}]"


def load(out: Path, partition: str, policy: str) -> dict[int, dict[str, Any]]:
    folder = out / partition.replace(":", "_") / policy
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(folder.glob("seed*.json"))}


def partition_report(out: Path, partition: str, policies: list[str],
                     target: float) -> list[str]:
    runs = {p: load(out, partition, p) for p in policies}
    runs = {p: r for p, r in runs.items() if r}
    if not runs:
        return []
    scores = {p: {s: tier_accuracies(r) for s, r in by_seed.items()} for p, by_seed in runs.items()}
    lines = [f"### {partition}", "",
             "Accuracy % of the model each device runs, on its own test split: mean over seeds "
             "[95% bootstrap interval]", "",
             "| policy | seeds | low tier | mid tier | high tier | worst tier | fleet mean | "
             "MB up + down | lost updates | simulated s | simulated s to "
             f"{100 * target:g}% (runs reaching it) | widths (low tier) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for policy, by_seed in runs.items():
        s = scores[policy]
        cols = [_ci([s[k].get(t, np.nan) for k in s]) for t in (*TIERS, "worst", "fleet")]
        finals = [r["final"] for r in by_seed.values()]
        mb = np.mean([(f["bytes_up_total"] + f["bytes_down_total"]) / 1e6 for f in finals])
        lost = np.mean([f["updates_lost"] for f in finals])
        sim = np.mean([f.get("simulated_seconds_total") or 0 for f in finals])
        widths = sorted({f"{d['width']:g}" for f in finals for d in f["devices"]
                         if d["tier"] == "low"})
        reached = [t for f in finals if (t := (f.get("simulated_seconds_to_personalized_accuracy")
                                               or {}).get(f"{target:g}")) is not None]
        to_target = f"{np.mean(reached):,.0f} ({len(reached)})" if reached else "never (0)"
        lines.append(f"| {policy} | {len(by_seed)} | " + " | ".join(cols) +
                     f" | {mb:,.0f} | {lost:.1f} | {sim:,.0f} | {to_target} | {', '.join(widths)} |")
    if "planned" in runs:
        lines += ["", "Paired differences, planned minus each policy, points [95% bootstrap "
                  f"interval]; * where the interval excludes zero over at least {MIN_SEEDS} seeds:", "",
                  "| against | low tier | mid tier | high tier | worst tier | fleet mean |",
                  "|---|---:|---:|---:|---:|---:|"]
        for other in runs:
            if other == "planned":
                continue
            seeds = sorted(set(scores["planned"]) & set(scores[other]))
            cells_ = []
            for t in (*TIERS, "worst", "fleet"):
                diffs = [scores["planned"][k][t] - scores[other][k][t] for k in seeds]
                mean, low, high = interval(diffs)
                mark = "*" if len(seeds) >= MIN_SEEDS and (low > 0 or high < 0) else ""
                cells_.append(f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]{mark}")
            lines.append(f"| {other} ({len(seeds)} seeds) | " + " | ".join(cells_) + " |")
        lines += verdict(scores)
    lines += ["", "Personalized accuracy % by round (mean over seeds): the curve that shows "
              "whether the runs have flattened", ""]
    rounds = max(len(r["rounds"]) for by_seed in runs.values() for r in by_seed.values())
    marks = sorted({max(1, rounds * k // 6) for k in range(1, 7)})
    lines += ["| policy | " + " | ".join(f"r{m}" for m in marks) + " |",
              "|---|" + "---:|" * len(marks)]
    for policy, by_seed in runs.items():
        curve = [np.mean([r["rounds"][m - 1]["personalized_accuracy"] for r in by_seed.values()
                          if len(r["rounds"]) >= m]) for m in marks]
        lines.append(f"| {policy} | " + " | ".join(f"{100 * c:.1f}" for c in curve) + " |")
    return lines


def verdict(scores: dict[str, dict[int, dict[str, float]]]) -> list[str]:
    """The aim: planned beats the best baseline on the low tier's own accuracy by >= 3 points
    with the interval above zero, and loses nothing on the high tier."""
    present = [b for b in BASELINES if b in scores]
    if not present:
        return []
    best = max(present, key=lambda b: np.mean([s["low"] for s in scores[b].values()]))
    seeds = sorted(set(scores["planned"]) & set(scores[best]))
    low = interval([scores["planned"][k]["low"] - scores[best][k]["low"] for k in seeds])
    high = interval([scores["planned"][k]["high"] - scores[best][k]["high"] for k in seeds])
    met = len(seeds) >= MIN_SEEDS and low[0] >= 0.03 and low[1] > 0 and high[2] >= 0
    return ["", f"Aim (low tier >= +3 points over the best baseline, {best}, interval above zero "
            f"over >= {MIN_SEEDS} seeds ({len(seeds)} here); "
            f"high tier not worse): low {100 * low[0]:+.1f} [{100 * low[1]:+.1f}, "
            f"{100 * low[2]:+.1f}], high {100 * high[0]:+.1f} [{100 * high[1]:+.1f}, "
            f"{100 * high[2]:+.1f}]: {'met' if met else 'NOT met'}"]


def report(args: argparse.Namespace) -> None:
    print(f"{args.model} on {args.dataset}, {args.devices} devices ({', '.join(FLEET_CLASSES)}), "
          f"{args.rounds} rounds, fraction {args.fraction:g}, deadline {args.deadline:g} simulated "
          f"s, at most {args.max_client_samples} samples per device (70/30), batch "
          f"{args.batch_size}, lr {args.lr:g}, momentum {args.momentum:g}, {args.local_epochs} "
          f"local epoch(s), "
          f"{f'DP-SGD at target epsilon {args.epsilon:g} (split: personal fine-tune)' if args.epsilon else 'no DP'}; seeds {', '.join(map(str, args.seeds))}\n")
    from coordinator.report import report_results

    for partition in args.partitions:
        lines = partition_report(_folder(args), partition, args.policies, args.targets[-1])
        print("\n".join(lines) + "\n")
        runs = [(f"{policy}", r) for policy in args.policies
                for r in load(_folder(args), partition, policy).values()]
        if runs:
            folder = _folder(args) / "figures" / partition.replace(":", "_")
            done = report_results(runs, folder, title=f"payoff on {partition}",
                                  command=" ".join(sys.argv))
            log(f"figures of {partition}: {done.index}")
    walls = [json.loads(p.read_text()).get("wall_seconds", 0)
             for p in _folder(args).glob("*/*/seed*.json")]
    log(f"{len(walls)} cells, {sum(walls):,.0f} s of run time")


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        pair = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 0/2") from None
    if not 0 <= pair[0] < pair[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: I must be in 0..N-1")
    return pair


def _list(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--out", type=Path, required=True, help="one JSON per cell, kept between runs")
    parser.add_argument("--partitions", type=_list(str), default=["tier-classes:0.1", "classes:5"],
                        help="tier-classes:0.1 (data follows the tier); classes:5 is FedP3's S1, "
                             "the control")
    parser.add_argument("--policies", type=_list(str), default=list(POLICIES))
    parser.add_argument("--seeds", type=_list(int), default=[0, 1, 2, 3, 4])
    parser.add_argument("--shard", type=_shard, default=(0, 1))
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="leaf_cnn")
    parser.add_argument("--devices", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--max-client-samples", type=int, default=150)
    parser.add_argument("--deadline", type=float, default=30.0, help="round deadline, simulated s")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--targets", type=_list(float), default=[0.5, 0.6, 0.7])
    parser.add_argument("--epsilon", type=float, default=0.0,
                        help="dp.target_epsilon per device over the run (0: no DP, the primary "
                             "table); its cells go to <out>/eps<E>")
    parser.add_argument("--jobs", type=int, default=1, help="cells in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    args = parser.parse_args()
    unknown = [p for p in args.policies if p not in POLICIES]
    if unknown:
        parser.error(f"unknown policies {unknown}; use {', '.join(POLICIES)}")
    (run if args.command == "run" else report)(args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
