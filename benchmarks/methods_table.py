"""Every strategy on one stated budget: Fashion-MNIST S1 and S2, the FEMNIST sample (natural
split), FFGG vs FedAvg vs local-only as heterogeneity grows, and FFGG under 20% Byzantine devices
with each aggregation rule.

Budget (every run): 20 devices, 10 per round, 5 rounds, 2 local epochs, SGD lr 0.05, batch 48,
at most 600 samples per Fashion-MNIST device (70/30 local split), fedp3_cnn. Width methods use
width levels 1 / 0.5 / 0.25 by device index; FedDP's threshold is the released 1e-3, its gate keeps
half the channels. FEMNIST uses its 31 writers as devices (15 per round).

    OMP_NUM_THREADS=1 python benchmarks/methods_table.py --shard 0/2 &
    OMP_NUM_THREADS=1 python benchmarks/methods_table.py --shard 1/2 &
    wait; python benchmarks/methods_table.py --report

Each run's JSON in --out keeps its label, final figures, rounds, plans and privacy; --report
prints the table and draws `fedprune report`'s figures of each group (a setting's methods, a
partition's heterogeneity runs, the Byzantine rules) into --figures/<group>/ (default
--out/figures).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from coordinator.config import load_config
from coordinator.simulation import run_simulation

STRATEGIES = {
    "fedavg": {}, "fedp3 (opu2)": {"strategy": "fedp3"}, "fedper": {}, "fedrep": {}, "ffgg": {},
    "heterofl": {"width_levels": [1.0, 0.5, 0.25]}, "fedrolex": {"width_levels": [1.0, 0.5, 0.25]},
    "fjord": {"width_levels": [1.0, 0.5, 0.25], "fjord.levels": [1.0, 0.5, 0.25]}, "feddp (threshold)": {"strategy": "feddp"},
    "feddp (gate 0.5)": {"strategy": "feddp", "feddp.variant": "gate"}, "local": {},
}
SETTINGS = {"FMNIST S1": {"partition": "classes:5"}, "FMNIST S2": {"partition": "dirichlet:0.5"},
            "FEMNIST natural": {"dataset": "femnist", "partition": "natural", "clients": 31,
                                "max_client_samples": None, "fraction": 15 / 31}}
BASE = {"dataset": "fashion-mnist", "clients": 20, "fraction": 0.5, "rounds": 5,
        "max_client_samples": 600, "train.local_epochs": 2, "train.lr": 0.05, "seed": 0}


def runs() -> list[tuple[str, str, dict]]:
    jobs = []
    for setting, extra in SETTINGS.items():
        for label, options in STRATEGIES.items():
            jobs.append(("methods", f"{setting} | {label}",
                         {**BASE, "strategy": label, **extra, **options}))
    for partition in ("iid", "dirichlet:1.0", "dirichlet:0.1"):
        for strategy in ("fedavg", "ffgg", "local"):
            jobs.append(("heterogeneity", f"{partition} | {strategy}",
                         {**BASE, "strategy": strategy, "partition": partition}))
    for rule in ("mean", "median", "trimmed_mean", "centered_clip"):
        jobs.append(("byzantine", f"20% sign flip | {rule}",
                     {**BASE, "strategy": "ffgg", "partition": "classes:5", "byzantine.fraction": 0.2,
                      "byzantine.attack": "sign_flip", "aggregator.rule": rule,
                      "aggregator.clip_radius": 0.5}))
    jobs.append(("byzantine", "no attack | mean", {**BASE, "strategy": "ffgg", "partition": "classes:5"}))
    for setting, extra in SETTINGS.items():  # added after the first run; numbered last
        jobs.append(("methods", f"{setting} | hidenseek", {**BASE, "strategy": "hidenseek", **extra}))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--out", default="runs/methods")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--figures", help="fedprune report's figures per group (default: OUT/figures)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = runs()
    if not args.report:
        index, count = (int(v) for v in args.shard.split("/"))
        torch.set_num_threads(1)
        for n, (group, label, options) in enumerate(jobs):
            if n % count != index or (out / f"{n:03d}.json").exists():
                continue
            strategy = options.pop("strategy").split(" ")[0]
            config = load_config(None, [], strategy=strategy, **options)
            result = run_simulation(config, progress=False).to_dict()
            kept = {k: result[k] for k in ("final", "rounds", "clients", "privacy") if k in result}
            (out / f"{n:03d}.json").write_text(json.dumps({"group": group, "label": label, **kept}))
            print(f"{label}: {result['final']['personalized_accuracy']:.4f}", flush=True)
        return
    rows = [json.loads((out / f"{n:03d}.json").read_text()) for n in range(len(jobs))
            if (out / f"{n:03d}.json").exists()]
    groups = ["methods", "heterogeneity", "byzantine"]
    settings = list(SETTINGS)
    rows.sort(key=lambda r: (groups.index(r["group"]),
                             settings.index(r["label"].split(" | ")[0]) if r["group"] == "methods" else 0))
    print("| setting | method | personalized % | global % | MB up | MB down | client s | MFLOPs/sample |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        f = row["final"]
        setting, method = row["label"].split(" | ")
        print(f"| {setting} | {method} | {100 * f['personalized_accuracy']:.2f} | "
              f"{100 * f['global_accuracy']:.2f} | {f['bytes_up_total'] / 1e6:.1f} | "
              f"{f['bytes_down_total'] / 1e6:.1f} | {f['client_seconds_total']:.0f} | "
              f"{f['flops_per_sample_mean'] / 1e6:.2f} |")
    figures(rows, Path(args.figures) if args.figures else out / "figures")


def figures(rows: list[dict], folder: Path) -> None:
    """One `fedprune report` per group of runs drawn together: a setting's methods, one
    partition's heterogeneity runs, the Byzantine rules."""
    from coordinator.report import report_results

    groups: dict[str, list[tuple[str, dict]]] = {}
    for row in rows:
        first, rest = row["label"].split(" | ")
        name = f"{row['group']}: {first}" if row["group"] != "byzantine" else "byzantine"
        groups.setdefault(name, []).append(
            (rest if row["group"] != "byzantine" else row["label"], row))
    for name, runs in groups.items():
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        report = report_results(runs, folder / slug, title=f"methods table, {name}",
                                command="python benchmarks/methods_table.py --report")
        print(f"figures: {report.index}", flush=True)


if __name__ == "__main__":
    main()
