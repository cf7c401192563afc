"""Calibrate the planner's memory model against measured rehearsal peaks: an upper bound.

Runs `fedprune-edge rehearse` as a fresh child for a grid of (model, width ratio, physical batch)
(DP-SGD, ghost clipping, a Fashion-MNIST shard of 96-192 samples) and reads each child's peak
RSS from the kernel (its VmHWM). Peaks of the same configuration vary from one fresh process to
the next (by up to 17% on LEAF's CNN), so the points in REPEATED are rehearsed `--repeats` times,
each in a fresh process, the others once (ResNet-18 at full width takes minutes per rehearsal on
two shared cores).

The fit has two steps. (1) The central fit: the coefficients of coordinator/planning/memory.py,
least squares on the relative error of each point's median peak. (2) The margin that makes the
prediction an upper bound: the smallest `margin_bytes + margin_fraction x (fit - baseline)`
(a linear program) under which no measured peak of any point exceeds the prediction, rounded up
to a whole MB. With 20 rehearsals of a point, a 21st exceeds their maximum with probability 1/21
at most (exchangeable draws), within issue 22's "at most 1 in 20". The points in OFF_GRID (a
real plan's width and local samples, off the grid) are rehearsed as often and are in the margin
but not in the central fit. Also printed: how often the second half of the repetitions exceeds
a margin fitted on the first half only (an out-of-sample check of the margin), and the central fit's
leave-one-model-out and leave-one-point-out errors (the former three-term formula's too, for
comparison). Writes memory_calibration.json, with the command, the machine, the date and every
measured peak.

    python benchmarks/calibrate_memory.py --threads 2 --repeats 20 --save /tmp/calib_points.json

`--save FILE` keeps the raw measurements as they come (a rerun with the same file skips the
rehearsals it already holds); `--load FILE` refits them without rehearsing.

`--check` does not refit: it holds fresh rehearsals of the same points against the stored
coefficients (does the shipped calibration still hold for the built-in networks?) and, if no more
than 1 in 20 exceeds its prediction, stores the highest floor they measured (`floor_bytes`: the
process with Fashion-MNIST loaded, before any model), which a model's own calibration stands on.

`--model NAME` (repeatable; a built-in or a package.module:function) runs the per-model
calibration the planner runs on first use (coordinator/planning/model_memory.py: six fresh
rehearsals on random inputs), then `--verify-repeats` fresh real rehearsals (Fashion-MNIST,
`fedprune-edge rehearse`) of each of VERIFY's plans, and prints each one's measured/predicted:

`--own-margin DRAWS` fits the margin a model's own calibration gets (own_margin_bytes and
own_margin_fraction): DRAWS own calibrations of each built-in, the smallest margin under which
all of them bound every real rehearsal in the measurements, with leave-one-model-out.

    python benchmarks/calibrate_memory.py --check --load /tmp/calib_points.json
    python benchmarks/calibrate_memory.py --load /tmp/calib_points.json --own-margin 3
    python benchmarks/calibrate_memory.py --model mypkg.nets:mobilenet --verify-repeats 20 --models-only
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import least_squares, linprog, nnls

from coordinator.planning.memory import (
    CALIBRATION_FILE,
    MemoryCoefficients,
    footprint,
    memory_features,
    predict_peak_bytes,
)
from coordinator.planning.verify import measure_rehearsal
from edge_sdk.sizing import DevicePlan
from edge_sdk.models import ModelSpec, model_spec, structure
from edge_sdk.slicing import width_spec

# (model, widths, physical batches, local samples). The planner's physical batches are 48, 24, 12
# and 8; 192 on the small CNNs stretches the activation term. ResNet-18 stops at 48 (1.9 GB) and
# trains 96 samples, not 192: a DP epoch of it takes minutes on two shared cores, and the data
# term (4 B x 784 x samples) is 0.3 MB either way.
GRID: tuple[tuple[str, tuple[float, ...], tuple[int, ...], int], ...] = (
    ("fedp3_cnn", (1.0, 0.5, 0.25), (8, 48, 192), 192),
    ("leaf_cnn", (1.0, 0.5, 0.25), (8, 48, 192), 192),
    ("resnet18", (1.0, 0.5, 0.25, 0.125), (8, 24, 48), 96),
)
# (model, width, physical batch) rehearsed --repeats times, chosen so that 20 repetitions take
# under an hour on two shared cores: every regime of every model at least once (LEAF's
# step-dominated full width, its batch-dominated half width; ResNet-18's per-sample conv
# gradients). The others are rehearsed once: ResNet-18 at full width or at physical batch 8
# takes 1-2.5 minutes per rehearsal there, and FedP3's CNN varies by under 4%.
REPEATED: tuple[tuple[str, float, int], ...] = (
    ("fedp3_cnn", 1.0, 8),
    ("leaf_cnn", 1.0, 8), ("leaf_cnn", 1.0, 48), ("leaf_cnn", 0.5, 48), ("leaf_cnn", 0.5, 192),
    ("resnet18", 0.5, 24), ("resnet18", 0.25, 48),
)
# (model, width, physical batch, local samples) off the grid, rehearsed --repeats times, in the
# margin but not in the central fit: the plan of issue 22 (LEAF's CNN for a device with 600 MB
# available: width 0.375, physical batch 48, the planner's 420 samples; it peaked at 544 MB
# against a 540 MB limit). Its median is 3% over the central fit: nine logical batches, where
# the grid's CNN points train four (192 samples).
OFF_GRID: tuple[tuple[str, float, int, int], ...] = (("leaf_cnn", 0.375, 48, 420),)
INPUT_SHAPE, CLASSES = (1, 28, 28), 10  # Fashion-MNIST, the dataset every rehearsal loads
# (width, physical batch, local samples) of the real rehearsals that check a model's own
# calibration (--model): the planner's corners and a middle, 96 samples (two logical batches of
# 48: a rehearsal peaks in its first ones, and the data term is 0.3 MB either way).
VERIFY: tuple[tuple[float, int, int], ...] = ((1.0, 48, 96), (1.0, 8, 96), (0.625, 24, 96),
                                              (0.25, 48, 96))
EXCEEDANCE_AIM = 1 / 20


@dataclass(frozen=True)
class Point:
    model: str
    width: float
    physical: int
    samples: int
    peak: int
    repeat: int = 0
    floor: int = 0  # the child's resident memory with its data loaded, before the model is built

    @property
    def spec(self) -> ModelSpec:
        return width_spec(model_spec(self.model, INPUT_SHAPE, CLASSES), self.width)

    @property
    def config(self) -> tuple[str, float, int, int]:
        return self.model, self.width, self.physical, self.samples


def rehearsal_plan(model: str, width: float, physical: int, samples: int) -> DevicePlan:
    spec = width_spec(model_spec(model, INPUT_SHAPE, CLASSES), width)
    return DevicePlan(device_id=f"calibration-{model}-w{width}-b{physical}", model=model,
                      width_ratio=width, batch_size=max(physical, 48), physical_batch_size=physical,
                      local_steps=0, local_samples=samples, parameters=footprint(spec).parameters,
                      predicted_peak_bytes=0, memory_limit_bytes=0, download_bytes=0, upload_bytes=0,
                      transfer_seconds=0, compute_seconds=0, deadline_seconds=1, fits=True)


# --------------------------------------------------------------------------- formulas


def as_coefficients(x: Sequence[float], source: str = "fit") -> MemoryCoefficients:
    baseline, step, backward, activation, per_sample, retained = (float(v) for v in x)
    return MemoryCoefficients(baseline, step, activation, source=source,
                              per_sample_gradient_factor=per_sample,
                              backward_bytes_per_parameter=backward, retained_fraction=retained)


# An under-prediction is what lets a plan overrun its device, an over-prediction only wastes some
# of it: under-predictions weigh this much more in the fit (a soft upper envelope).
UNDER_WEIGHT = 3.0


def current_fit(points: Sequence[Point]) -> np.ndarray:
    """memory.py's two-phase formula, least squares on the relative error (under-predictions
    weighted UNDER_WEIGHT), coefficients >= 0 and the retained fraction in [0, 1].

    The max() makes it piecewise linear, so a few starting points are tried and the best kept.
    """
    def residuals(x: np.ndarray) -> np.ndarray:
        c = as_coefficients(x)
        r = np.array([(predict_peak_bytes(p.spec, p.physical, p.samples, c) - p.peak) / p.peak
                      for p in points])
        return np.where(r < 0, UNDER_WEIGHT * r, r)

    best = None
    upper = [np.inf] * 5 + [1.0]
    for start in ([460e6, 45, 16, 4, 2, 0.2], [460e6, 30, 8, 3, 1, 0.5], [480e6, 50, 24, 5, 3, 0.1]):
        result = least_squares(residuals, start, bounds=([0] * 6, upper),
                               x_scale=[1e8, 10, 10, 1, 1, 0.1])
        if best is None or result.cost < best.cost:
            best = result
    return best.x


def current_predict(x: np.ndarray, p: Point) -> float:
    return float(predict_peak_bytes(p.spec, p.physical, p.samples, as_coefficients(x)))


def former_columns(p: Point) -> list[float]:
    """The three-term formula calibrated on fedp3_cnn alone until 2026-12: forward-hook elements."""
    fp = footprint(p.spec)
    return [1.0, fp.parameters, 4.0 * fp.activation_elements * p.physical]


def data_bytes(p: Point) -> float:
    return 4.0 * memory_features(p.spec).input_elements * p.samples


def former_fit(points: Sequence[Point]) -> np.ndarray:
    design = np.array([former_columns(p) for p in points])
    target = np.array([p.peak - data_bytes(p) for p in points])
    scale = np.abs(design).max(axis=0)  # conditioning: bytes vs parameters vs batch x bytes
    solution, _ = nnls(design / scale, target)
    return solution / scale


def former_predict(coef: np.ndarray, p: Point) -> float:
    return float(np.dot(coef, former_columns(p)) + data_bytes(p))


FORMULAS = {"current": (current_fit, current_predict), "former": (former_fit, former_predict)}


def out_of_sample(points: Sequence[Point], formula: str) -> tuple[list[float], list[float]]:
    """Per point: (prediction of a fit without its model, prediction of a fit without it)."""
    fit, predict = FORMULAS[formula]
    models = {m: fit([q for q in points if q.model != m]) for m in {p.model for p in points}}
    by_model = [predict(models[p.model], p) for p in points]
    by_point = [predict(fit([q for j, q in enumerate(points) if j != i]), p)
                for i, p in enumerate(points)]
    return by_model, by_point


def error(predicted: float, measured: float) -> float:
    return 100.0 * (predicted - measured) / measured


def summary(points: Sequence[Point], formula: str, label: str) -> dict[str, dict[str, float]]:
    fit, predict = FORMULAS[formula]
    coef = fit(points)
    by_model, by_point = out_of_sample(points, formula)
    result: dict[str, dict[str, float]] = {}
    print(f"\n{label}: per-model |error| (max / median, %)")
    print("| model | in-sample max | in-sample median | leave-one-model-out max | "
          "leave-one-model-out median | leave-one-point-out max |")
    print("|---|---:|---:|---:|---:|---:|")
    for model in dict.fromkeys(p.model for p in points):
        idx = [i for i, p in enumerate(points) if p.model == model]
        ins = [abs(error(predict(coef, points[i]), points[i].peak)) for i in idx]
        lomo = [abs(error(by_model[i], points[i].peak)) for i in idx]
        loo = [abs(error(by_point[i], points[i].peak)) for i in idx]
        result[model] = {"in_max": max(ins), "lomo_max": max(lomo), "lomo_median": statistics.median(lomo),
                         "loo_max": max(loo)}
        print(f"| {model} | {max(ins):.1f} | {statistics.median(ins):.1f} | {max(lomo):.1f} | "
              f"{statistics.median(lomo):.1f} | {max(loo):.1f} |")
    return result


# --------------------------------------------------------------------------- the margin


def central_peaks(points: Sequence[Point], coefficients: MemoryCoefficients) -> np.ndarray:
    return np.array([predict_peak_bytes(p.spec, p.physical, p.samples, coefficients) for p in points],
                    dtype=float)


def fit_margin(points: Sequence[Point], coefficients: MemoryCoefficients) -> tuple[float, float]:
    """The smallest (margin_bytes, margin_fraction) under which no measured peak exceeds
    `fit + margin_bytes + margin_fraction x (fit - baseline)`: a linear program minimising the
    margin summed over the configurations, each relative to its median peak."""
    central = central_peaks(points, coefficients)
    above = central - coefficients.baseline_bytes
    peaks = np.array([p.peak for p in points], dtype=float)
    typical = medians(points)
    typical_above = central_peaks(typical, coefficients) - coefficients.baseline_bytes
    typical_peaks = np.array([p.peak for p in typical], dtype=float)
    scale = np.array([1e6, 1.0])  # solve in MB so both columns are of order one
    result = linprog(c=np.array([np.sum(1 / typical_peaks), np.sum(typical_above / typical_peaks)]) * scale,
                     A_ub=-np.column_stack([np.ones_like(above), above]) * scale,
                     b_ub=-(peaks - central), bounds=[(0, None), (0, None)])
    if not result.success:
        raise RuntimeError(f"margin fit failed: {result.message}")
    margin_bytes, margin_fraction = result.x * scale
    # Whole MB up: the solver's tolerance must not leave the tightest peak a few bytes over.
    return math.ceil(margin_bytes / 1e6 + 1e-6) * 1e6, float(margin_fraction)


def calibrate(points: Sequence[Point], off_grid: Sequence[Point] = (),
              source: str = "fit") -> MemoryCoefficients:
    """Central fit on each grid configuration's median peak, then the margin over every peak,
    the off-grid ones included."""
    central = as_coefficients(current_fit(medians(points)), source)
    margin_bytes, margin_fraction = fit_margin(list(points) + list(off_grid), central)
    return dataclasses.replace(central, margin_bytes=margin_bytes, margin_fraction=margin_fraction)


def medians(points: Sequence[Point]) -> list[Point]:
    """One point per configuration, at its median peak, in first-seen order."""
    by_config: dict[tuple, list[int]] = {}
    for p in points:
        by_config.setdefault(p.config, []).append(p.peak)
    return [Point(*config, int(statistics.median(peaks))) for config, peaks in by_config.items()]


def bound_table(points: Sequence[Point], coefficients: MemoryCoefficients) -> dict[tuple, dict]:
    """Per configuration: rehearsals, median and max peak, prediction, worst ratio, exceedances."""
    rows: dict[tuple, dict] = {}
    for p in points:
        rows.setdefault(p.config, {"peaks": []})["peaks"].append(p.peak)
    for (model, width, physical, samples), row in rows.items():
        spec = width_spec(model_spec(model, INPUT_SHAPE, CLASSES), width)
        predicted = predict_peak_bytes(spec, physical, samples, coefficients)
        row.update(predicted=predicted, worst=max(row["peaks"]) / predicted,
                   over=sum(peak > predicted for peak in row["peaks"]))
    return rows


def print_bound(points: Sequence[Point], coefficients: MemoryCoefficients, title: str) -> None:
    central = dataclasses.replace(coefficients, margin_bytes=0.0, margin_fraction=0.0)
    rows = bound_table(points, coefficients)
    print(f"\n{title}")
    print("| model | width | physical batch | samples | rehearsals | median MB | max MB | fit MB | "
          "predicted (upper bound) MB | worst measured/predicted | over the prediction |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (model, width, physical, samples), row in rows.items():
        spec = width_spec(model_spec(model, INPUT_SHAPE, CLASSES), width)
        fit = predict_peak_bytes(spec, physical, samples, central)
        print(f"| {model} | {width} | {physical} | {samples} | {len(row['peaks'])} | "
              f"{statistics.median(row['peaks']) / 1e6:.1f} | {max(row['peaks']) / 1e6:.1f} | "
              f"{fit / 1e6:.1f} | {row['predicted'] / 1e6:.1f} | {row['worst']:.3f} | "
              f"{row['over']} of {len(row['peaks'])} |")
    print("\n| model | rehearsals | worst measured/predicted | over the prediction |")
    print("|---|---:|---:|---:|")
    for model in dict.fromkeys(config[0] for config in rows):
        mine = [row for config, row in rows.items() if config[0] == model]
        print(f"| {model} | {sum(len(r['peaks']) for r in mine)} | {max(r['worst'] for r in mine):.3f} "
              f"| {sum(r['over'] for r in mine)} |")


def split_half(points: Sequence[Point], off_grid: Sequence[Point]) -> None:
    """Calibrate on the even-numbered repetitions only, count exceedances in the odd ones."""
    second = [p for p in list(points) + list(off_grid) if p.repeat % 2 == 1]
    if not second:
        return
    half = calibrate([p for p in points if p.repeat % 2 == 0],
                     [p for p in off_grid if p.repeat % 2 == 0])
    rows = bound_table(second, half)
    over = sum(r["over"] for r in rows.values())
    total = sum(len(r["peaks"]) for r in rows.values())
    print(f"\nsplit half: margin {half.margin_bytes / 1e6:.1f} MB + {half.margin_fraction:.3f} x "
          f"(fit - baseline) from the even repetitions; the odd ones exceed it {over} times in "
          f"{total} rehearsals (worst measured/predicted {max(r['worst'] for r in rows.values()):.3f})")


# --------------------------------------------------------------------------- measuring


def planned(repeats: int) -> list[tuple[tuple[str, float, int, int], int]]:
    """(configuration, repetition) in the order rehearsed: round by round, so that a slow spell
    of the shared machine, or a stopped run, spreads over every point alike."""
    grid = [(m, w, b, s) for m, widths, batches, s in GRID for w in widths for b in batches]
    samples = {config[:3]: config[3] for config in grid}
    repeated = [(*key, samples[key]) for key in REPEATED]
    return [(config, r) for r in range(repeats)
            for config in (grid if r == 0 else repeated) + list(OFF_GRID)]


def measure(repeats: int, threads: int, save: str | None) -> list[Point]:
    # OpenMP threads sleep instead of spinning while they wait: on two shared cores a rehearsal
    # then takes 2-4x less time; its peak is the same within the run-to-run spread (ResNet-18
    # width 0.125 batch 24: 514 and 525 MB passive, 524 and 517 MB spinning, 2026-12-04).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    points = ([Point(**row) for row in json.loads(Path(save).read_text())]
              if save and Path(save).exists() else [])
    done = {(p.config, p.repeat) for p in points}
    for (model, width, physical, samples), repeat in planned(repeats):
        if ((model, width, physical, samples), repeat) in done:
            continue
        t0 = time.perf_counter()
        peak, report = measure_rehearsal(rehearsal_plan(model, width, physical, samples), threads=threads)
        points.append(Point(model, width, physical, samples, peak, repeat, report["floor_rss_bytes"]))
        print(f"measured {model} width {width} physical batch {physical} ({samples} samples, "
              f"repetition {repeat}): {peak / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)", flush=True)
        if save:
            Path(save).write_text(json.dumps([p.__dict__ for p in points], indent=1))
    return points


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU") \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    return (f"{cpu}, {os.cpu_count()} cores, {platform.machine()}, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"opacus {importlib.metadata.version('opacus')}")


def record(points: Sequence[Point], off_grid: Sequence[Point], threads: int, repeats: int,
           loaded: bool) -> dict:
    """What memory_calibration.json keeps besides the coefficients: how, where, when, and every
    measured peak (tests check the prediction against them)."""
    def rows(group: Sequence[Point]) -> list[dict]:
        by_config: dict[tuple, list[Point]] = {}
        for p in group:
            by_config.setdefault(p.config, []).append(p)
        return [{"model": m, "width": w, "physical_batch": b, "local_samples": s,
                 "peaks": [p.peak for p in mine], "floors": [p.floor for p in mine if p.floor]}
                for (m, w, b, s), mine in by_config.items()]

    command = f"python benchmarks/calibrate_memory.py --threads {threads} --repeats {repeats}"
    return {"command": command + (" (measured with --save, refitted with --load)" if loaded else ""),
            "machine": machine(), "date": str(date.today()), "threads": threads,
            "omp_wait_policy": "PASSIVE", "points": rows(points), "off_grid": rows(off_grid)}


# --------------------------------------------------------------------------- --check, --model


def check(points: Sequence[Point], off_grid: Sequence[Point], threads: int, repeats: int,
          write: bool) -> None:
    """The stored coefficients against fresh rehearsals, no refit; the floor stored if they hold."""
    shipped = MemoryCoefficients.load()
    everything = list(points) + list(off_grid)
    print_bound(points, shipped, "the stored calibration against fresh rehearsals (no refit)")
    if off_grid:
        print_bound(off_grid, shipped, "off-grid points")
    rows = bound_table(everything, shipped)
    over = sum(r["over"] for r in rows.values())
    floors = [p.floor for p in everything if p.floor]
    floor = math.ceil(max(floors) / 1e6) * 1e6 if floors else None
    holds = over <= EXCEEDANCE_AIM * len(everything)
    print(f"\n{over} of {len(everything)} fresh rehearsals over the stored prediction "
          f"(aim: at most 1 in 20): {'holds' if holds else 'DOES NOT HOLD, refit with --load'}; "
          + (f"floor (data loaded, no model) {min(floors) / 1e6:.1f}-{max(floors) / 1e6:.1f} MB"
             if floors else "no floor measured"))
    if write and holds and floor is not None:
        data = json.loads(CALIBRATION_FILE.read_text())
        data["floor_bytes"] = floor
        data["calibration"]["check"] = {
            "command": f"python benchmarks/calibrate_memory.py --check --threads {threads} "
                       f"--repeats {repeats}",
            "machine": machine(), "date": str(date.today()), "rehearsals": len(everything),
            "over_prediction": over,
            "worst_measured_over_predicted": {
                model: round(max(r["worst"] for c, r in rows.items() if c[0] == model), 4)
                for model in dict.fromkeys(c[0] for c in rows)},
            "floors": sorted(floors)}
        MemoryCoefficients(**{k: v for k, v in data.items() if k != "calibration"})  # still valid
        CALIBRATION_FILE.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote floor_bytes {floor / 1e6:.0f} MB and the check to {CALIBRATION_FILE}")


def own_margin(points: Sequence[Point], draws: int, threads: int, jobs: int,
               write: bool) -> None:
    """The margin a model's own calibration gets (own_margin_bytes, own_margin_fraction): the
    smallest under which the built-ins' own calibrations (`draws` of them per model, each from
    the planner's six fresh rehearsals on random inputs) bound every real rehearsal in `points`.
    Printed with leave-one-model-out: fitted on the other two models, held against the third."""
    from coordinator.planning import model_memory

    shipped = MemoryCoefficients.load()
    pairs: list[tuple[Point, float, float]] = []  # (real rehearsal, central fit, fit above baseline)
    for name in dict.fromkeys(p.model for p in points):
        base = model_spec(name, INPUT_SHAPE, CLASSES)
        for draw in range(draws):
            t0 = time.perf_counter()
            record = model_memory.measure(base, structure(base).digest, jobs=jobs, threads=threads)
            central = model_memory.central_fit(base, record.rehearsals, shipped, dp=True)
            print(f"own calibration {draw} of {name} ({time.perf_counter() - t0:.0f} s): "
                  f"{central.source}", flush=True)
            for p in points:
                if p.model == name:
                    fit = predict_peak_bytes(p.spec, p.physical, p.samples, central)
                    pairs.append((p, fit, fit - central.baseline_bytes))

    def solve(chosen: Sequence[tuple[Point, float, float]]) -> tuple[float, float]:
        peaks = np.array([p.peak for p, _, _ in chosen], dtype=float)
        fits = np.array([fit for _, fit, _ in chosen])
        above = np.array([a for _, _, a in chosen])
        scale = np.array([1e6, 1.0])
        result = linprog(c=np.array([np.sum(1 / peaks), np.sum(above / peaks)]) * scale,
                         A_ub=-np.column_stack([np.ones_like(above), above]) * scale,
                         b_ub=-(peaks - fits), bounds=[(0, None), (0, None)])
        if not result.success:
            raise RuntimeError(f"own margin fit failed: {result.message}")
        margin_bytes, fraction = result.x * scale
        return math.ceil(margin_bytes / 1e6 + 1e-6) * 1e6, float(fraction)

    def exceed(chosen, margin: tuple[float, float]) -> tuple[int, float]:
        bounds = [(p.peak, fit + margin[0] + margin[1] * above) for p, fit, above in chosen]
        return sum(peak > bound for peak, bound in bounds), max(peak / bound for peak, bound in bounds)

    margin = solve(pairs)
    print(f"\nown-calibration margin: {margin[0] / 1e6:.0f} MB + {margin[1]:.3f} x (fit - baseline), "
          f"over {len(pairs)} (real rehearsal, own calibration) pairs")
    print("| model | real rehearsals x own calibrations | worst measured/predicted | over | "
          "leave-one-model-out: margin | its worst | over |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for name in dict.fromkeys(p.model for p, _, _ in pairs):
        mine = [q for q in pairs if q[0].model == name]
        others = solve([q for q in pairs if q[0].model != name])
        over, worst = exceed(mine, margin)
        lomo_over, lomo_worst = exceed(mine, others)
        print(f"| {name} | {len(mine)} | {worst:.3f} | {over} | {others[0] / 1e6:.0f} MB + "
              f"{others[1]:.3f} x | {lomo_worst:.3f} | {lomo_over} |")
    if write:
        data = json.loads(CALIBRATION_FILE.read_text())
        data["own_margin_bytes"], data["own_margin_fraction"] = margin
        data["calibration"]["own_margin"] = {
            "command": f"python benchmarks/calibrate_memory.py --load FILE --own-margin {draws}",
            "date": str(date.today()), "draws_per_model": draws, "pairs": len(pairs)}
        MemoryCoefficients(**{k: v for k, v in data.items() if k != "calibration"})  # still valid
        CALIBRATION_FILE.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote own_margin_bytes and own_margin_fraction to {CALIBRATION_FILE}")


def own_model(name: str, verify_repeats: int, threads: int, jobs: int,
              grid: Sequence[Point] = ()) -> dict:
    """The planner's per-model calibration of `name`, then fresh real rehearsals against it (and
    against `grid`'s, the calibration points of a built-in: an out-of-sample check of the
    per-model scheme on networks measured a hundred times)."""
    from coordinator.planning import model_memory

    base = model_spec(name, INPUT_SHAPE, CLASSES)
    shipped = MemoryCoefficients.load()
    t0 = time.perf_counter()
    record = model_memory.measure(base, structure(base).digest, jobs=jobs, threads=threads)
    seconds = time.perf_counter() - t0
    dp, plain = model_memory.fit(base, record.rehearsals, shipped)
    print(f"\n{name}: {len(record.rehearsals)} fresh rehearsals on random inputs in {seconds:.0f} s "
          f"({jobs} at a time); {dp.source}; {plain.source}")
    print("| rehearsal | width | physical batch | floor MB | peak MB | on the data floor MB | "
          "predicted MB | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in record.rehearsals:
        standing = r.peak_bytes - r.floor_bytes + shipped.floor_bytes
        predicted = predict_peak_bytes(width_spec(base, r.width), r.physical_batch, 0,
                                       dp if r.dp else plain)
        print(f"| {'DP-SGD' if r.dp else 'plain'} | {r.width} | {r.physical_batch} | "
              f"{r.floor_bytes / 1e6:.1f} | {r.peak_bytes / 1e6:.1f} | {standing / 1e6:.1f} | "
              f"{predicted / 1e6:.1f} | {standing / predicted:.3f} |")
    rows = [(p.width, p.physical, p.samples, p.peak,
             predict_peak_bytes(p.spec, p.physical, p.samples, dp)) for p in grid if p.model == name]
    if rows:
        print(f"its own calibration against the {len(rows)} real rehearsals of {name} in the grid: "
              f"worst measured/predicted {max(r[3] / r[4] for r in rows):.3f}, "
              f"{sum(r[3] > r[4] for r in rows)} over the prediction")
    for repeat in range(verify_repeats):
        for width, physical, samples in VERIFY:
            plan = rehearsal_plan(name, width, physical, samples)
            peak, _ = measure_rehearsal(plan, threads=threads)
            predicted = predict_peak_bytes(width_spec(base, width), physical, samples, dp)
            rows.append((width, physical, samples, peak, predicted))
            print(f"verified {name} width {width} physical batch {physical} (repetition {repeat}): "
                  f"{peak / 1e6:.1f} of {predicted / 1e6:.1f} MB predicted", flush=True)
    if rows:
        print("\n| width | physical batch | samples | real rehearsals | median MB | max MB | "
              "predicted MB | worst measured/predicted | over the prediction |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for width, physical, samples in dict.fromkeys(r[:3] for r in rows):
            mine = [r for r in rows if r[:3] == (width, physical, samples)]
            peaks = [r[3] for r in mine]
            print(f"| {width} | {physical} | {samples} | {len(mine)} | "
                  f"{statistics.median(peaks) / 1e6:.1f} | {max(peaks) / 1e6:.1f} | "
                  f"{mine[0][4] / 1e6:.1f} | {max(peaks) / mine[0][4]:.3f} | "
                  f"{sum(p > mine[0][4] for p in peaks)} of {len(mine)} |")
    worst = max((r[3] / r[4] for r in rows), default=float("nan"))
    over = sum(r[3] > r[4] for r in rows)
    print(f"{name}: {len(rows)} real rehearsals, worst measured/predicted {worst:.3f}, "
          f"{over} over the prediction")
    return {"model": name, "seconds": seconds, "rehearsals": len(rows), "worst": worst, "over": over}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20,
                        help="fresh rehearsals of each REPEATED and OFF_GRID point (default 20)")
    parser.add_argument("--save", help="write the raw measurements here (JSON)")
    parser.add_argument("--load", help="refit measurements saved by --save instead of rehearsing")
    parser.add_argument("--no-write", action="store_true", help="do not update memory_calibration.json")
    parser.add_argument("--check", action="store_true",
                        help="hold the rehearsals against the stored coefficients instead of refitting")
    parser.add_argument("--model", action="append", default=[],
                        help="also run this model's own calibration and verify it (repeatable)")
    parser.add_argument("--verify-repeats", type=int, default=20,
                        help="fresh real rehearsals of each VERIFY plan per --model (default 20)")
    parser.add_argument("--jobs", type=int, default=2, help="rehearsals at once in --model's calibration")
    parser.add_argument("--models-only", action="store_true", help="only the --model part")
    parser.add_argument("--own-margin", type=int, metavar="DRAWS", default=0,
                        help="fit the margin of a model's own calibration on the built-ins: "
                             "DRAWS own calibrations of each against the measured points")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.models_only:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        results = [own_model(name, args.verify_repeats, args.threads, args.jobs) for name in args.model]
        print("\n| model | calibration s | real rehearsals | worst measured/predicted | over the prediction |")
        print("|---|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['model']} | {r['seconds']:.0f} | {r['rehearsals']} | {r['worst']:.3f} | {r['over']} |")
        print(f"\n{time.perf_counter() - started:.0f} s")
        return
    measured = ([Point(**row) for row in json.loads(Path(args.load).read_text())] if args.load
                else measure(args.repeats, args.threads, args.save))
    off_grid = [p for p in measured if p.config in set(OFF_GRID)]
    points = [p for p in measured if p.config not in set(OFF_GRID)]
    if args.own_margin:
        own_margin(measured, args.own_margin, args.threads, args.jobs, not args.no_write)
        print(f"\n{time.perf_counter() - started:.0f} s")
        return
    if args.check:
        check(points, off_grid, args.threads, args.repeats, not args.no_write)
        for name in args.model:
            own_model(name, args.verify_repeats, args.threads, args.jobs, measured)
        print(f"\n{time.perf_counter() - started:.0f} s")
        return
    fitted = medians(points)
    models = ", ".join(f"{m} ({sum(p.model == m for p in fitted)})"
                       for m in dict.fromkeys(p.model for p in fitted))
    coefficients = calibrate(points, off_grid, source=(
        f"benchmarks/calibrate_memory.py --threads {args.threads} --repeats {args.repeats} on "
        f"{platform.machine()} ({date.today()}): {len(points)} fresh rehearsals of {len(fitted)} points "
        f"({models}; {'/'.join(sorted({str(p.samples) for p in fitted}))} local samples); "
        "central fit on each point's median, margin up to every measured peak"))
    c = coefficients
    print()
    print(f"fit on the medians of {len(fitted)} points ({len(points)} rehearsals): baseline "
          f"{c.baseline_bytes / 1e6:.1f} MB; update phase {c.bytes_per_parameter:.2f} bytes/parameter; "
          f"backward phase {c.backward_bytes_per_parameter:.2f} bytes/parameter + activation factor "
          f"{c.activation_factor:.3f} x saved bytes + per-sample-gradient factor "
          f"{c.per_sample_gradient_factor:.3f}; retained fraction {c.retained_fraction:.3f} of those "
          f"batch terms at the update. Upper-bound margin: {c.margin_bytes / 1e6:.1f} MB + "
          f"{c.margin_fraction:.3f} x (fit - baseline)")
    print_bound(points, coefficients, "calibration points (every fresh rehearsal against the upper bound)")
    if off_grid:
        print_bound(off_grid, coefficients, "off-grid points (in the margin, not in the central fit)")
    split_half(points, off_grid)
    fitted_x = current_fit(fitted)
    by_model, _ = out_of_sample(fitted, "current")
    print("\ncentral fit, medians against the fit and against leave-one-model-out (fitted on the other "
          "models' points only):")
    print("| model | width | physical batch | parameters | median MB | fit MB | error % | "
          "out-of-sample MB | out-of-sample error % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p, lomo in zip(fitted, by_model):
        fit = current_predict(fitted_x, p)
        print(f"| {p.model} | {p.width} | {p.physical} | {memory_features(p.spec).parameters:,} | "
              f"{p.peak / 1e6:.1f} | {fit / 1e6:.1f} | {error(fit, p.peak):+.1f} | "
              f"{lomo / 1e6:.1f} | {error(lomo, p.peak):+.1f} |")
    summary(fitted, "current", "this formula (memory.py), central fit")
    former = former_fit(fitted)
    print(f"\nformer three-term formula refitted on the same medians: baseline "
          f"{former[0] / 1e6:.1f} MB, {former[1]:.2f} bytes/parameter, activation factor "
          f"{former[2]:.3f}")
    summary(fitted, "former", "former formula")
    print(f"\n{time.perf_counter() - started:.0f} s")
    floors = [p.floor for p in measured if p.floor]
    if floors:
        coefficients = dataclasses.replace(coefficients, floor_bytes=math.ceil(max(floors) / 1e6) * 1e6)
    if not args.no_write:
        content = {**coefficients.to_dict(),
                   "calibration": record(points, off_grid, args.threads, args.repeats, bool(args.load))}
        CALIBRATION_FILE.write_text(json.dumps(content, indent=2) + "\n")
        print(f"wrote {CALIBRATION_FILE}")


if __name__ == "__main__":
    main()
