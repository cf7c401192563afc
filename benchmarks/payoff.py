"""The payoff: per-device sizing vs one width for everyone vs the full model, on one fleet.

Every run of a dataset uses the same devices (one seeded catalogue fleet), the same data, rounds,
round deadline, model, strategy and DP-SGD settings; only the run's `sizing` differs
(coordinator/planning/fleet.py):

- planned:  each device's own plan (width, physical batch, transfer, local samples);
- uniform:  one width for everyone, the widest the weakest participating device can hold;
- full:     the full model; devices that cannot hold it or would miss the deadline are left out;
- full-all: the full model sent to everyone; out of memory and missed deadlines are lost updates.

The fleet is sampled once (`sample_fleet(devices, seed)`) and handed to every run as its
profiles; a dataset with fewer natural writers than devices (the FEMNIST LEAF sample has 31)
gets the first N devices of the same fleet. Each profile's training throughput is of the
catalogue's reference model (FedP3's CNN); the planner and the simulated clock scale it to the
run's model by forward MACs.

    OMP_NUM_THREADS=1 python benchmarks/payoff.py --json-out runs/payoff.json   # BENCHMARKS.md section 5

Markdown tables go to stdout, progress to stderr, every run's full results JSON to --json-out,
and `fedprune report`'s figures of each dataset's runs to --figures/<dataset>/ (default: beside
--json-out, in <name>-figures/).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

POLICIES = ("planned", "uniform", "full", "full-all")
DATASETS = {"fmnist": "fashion-mnist", "fashion-mnist": "fashion-mnist", "femnist": "femnist",
            "mnist": "mnist"}


def log(message: str) -> None:
    print(f"[payoff {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fleet_profiles(devices: int, seed: int) -> list:
    """The benchmark's fleet: `devices` catalogue devices drawn with `seed`. Each profile's
    throughput is of its reference model; the planner and the clock scale it to the run's model
    by forward MACs (`planner.training_rate`)."""
    from device_profiles import sample_fleet

    return sample_fleet(devices, seed)


def run_one(key: tuple[str, str], overrides: dict[str, Any], profiles: list,
            threads: int) -> tuple[tuple[str, str], dict[str, Any], float]:
    """One simulation in a worker process; returns its results JSON and wall seconds."""
    import torch

    torch.set_num_threads(threads)
    from coordinator.config import load_config
    from coordinator.simulation import run_simulation

    config = load_config(None, [f"{k}={_toml(v)}" for k, v in overrides.items()])
    started = time.perf_counter()
    result = run_simulation(config, progress=False, profiles=profiles).to_dict()
    return key, result, time.perf_counter() - started


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers the tables print, from one results JSON."""
    rounds, final = result["rounds"], result["final"]
    clients = result.get("clients") or []
    widths = Counter(c["plan"]["width_ratio"] for c in clients if c["selected"])
    outcomes = Counter(d["outcome"] for r in rounds for d in r["devices"])
    return {
        "personalized": final["personalized_accuracy"],
        "global_device": final["global_device_accuracy"],
        "global": final["global_accuracy"],
        "chance": final["chance_accuracy"],
        "best_personalized": max(r["personalized_accuracy"] for r in rounds),
        "best_global": max(r["global_accuracy"] for r in rounds),
        "contributing_mean": sum(r["participants"] for r in rounds) / len(rounds),
        "sent_mean": sum(len(r["devices"]) for r in rounds) / len(rounds),
        "left_out_mean": sum(r["left_out"] for r in rounds) / len(rounds),
        "aggregated": final["updates_aggregated"],
        "straggled": sum(r["straggled"] for r in rounds),
        "out_of_memory": sum(r["out_of_memory"] for r in rounds),
        "lost": final["updates_lost"],
        "refused": sum(r["refused"] for r in rounds),
        "bytes_up": final["bytes_up_total"],
        "bytes_down": final["bytes_down_total"],
        "simulated_seconds": final.get("simulated_seconds_total"),
        "to_personalized": final.get("simulated_seconds_to_personalized_accuracy", {}),
        "to_global": final.get("simulated_seconds_to_global_accuracy", {}),
        "widths": dict(sorted(widths.items(), reverse=True)),
        "selected": sum(c["selected"] for c in clients),
        "plans_fit": sum(c["plan"]["fits"] for c in clients if c["selected"]),
        "outcomes": dict(outcomes),
        "max_epsilon": max((p["epsilon"] for p in result.get("privacy") or []), default=None),
        "flops_per_sample_mean": final.get("flops_per_sample_mean"),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _sec(x: float | None) -> str:
    return "never" if x is None else f"{x:,.0f}"


def _mb(x: int) -> str:
    return f"{x / 1e6:,.1f}"


def _widths(widths: dict) -> str:
    return ", ".join(f"{w:g}: {n}" for w, n in widths.items()) or "-"


def tables(dataset: str, runs: dict[str, dict[str, Any]], targets: list[float]) -> str:
    rows = {p: summarize(r) for p, r in runs.items()}
    first = next(iter(runs.values()))
    lines = [f"### {dataset}", ""]
    lines += ["| sizing | personalized % | global on device splits % | global on test set % | "
              "chance % | devices contributing / round | sent / round | left out / round | "
              "lost (straggled + OOM) | MB up | MB down | simulated s | widths (selected devices) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for policy, s in rows.items():
        lines.append(
            f"| {policy} | {_pct(s['personalized'])} | {_pct(s['global_device'])} | "
            f"{_pct(s['global'])} | {_pct(s['chance'])} | {s['contributing_mean']:.1f} | "
            f"{s['sent_mean']:.1f} | {s['left_out_mean']:.1f} | "
            f"{s['lost']} ({s['straggled']} + {s['out_of_memory']}) | {_mb(s['bytes_up'])} | "
            f"{_mb(s['bytes_down'])} | {_sec(s['simulated_seconds'])} | {_widths(s['widths'])} |")
    lines += ["", "Simulated seconds until the accuracy first reaches each target "
              "(personalized / global on the test set; never: not within the run):", ""]
    lines.append("| sizing | " + " | ".join(f"{100 * t:g}%" for t in targets) + " |")
    lines.append("|---|" + "---:|" * len(targets))
    for policy, s in rows.items():
        cells = [f"{_sec(s['to_personalized'].get(f'{t:g}'))} / {_sec(s['to_global'].get(f'{t:g}'))}"
                 for t in targets]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    # Per device class: what each policy gave it and what became of its tasks.
    lines += ["", "Per device class: width given (count of devices), and task outcomes over the run "
              "(a accepted, s straggled, m out of memory; left-out devices are sent nothing):", ""]
    lines.append("| device class | devices | available MB | " + " | ".join(rows) + " |")
    lines.append("|---|---:|---:|" + "---|" * len(rows))
    classes: dict[str, list[dict]] = defaultdict(list)
    for c in first.get("clients") or []:
        classes[c["device"].split("#")[0]].append(c)
    for cls, members in sorted(classes.items()):
        ids = {c["client"] for c in members}
        cells = []
        for policy, result in runs.items():
            given = Counter((f"{c['plan']['width_ratio']:g}" if c["selected"] else "out")
                            for c in result["clients"] if c["client"] in ids)
            done = Counter(d["outcome"] for r in result["rounds"] for d in r["devices"]
                           if d["client"] in ids)
            cells.append(", ".join(f"{w} x{n}" for w, n in sorted(given.items())) +
                         f"; a{done.get('accepted', 0)} s{done.get('straggled', 0)} "
                         f"m{done.get('out_of_memory', 0)}")
        mem = members[0]["memory_available_bytes"] / 1e6
        lines.append(f"| {cls} | {len(members)} | {mem:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(dataset: str, runs: dict[str, dict[str, Any]]) -> str:
    rows = {p: summarize(r) for p, r in runs.items()}
    if "planned" not in rows or len(rows) < 2:
        return ""
    planned = rows["planned"]
    others = {p: s for p, s in rows.items() if p != "planned"}
    best = max(others, key=lambda p: others[p]["personalized"])
    gap = 100 * (planned["personalized"] - others[best]["personalized"])
    best_g = max(others, key=lambda p: others[p]["global"])
    gap_g = 100 * (planned["global"] - others[best_g]["global"])
    clean = planned["lost"] == 0
    return (f"{dataset}: planned personalized {_pct(planned['personalized'])}% vs best baseline "
            f"{best} {_pct(others[best]['personalized'])}% ({gap:+.2f} points); global "
            f"{_pct(planned['global'])}% vs {best_g} {_pct(others[best_g]['global'])}% "
            f"({gap_g:+.2f}); planned lost updates: {planned['lost']} "
            f"({planned['straggled']} straggled, {planned['out_of_memory']} out of memory); "
            f"aim (>= +3 points personalized, nothing lost) "
            f"{'met' if gap >= 3 and clean else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="fmnist,femnist",
                        help="comma list of fmnist, femnist, mnist")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--devices", type=int, default=40, help="fleet size (catalogue devices)")
    parser.add_argument("--fleet-seed", type=int, default=0)
    parser.add_argument("--femnist-devices", type=int, default=31,
                        help="FEMNIST devices: the first N of the fleet (natural partition: at most "
                             "the LEAF sample's 31 writers)")
    parser.add_argument("--partition", default="classes:5", help="Fashion-MNIST/MNIST partition")
    parser.add_argument("--model", default="leaf_cnn")
    parser.add_argument("--strategy", default="heterofl")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--max-client-samples", type=int, default=200)
    parser.add_argument("--deadline", type=float, default=30.0, help="round deadline, simulated s")
    parser.add_argument("--epsilon", type=float, default=8.0, help="dp.target_epsilon (0: no DP)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--targets", default="0.3,0.4,0.5,0.6",
                        help="accuracies whose simulated time-to-reach is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--json-out", required=True, help="write every run's results JSON here")
    parser.add_argument("--figures", help="fedprune report's PNGs and index.html per dataset, in "
                        "DIR/<dataset>/ (default: <json-out without .json>-figures)")
    args = parser.parse_args()

    targets = [float(t) for t in args.targets.split(",") if t]
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES:
            parser.error(f"unknown policy {p!r}; use {', '.join(POLICIES)}")
    fleet = fleet_profiles(args.devices, args.fleet_seed)
    common: dict[str, Any] = {
        "model": args.model, "strategy": args.strategy, "rounds": args.rounds,
        "fraction": args.fraction, "max_client_samples": args.max_client_samples,
        "deadline_seconds": args.deadline, "fleet": f"catalogue:{args.fleet_seed}",
        "target_accuracies": targets, "seed": args.seed,
        "train.lr": args.lr, "train.momentum": args.momentum, "train.batch_size": args.batch_size,
        "train.local_epochs": args.local_epochs,
    }
    if args.epsilon > 0:
        common["dp.target_epsilon"] = args.epsilon
        common["dp.max_grad_norm"] = args.max_grad_norm
    jobs = []
    for name in datasets:
        dataset = DATASETS[name]
        n = min(args.femnist_devices, args.devices) if dataset == "femnist" else args.devices
        partition = "natural" if dataset == "femnist" else args.partition
        for policy in policies:
            overrides = {**common, "dataset": dataset, "clients": n, "partition": partition,
                         "sizing": policy}
            jobs.append(((name, policy), overrides, fleet[:n]))
    log(f"{len(jobs)} runs, {args.jobs} at a time, {args.threads} torch thread(s) each; fleet "
        f"catalogue:{args.fleet_seed} x {args.devices}: "
        + ", ".join(f"{c} {n}" for c, n in sorted(Counter(p.name.split('#')[0] for p in fleet).items())))
    started = time.perf_counter()
    results: dict[tuple[str, str], dict[str, Any]] = {}
    walls: dict[tuple[str, str], float] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = [pool.submit(run_one, key, overrides, profiles, args.threads)
                   for key, overrides, profiles in jobs]
        for future in as_completed(futures):
            key, result, wall = future.result()
            results[key], walls[key] = result, wall
            s = summarize(result)
            log(f"done {key[0]} {key[1]} in {wall:.0f} s: personalized {_pct(s['personalized'])}%, "
                f"global {_pct(s['global'])}%, contributing {s['contributing_mean']:.1f}/round, "
                f"lost {s['lost']} ({time.perf_counter() - started:.0f} s elapsed)")
    total = time.perf_counter() - started
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(sys.argv), "args": vars(args), "wall_seconds_total": total,
        "fleet": [p.model_dump(mode="json") for p in fleet],
        "runs": [{"dataset": k[0], "sizing": k[1], "wall_seconds": walls[k],
                  "summary": summarize(results[k]), "result": results[k]}
                 for k in sorted(results, key=lambda k: (datasets.index(k[0]), policies.index(k[1])))],
    }, indent=1))

    dp = f"DP-SGD target epsilon {args.epsilon:g} (delta 1e-5, clip {args.max_grad_norm:g})" \
        if args.epsilon > 0 else "no DP"
    print(f"{args.model}, {args.strategy}, {args.rounds} rounds, fraction {args.fraction:g}, "
          f"deadline {args.deadline:g} simulated s, at most {args.max_client_samples} samples per "
          f"device (70/30 train/test), batch {args.batch_size}, lr {args.lr:g}, momentum "
          f"{args.momentum:g}, {args.local_epochs} local epoch(s), {dp}; fleet "
          f"catalogue:{args.fleet_seed} ({args.devices} devices); "
          f"wall {total:.0f} s\n")
    for name in datasets:
        runs = {p: results[(name, p)] for p in policies if (name, p) in results}
        print(tables(f"{DATASETS[name]} ({'natural' if DATASETS[name] == 'femnist' else args.partition}, "
                     f"{len(next(iter(runs.values()))['clients'])} devices)", runs, targets))
        print()
    for name in datasets:
        runs = {p: results[(name, p)] for p in policies if (name, p) in results}
        text = verdict(DATASETS[name], runs)
        if text:
            print("- " + text)
    from coordinator.report import report_results

    figures = Path(args.figures) if args.figures else out.with_name(f"{out.stem}-figures")
    for name in datasets:
        runs = [(p, results[(name, p)]) for p in policies if (name, p) in results]
        if runs:
            report = report_results(runs, figures / name, title=f"payoff: sizing policies on "
                                    f"{DATASETS[name]}", command=" ".join(sys.argv))
            log(f"figures of {name}: {report.index}")
    log(f"all runs done in {total:.0f} s; JSON at {out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
