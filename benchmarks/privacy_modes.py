"""The privacy modes side by side on one budget (issue 25): no DP, local DP as before, DP where
it protects, user-level central DP, and secure aggregation with distributed DP.

Every cell is one `fedprune simulate` run that differs from the others only in its privacy
settings and its seed: the same data (Fashion-MNIST S1, `classes:5`), devices, model, rounds,
fraction, local training and delta. The modes:

- none:     no DP;
- local:    record-level DP-SGD on every device, the device keeps its DP-SGD output
            (`dp.personal_model = "dp_trained"`, fedprune before 0.2);
- split:    the same DP-SGD trains what is sent; the personal model is fine-tuned without noise
            from each download (`dp.personal_model = "fine_tuned"`, the default);
- central:  user-level DP-FedAvg at a trusted coordinator (`[central_dp]`);
- secagg:   secure aggregation with distributed discrete Gaussian noise (`[secure_aggregation]`),
            run only when this checkout's configuration has that section;
- alone:    a reference, not a mode: every device trains alone without DP (`strategy = "local"`),
            drawn as often and training as long as in the others; what a personal model reaches
            with nothing from the federation;
- clip:     a reference, not a mode: `split` with a noise multiplier of 0.001, so DP-SGD clips
            each example's gradient and samples batches as in the DP modes but adds almost no
            noise: which part of DP-SGD's loss is the clipping and which the noise.

A cell's epsilon is the mode's target over the run (at delta 1e-5). The cells are ordered by
priority: epsilon 8 for every mode and every seed, then epsilon 1 and 4 on the first seed, then
on the others; a shard takes every n-th cell of that order, so a run cut short leaves the least
important cells undone.

    export FEDPRUNE_DATA=/work/shared/data OMP_NUM_THREADS=1
    python benchmarks/privacy_modes.py --shard 0/2 & python benchmarks/privacy_modes.py --shard 1/2
    python benchmarks/privacy_modes.py --report

A cell whose JSON exists in --out is not run again (--force redoes it). The report reads only the
JSON files: per mode and epsilon, the mean over seeds and their spread (std and min-max) of the
personalized accuracy (each device's own model on its own test split, mean over devices) and the
global accuracy (the global model on the official test set), the largest epsilon spent and by
which accountant, bytes and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from coordinator.config import SimulationSettings, load_config

MODES = ("none", "local", "split", "central", "secagg", "alone", "clip")
NO_DP = ("none", "alone", "clip")  # cells without a target epsilon
LABELS = {"none": "no DP", "local": "local DP as before (DP-SGD, personal = DP-trained)",
          "split": "DP where it protects (DP-SGD sends, personal fine-tuned)",
          "central": "user-level central DP (DP-FedAvg, trusted coordinator)",
          "secagg": "secure aggregation + distributed discrete Gaussian",
          "alone": "reference: each device trains alone, no DP (nothing sent)",
          "clip": "reference: DP-SGD's clipping and sampling, noise multiplier 0.001"}
# What each mode protects, from whom: one line each, printed under the table.
PROTECTS = {
    "none": "nothing: the coordinator sees each device's update in the clear.",
    "local": "each record of a device (record-level), in every update it sends, from the "
             "coordinator, other devices and anyone who sees a global model; the device's own "
             "predictions carry the same noise.",
    "split": "each record of a device (record-level), in every update it sends, from the "
             "coordinator, other devices and anyone who sees a global model; not the device's "
             "own predictions (its personal model is trained without noise and never leaves it).",
    "central": "all of a device's records at once (user-level), in every released global "
               "model, from other devices and anyone who sees a global model; not from the "
               "coordinator, which sees each update in the clear.",
    "secagg": "all of a device's records at once (user-level), in every aggregate, from the "
              "coordinator (it learns only the noised sum), other devices and anyone who sees a "
              "global model, while enough devices of a round stay honest.",
    "clip": "nothing (its epsilon is astronomical): it shows what DP-SGD's per-example clipping "
            "and Poisson sampling cost without the noise.",
    "alone": "everything, by sending nothing; there is no global model (its global accuracy is "
             "the untrained initial model's).",
}
SECTION = "secure_aggregation"


def secagg_available() -> bool:
    """Whether this checkout's simulator takes a [secure_aggregation] section."""
    return SECTION in SimulationSettings.model_fields


def mode_overrides(mode: str, epsilon: float | None, delta: float, per_round: int) -> list[str]:
    """The `--set` overrides that make `mode` at target `epsilon` (None: no DP). Under secure
    aggregation every device of a round holds every coordinate (FedAvg, one width) and the
    simulator drops none, so the noise is split into `per_round` shares (min_holders): a round
    that lost a device would withhold the whole model rather than release it under-noised."""
    if mode == "none":
        return []
    if mode == "alone":
        return ["strategy=local"]
    if mode == "clip":
        return ["dp.noise_multiplier=0.001", f"dp.delta={delta}", 'dp.personal_model="fine_tuned"']
    if mode in ("local", "split"):
        personal = "dp_trained" if mode == "local" else "fine_tuned"
        return [f"dp.target_epsilon={epsilon}", f"dp.delta={delta}",
                f'dp.personal_model="{personal}"']
    if mode == "central":
        return [f"central_dp.target_epsilon={epsilon}", f"central_dp.delta={delta}"]
    return [f"{SECTION}.enabled=true", f"{SECTION}.target_epsilon={epsilon}",
            f"{SECTION}.delta={delta}", f"{SECTION}.min_holders={per_round}"]


def cells(modes: list[str], epsilons: list[float], seeds: list[int],
          first: float) -> list[tuple[str, float | None, int]]:
    """(mode, epsilon, seed) in priority order: `first` epsilon for every mode and seed (no DP
    once a seed), then the others on the first seed, then on the rest."""
    order: list[tuple[str, float | None, int]] = []
    for seed in seeds:
        order += [(m, None if m in NO_DP else first, seed) for m in modes]
    for batch in ([seeds[0]], seeds[1:]):
        for seed in batch:
            order += [(m, e, seed) for e in epsilons if e != first for m in modes if m not in NO_DP]
    return order


def slug(mode: str, epsilon: float | None, seed: int) -> str:
    return f"{mode}_eps{epsilon:g}_seed{seed}" if epsilon is not None else f"{mode}_seed{seed}"


def commit() -> str | None:
    """The checkout's HEAD: other work lands while a long grid runs, and a default it relies on
    may change under it (dp.personal_epochs did)."""
    import subprocess

    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent, check=False)
    return done.stdout.strip() or None


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu": model, "load_at_start": os.getloadavg()[0],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def run_cell(args: argparse.Namespace, mode: str, epsilon: float | None, seed: int,
             path: Path) -> None:
    from coordinator.simulation import run_simulation

    plain = load_config(None, args.base, clients=args.clients, rounds=args.rounds,
                        data_dir=args.data_dir)
    per_round = max(1, round(plain.fraction * plain.clients))
    config = load_config(None, [*args.base, f"seed={seed}",
                                *mode_overrides(mode, epsilon, args.delta, per_round)],
                         clients=args.clients, rounds=args.rounds, data_dir=args.data_dir)
    started, host = time.perf_counter(), machine()
    result = run_simulation(config, progress=False).to_dict()
    result["wall_seconds"] = time.perf_counter() - started
    result["benchmark"] = {"mode": mode, "epsilon": epsilon, "seed": seed, "machine": host,
                           "commit": commit()}
    result.pop("clients", None)
    path.write_text(json.dumps(result))
    print(f"[{time.strftime('%H:%M:%S')}] done {path.stem}: personal "
          f"{result['final']['personalized_accuracy']:.4f} global "
          f"{result['final']['global_accuracy']:.4f} in {result['wall_seconds']:.0f} s",
          file=sys.stderr, flush=True)


def spent(result: dict[str, Any]) -> tuple[float | None, str]:
    """(the largest epsilon spent, by which accountant) of one run."""
    if result.get("privacy"):
        accountants = {p["accountant"] for p in result["privacy"]}
        return (max(p["epsilon"] for p in result["privacy"]),
                f"device {'/'.join(sorted(accountants)).upper()} ledger, record-level, max of the devices")
    central = [r["central_dp"] for r in result["rounds"] if r.get("central_dp")]
    if central:
        return max(c["epsilon"] for c in central), "dp-accounting RDP, q = fraction, user-level"
    secure = [r[SECTION]["epsilon"] for r in result["rounds"]
              if (r.get(SECTION) or {}).get("epsilon") is not None]
    if secure:
        return max(secure), "dp-accounting RDP, effective Gaussian, q = 1, user-level"
    return None, "-"


def spread(values: list[float]) -> str:
    """mean ± std (min-max) in percent; one value alone."""
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.1f}"
    return (f"{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f} "
            f"({min(pct):.1f}-{max(pct):.1f})")


def report(out: Path, order: list[tuple[str, float | None, int]]) -> None:
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for mode, epsilon, seed in order:
        path = out / f"{slug(mode, epsilon, seed)}.json"
        if path.exists():
            groups.setdefault((mode, epsilon), []).append(json.loads(path.read_text()))
    if not groups:
        print("no results yet in", out)
        return
    sample = next(iter(groups.values()))[0]
    config, host = sample["config"], sample["benchmark"]["machine"]
    train = config["train"]
    print(f"{config['clients']} devices, {max(1, round(config['fraction'] * config['clients']))} "
          f"of them a round, "
          f"{config['rounds']} rounds, {config['strategy']}, {config['model']}, "
          f"{config['dataset']} {config['partition']}, max_client_samples "
          f"{config['max_client_samples']}, {train['local_epochs']} local epoch(s), SGD lr "
          f"{train['lr']:g} momentum {train['momentum']:g}, batch {train['batch_size']}; "
          f"{host['nproc']} x {host['cpu']}, OMP_NUM_THREADS={host['omp_num_threads']}")
    print()
    baseline = groups.get(("none", None))
    base = None if baseline is None else (
        statistics.mean(r["final"]["personalized_accuracy"] for r in baseline),
        statistics.mean(r["final"]["global_accuracy"] for r in baseline))
    print("| mode | target eps | seeds | personalized acc % | vs no DP | global acc % | vs no DP "
          "| max eps spent (accountant) | MB up + down / run | s / run |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for (mode, epsilon), runs in sorted(groups.items(), key=lambda kv: (
            MODES.index(kv[0][0]), -(kv[0][1] or 1e9))):
        personal = [r["final"]["personalized_accuracy"] for r in runs]
        global_ = [r["final"]["global_accuracy"] for r in runs]
        eps = [spent(r) for r in runs]
        most = max(e for e, _ in eps) if eps[0][0] is not None else None
        eps_text = "-" if most is None else \
            f"{most:.2f} ({eps[0][1]})" if most < 1000 else f"{most:.1e} ({eps[0][1]})"
        traffic = statistics.mean(r["final"]["bytes_up_total"] + r["final"]["bytes_down_total"]
                                  for r in runs) / 1e6
        seconds = statistics.mean(r["wall_seconds"] for r in runs)
        gaps = ["" if base is None else f"{100 * (statistics.mean(v) - b):+.1f}"
                for v, b in zip((personal, global_), base or (0, 0))]
        print(f"| {LABELS[mode]} | {'-' if epsilon is None else f'{epsilon:g}'} | {len(runs)} | "
              f"{spread(personal)} | {gaps[0]} | {spread(global_)} | {gaps[1]} | {eps_text} | "
              f"{traffic:.1f} | {seconds:.0f} |")
    chance = statistics.mean(r["final"]["chance_accuracy"] for rs in groups.values() for r in rs)
    print()
    print(f"Chance (each device's majority class, mean): {100 * chance:.1f}%. "
          "Spread: mean ± std over seeds (min-max); 'vs no DP': points from the no-DP mean. "
          "Seconds are wall time on shared cores (other jobs ran beside).")
    print()
    for mode in MODES:
        if any(m == mode for m, _ in groups):
            print(f"- {LABELS[mode]}: protects {PROTECTS[mode]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--set", dest="base", action="append", default=None,
                        help="a setting every cell shares, over the budget's (key=value); "
                             "repeatable")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--epsilons", default="8,4,1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--shard", default="0/1", help="i/n: every n-th cell from the i-th")
    parser.add_argument("--report", action="store_true", help="only print the table")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="benchmarks/results/privacy_modes")
    args = parser.parse_args()
    args.base = BASE + (args.base or [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m]
    if "secagg" in modes and not args.report and not secagg_available():
        print("secagg: this checkout's simulator has no [secure_aggregation] section; skipped",
              file=sys.stderr)
        modes.remove("secagg")
    epsilons = [float(e) for e in args.epsilons.split(",")]
    order = cells(modes, epsilons, [int(s) for s in args.seeds.split(",")], epsilons[0])
    if not args.report:
        shard, shards = (int(v) for v in args.shard.split("/"))
        for index, (mode, epsilon, seed) in enumerate(order):
            path = out / f"{slug(mode, epsilon, seed)}.json"
            if index % shards == shard and (args.force or not path.exists()):
                run_cell(args, mode, epsilon, seed, path)
    report(out, order)


# The budget every cell shares (BENCHMARKS.md section 15 says why these numbers).
BASE = ["strategy=fedavg", "dataset=fashion-mnist", 'partition="classes:5"', "model=mlp",
        "fraction=0.2", "max_client_samples=500", "train.local_epochs=2", "train.momentum=0.9",
        # the default when the grid ran; ffc1d24 made it 6 (`--set dp.personal_epochs=6`)
        "dp.personal_epochs=3"]


if __name__ == "__main__":
    main()
