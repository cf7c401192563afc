"""Calibrate the planner's memory model against measured rehearsal peaks, on several models.

Runs `fedprune-edge rehearse` as a fresh child for a grid of (model, width ratio, physical batch)
(DP-SGD, ghost clipping, a Fashion-MNIST shard of 96-192 samples), reads each child's peak
RSS from the kernel (its VmHWM), fits the coefficients of coordinator/planning/memory.py by
non-negative least squares on all rehearsals, and prints predicted vs measured with two
out-of-sample checks: leave-one-model-out (fit without model M, predict M) and leave-one-point-
out. The same checks are printed for the former three-term formula (forward-hook activation
elements, no per-sample-gradient term) for comparison. Writes memory_calibration.json.

    python benchmarks/calibrate_memory.py --threads 2

`--save FILE` keeps the raw measurements as they come (a rerun with the same file skips the
rehearsals it already holds); `--load FILE` refits them without rehearsing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares, nnls

from coordinator.planning.memory import (
    CALIBRATION_FILE,
    MemoryCoefficients,
    footprint,
    memory_features,
    predict_peak_bytes,
)
from coordinator.planning.verify import measure_rehearsal
from edge_sdk.sizing import DevicePlan
from edge_sdk.models import ModelSpec, model_spec
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
INPUT_SHAPE, CLASSES = (1, 28, 28), 10  # Fashion-MNIST, the dataset every rehearsal loads


@dataclass(frozen=True)
class Point:
    model: str
    width: float
    physical: int
    samples: int
    peak: int

    @property
    def spec(self) -> ModelSpec:
        return width_spec(model_spec(self.model, INPUT_SHAPE, CLASSES), self.width)


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


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", help="write the raw measurements here (JSON)")
    parser.add_argument("--load", help="refit measurements saved by --save instead of rehearsing")
    parser.add_argument("--no-write", action="store_true", help="do not update memory_calibration.json")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.load:
        points = [Point(**row) for row in json.loads(Path(args.load).read_text())]
    else:
        saved = ([Point(**row) for row in json.loads(Path(args.save).read_text())]
                 if args.save and Path(args.save).exists() else [])
        points = []
        for model, widths, batches, samples in GRID:
            for width in widths:
                for physical in batches:
                    known = [p for p in saved if (p.model, p.width, p.physical) == (model, width, physical)]
                    if known:
                        points.append(known[0])
                        continue
                    t0 = time.perf_counter()
                    peak, _ = measure_rehearsal(rehearsal_plan(model, width, physical, samples),
                                                threads=args.threads)
                    points.append(Point(model, width, physical, samples, peak))
                    print(f"measured {model} width {width} physical batch {physical}: "
                          f"{peak / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)", flush=True)
                    if args.save:
                        Path(args.save).write_text(json.dumps([p.__dict__ for p in points], indent=1))

    x = current_fit(points)
    models = ", ".join(f"{m} ({sum(p.model == m for p in points)})"
                       for m in dict.fromkeys(p.model for p in points))
    coefficients = as_coefficients(
        x, source=f"benchmarks/calibrate_memory.py --threads {args.threads} on {platform.machine()} "
                  f"({date.today()}), {len(points)} rehearsals of {models}, "
                  f"{'/'.join(sorted({str(p.samples) for p in points}))} local samples")
    by_model, _ = out_of_sample(points, "current")
    print()
    print(f"fit on {len(points)} rehearsals: baseline {x[0] / 1e6:.1f} MB; update phase {x[1]:.2f} "
          f"bytes/parameter; backward phase {x[2]:.2f} bytes/parameter + activation factor "
          f"{x[3]:.3f} x saved bytes + per-sample-gradient factor {x[4]:.3f}; retained fraction "
          f"{x[5]:.3f} of those batch terms at the update")
    print()
    print("| model | width | physical batch | parameters | measured MB | predicted MB | error % | "
          "out-of-sample MB | out-of-sample error % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p, lomo in zip(points, by_model):
        predicted = predict_peak_bytes(p.spec, p.physical, p.samples, coefficients)
        print(f"| {p.model} | {p.width} | {p.physical} | {memory_features(p.spec).parameters:,} | "
              f"{p.peak / 1e6:.1f} | {predicted / 1e6:.1f} | {error(predicted, p.peak):+.1f} | "
              f"{lomo / 1e6:.1f} | {error(lomo, p.peak):+.1f} |")
    print("\n(out of sample: leave-one-model-out, i.e. fitted on the other models' rehearsals only)")
    summary(points, "current", "this formula (memory.py)")
    former = former_fit(points)
    print(f"\nformer three-term formula refitted on the same rehearsals: baseline "
          f"{former[0] / 1e6:.1f} MB, {former[1]:.2f} bytes/parameter, activation factor "
          f"{former[2]:.3f}")
    summary(points, "former", "former formula")
    print(f"\n{time.perf_counter() - started:.0f} s")
    if not args.no_write:
        CALIBRATION_FILE.write_text(json.dumps(coefficients.to_dict(), indent=2) + "\n")
        print(f"wrote {CALIBRATION_FILE}")


if __name__ == "__main__":
    main()
