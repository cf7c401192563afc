"""Each model's own memory calibration: a few fresh rehearsals per structural digest, kept on disk.

The shipped calibration (`memory_calibration.json`) was fitted on the built-in networks. A user's
network can spend memory where they never do: Opacus materialises per-sample gradients of every
depthwise conv and of the GroupNorm that replaced its BatchNorm, unfolding their inputs nine times
over; a tabular model is all fc. So the first time a model is planned, a handful of fresh child
processes (`python -m edge_sdk.rehearsal`) each build one of its submodels with
`build_model(width_spec(spec, r))` and train a few DP-SGD or plain steps on random inputs of its
own shape, and report two numbers: the floor (runtime and inputs in memory, before the model) and
the peak. The measurements are kept in `<cache>/<digest>.json` and fitted whenever they are read:
a model is rehearsed once per structure, on first use, whatever its name.

The fit, per mode (REHEARSALS: widths 1 and 0.25 by physical batches 8 and 48 under DP-SGD,
two under plain SGD):

    peak - floor = c0 + max(b_step x P + r x B, b_bwd x P + B)     DP-SGD (memory.py's formula)
    B = a x saved activation bytes x batch + g x 4 B x per-sample gradient elements x batch
    peak - floor = c0 + b_bwd x P + a x saved activation bytes x batch              plain SGD

b_step, b_bwd and r (what Opacus and the optimizer keep per parameter) are the shipped
calibration's; c0, a and g are this model's (least squares on the relative error, under-
predictions weighted 3x, as the shipped fit). The prediction stands on the shipped calibration's
floor (a real rehearsal's process, its data loaded) rather than the child's, so a model measured
on random inputs is predicted in the process a device runs: baseline = floor_bytes + c0.

The upper bound: `own_margin_bytes + own_margin_fraction x (fit - baseline)` from the shipped
calibration, the smallest margin under which the built-in networks' own calibrations (three
each, from these same six rehearsals) bound every one of their 183 real rehearsals: it covers
the run-to-run spread, a fit from six points and the process a data source adds to. Its
`own_margin_bytes` is raised, whole MB up, until none of the model's own rehearsals exceeds it.
docs/BENCHMARKS.md ("Memory of any model") holds it against 20 fresh real rehearsals of each of
four plans of two MobileNets.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device_profiles.files import atomic_write
from edge_sdk.models import ModelSpec
from edge_sdk.models.registry import model_factory
from edge_sdk.references import reference_folders
from edge_sdk.models.network import structure
from edge_sdk.slicing import width_spec
from edge_sdk.validation import describe, load_json

from .memory import (CalibrationError, MemoryCoefficients, MemoryModel, memory_features,
                     predict_peak_bytes)

# (width, physical batch, DP): the corners the planner picks between (its widths run 1 to 0.125,
# its physical batches 48 to 8), each in a fresh process of 5-10 s for a small network. Width by
# batch under DP: activations grow with the width, per-sample conv gradients with its square.
REHEARSALS: tuple[tuple[float, int, bool], ...] = (
    (1.0, 48, True), (1.0, 8, True), (0.25, 48, True), (0.25, 8, True),
    (1.0, 48, False), (0.25, 8, False),
)
CACHE_ENV = "FEDPRUNE_MEMORY_CACHE"
# Rehearsals run at once: two children on two cores peak within the run-to-run spread of one at
# a time (a peak is memory, not time; docs/BENCHMARKS.md, "Memory of any model"), in half the
# wall time.
JOBS = 2
UNDER_WEIGHT = 3.0  # as benchmarks/calibrate_memory.py: an under-prediction lets a plan overrun
REHEARSAL_TIMEOUT_S = 900
_FORMAT = 1
RECORD_LIMIT = 1 << 20  # bytes; a record is a few kB
log = logging.getLogger(__name__)


class ModelMemoryError(ValueError):
    """A model's memory cannot be measured or its stored measurements cannot be used; the
    message names the model, the file and what to do."""


Bytes = Annotated[int, Field(gt=0, le=1 << 50)]


class Rehearsal(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    width: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    physical_batch: Annotated[int, Field(ge=1, le=1_000_000)]
    dp: bool
    floor_bytes: Bytes
    peak_bytes: Bytes


class MemoryRecord(BaseModel):
    """`<cache>/<digest>.json`: what the rehearsals of one model structure measured. A file
    anyone could have written, so every field is checked and no number may be NaN or infinite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    format: Literal[1]
    digest: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    model: Annotated[str, Field(min_length=1, max_length=200)]
    input_shape: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=4)]
    num_classes: Annotated[int, Field(ge=2)]
    machine: Annotated[str, Field(max_length=500)]
    date: Annotated[str, Field(max_length=40)]
    threads: Annotated[int, Field(ge=1, le=4096)]
    rehearsals: Annotated[list[Rehearsal], Field(min_length=1, max_length=1000)]


def cache_dir(explicit: str | Path | None = None) -> Path:
    """Where measured models are kept: `explicit` (the coordinator's state dir, a config), else
    $FEDPRUNE_MEMORY_CACHE, else ~/.cache/fedprune/memory ($XDG_CACHE_HOME respected)."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "fedprune" / "memory"


def is_builtin(spec: ModelSpec) -> bool:
    """A network from edge_sdk/models/zoo.py, which the shipped calibration was fitted on."""
    return getattr(model_factory(spec.name), "__module__", "") == "edge_sdk.models.zoo"


def memory_model(base: ModelSpec, reference: MemoryCoefficients, cache: str | Path | None = None,
                 jobs: int = JOBS, threads: int = 2) -> MemoryModel:
    """What predicts `base`'s peak: the shipped calibration for a built-in network; otherwise
    the model's own rehearsals, read from the cache or measured now (and kept)."""
    if is_builtin(base):
        return MemoryModel(reference, reference, "the shipped calibration (built-in network)")
    digest = structure(base.base).digest
    path = cache_dir(cache) / f"{digest}.json"
    if not path.exists():
        log.info("measuring the memory of %s (structure %s): %d fresh rehearsals, once; kept in %s",
                 base.name, digest, len(REHEARSALS), path)
        record = measure(base, digest, jobs=jobs, threads=threads)
        atomic_write(path, (record.model_dump_json(indent=1) + "\n").encode())
    try:
        changed = path.stat().st_mtime_ns
    except OSError as exc:
        raise ModelMemoryError(f"memory record {path} cannot be read ({exc})") from None
    return _fitted(path, changed, base.base, digest, reference)


@lru_cache(maxsize=32)
def _fitted(path: Path, changed: int, base: ModelSpec, digest: str,
            reference: MemoryCoefficients) -> MemoryModel:
    """Read and fitted once per file version: a fleet plans many devices of one model."""
    record = load_record(path, base, digest)
    dp, plain = fit(base, record.rehearsals, reference)
    return MemoryModel(dp, plain, f"{len(record.rehearsals)} rehearsals of this model "
                                  f"({record.date}, {path})")


def load_record(path: Path, base: ModelSpec, digest: str) -> MemoryRecord:
    remedy = f"delete {path} and the next plan measures the model again (a minute or so)"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelMemoryError(f"memory record {path} cannot be read ({exc}); {remedy}") from None
    try:
        data = load_json(raw, f"memory record {path}", ModelMemoryError, RECORD_LIMIT)
    except ModelMemoryError as exc:
        raise ModelMemoryError(f"{exc}; {remedy}") from None
    try:
        record = MemoryRecord.model_validate(data)
    except ValidationError as exc:
        raise ModelMemoryError(f"memory record {path} is malformed ({describe(exc, 'record')}); "
                               f"{remedy}") from None
    if record.digest != digest or tuple(record.input_shape) != tuple(base.input_shape) \
            or record.num_classes != base.num_classes:
        raise ModelMemoryError(
            f"memory record {path} was measured for structure {record.digest} (input "
            f"{tuple(record.input_shape)}, {record.num_classes} classes), not for {base.name!r} "
            f"(structure {digest}, input {base.input_shape}, {base.num_classes} classes); {remedy}")
    modes = {r.dp for r in record.rehearsals}
    if modes != {True, False} or len({(r.width, r.physical_batch) for r in record.rehearsals
                                      if r.dp}) < 3:
        raise ModelMemoryError(f"memory record {path} holds too few rehearsals to fit (DP and "
                               f"plain, at least three DP configurations); {remedy}")
    return record


# --------------------------------------------------------------------------- measuring


def rehearse(base: ModelSpec, width: float, physical_batch: int, dp: bool,
             threads: int = 2, steps: int = 2) -> Rehearsal:
    """One fresh child process: `build_model(width_spec(base, width))`, `steps` batches."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # as calibrated
    # The child imports what this process imports: a package.module:function model included,
    # from the config folder it was imported from.
    search = [*reference_folders(), env.get("PYTHONPATH", ""), *sys.path]
    env["PYTHONPATH"] = os.pathsep.join(p for p in search if p)
    request = json.dumps({"spec": base.base.to_dict(), "width": width,
                          "physical_batch": physical_batch, "dp": dp, "steps": steps})
    where = f"{base.name!r} at width {width:g}, physical batch {physical_batch}, " \
            f"{'DP-SGD' if dp else 'plain SGD'}"
    try:
        child = subprocess.run([sys.executable, "-m", "edge_sdk.rehearsal", request], env=env,
                               capture_output=True, text=True, timeout=REHEARSAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ModelMemoryError(f"rehearsing {where} took over {REHEARSAL_TIMEOUT_S} s") from None
    if child.returncode != 0:
        lines = [line for line in child.stderr.strip().splitlines() if line.strip()]
        raise ModelMemoryError(f"rehearsing {where} failed, so its memory cannot be predicted: "
                               f"{lines[-1] if lines else f'exit status {child.returncode}'}")
    report = json.loads(child.stdout.strip().splitlines()[-1])
    return Rehearsal(width=width, physical_batch=physical_batch, dp=dp,
                     floor_bytes=int(report["floor_rss_bytes"]),
                     peak_bytes=int(report["peak_rss_bytes"]))


def measure(base: ModelSpec, digest: str, jobs: int = 1, threads: int = 2,
            grid: Sequence[tuple[float, int, bool]] = REHEARSALS) -> MemoryRecord:
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        done = list(pool.map(lambda c: rehearse(base, *c, threads=threads), grid))
    return MemoryRecord(format=_FORMAT, digest=digest, model=base.name,
                        input_shape=list(base.input_shape), num_classes=base.num_classes,
                        machine=machine(), date=str(date.today()), threads=threads,
                        rehearsals=done)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.machine()}, {platform.system()} {platform.release()}"


# --------------------------------------------------------------------------- fitting


def _moving(x: Sequence[float], features, batch: int, ref: MemoryCoefficients, dp: bool) -> float:
    """The fit above the floor: memory.py's terms with this model's c0, a (and g under DP)."""
    c0, a, g = (*x, 0.0)[:3]
    if not dp:
        return c0 + ref.backward_bytes_per_parameter * features.parameters \
            + a * features.saved_activation_bytes * batch
    batch_terms = (a * features.saved_activation_bytes * batch
                   + g * 4 * features.per_sample_gradient_elements * batch)
    return c0 + max(ref.bytes_per_parameter * features.parameters + ref.retained_fraction * batch_terms,
                    ref.backward_bytes_per_parameter * features.parameters + batch_terms)


def fit(base: ModelSpec, rehearsals: Sequence[Rehearsal],
        reference: MemoryCoefficients) -> tuple[MemoryCoefficients, MemoryCoefficients]:
    """(DP-SGD, plain SGD) coefficients of `base` from its rehearsals, upper bounds both."""
    if reference.floor_bytes is None or reference.backward_bytes_per_parameter is None:
        raise CalibrationError("the shipped memory calibration predates per-model calibration "
                               "(no floor_bytes or backward_bytes_per_parameter); measure this "
                               "machine with `python benchmarks/calibrate_memory.py --check`")
    dp = _fit_mode(base, [r for r in rehearsals if r.dp], reference, dp=True)
    plain = _fit_mode(base, [r for r in rehearsals if not r.dp], reference, dp=False)
    return dp, plain


def central_fit(base: ModelSpec, rehearsals: Sequence[Rehearsal], reference: MemoryCoefficients,
                dp: bool) -> MemoryCoefficients:
    """The least-squares fit of one mode, on the reference floor, without any margin."""
    from scipy.optimize import least_squares

    points = [(memory_features(width_spec(base, r.width)), r) for r in rehearsals if r.dp == dp]

    def residuals(x: np.ndarray) -> np.ndarray:
        err = np.array([(r.floor_bytes + _moving(x, f, r.physical_batch, reference, dp)
                         - r.peak_bytes) / r.peak_bytes for f, r in points])
        return np.where(err < 0, UNDER_WEIGHT * err, err)

    size = 3 if dp else 2  # (c0, a, g); plain SGD has no per-sample gradients
    best = None
    for start in ([30e6, 3.0, 2.0], [60e6, 8.0, 0.5], [10e6, 1.0, 10.0]):
        trial = least_squares(residuals, start[:size], bounds=([0.0] * size, [np.inf] * size),
                              x_scale=[1e7, 1.0, 1.0][:size])
        if best is None or trial.cost < best.cost:
            best = trial
    c0, a, g = (*(float(v) for v in best.x), 0.0)[:3]
    return MemoryCoefficients(
        baseline_bytes=reference.floor_bytes + c0,
        bytes_per_parameter=reference.bytes_per_parameter if dp else reference.backward_bytes_per_parameter,
        activation_factor=a, per_sample_gradient_factor=g,
        backward_bytes_per_parameter=reference.backward_bytes_per_parameter,
        retained_fraction=reference.retained_fraction if dp else 0.0,
        source=f"{len(points)} {'DP-SGD' if dp else 'plain SGD'} rehearsals of {base.name}: c0 "
               f"{c0 / 1e6:.1f} MB, activation factor {a:.2f}, per-sample gradient factor {g:.2f}, "
               "on the shipped calibration's per-parameter terms and floor")


def _fit_mode(base: ModelSpec, rehearsals: Sequence[Rehearsal], reference: MemoryCoefficients,
              dp: bool) -> MemoryCoefficients:
    central = central_fit(base, rehearsals, reference, dp)
    fraction = reference.margin_fraction if reference.own_margin_fraction is None \
        else reference.own_margin_fraction
    least = reference.margin_bytes if reference.own_margin_bytes is None \
        else reference.own_margin_bytes
    # ... raised, whole MB up, until no rehearsal of this model exceeds the bound (each on its
    # own child's floor, which the central fit's baseline stands in for).
    needed = 0.0
    for r in rehearsals:
        if r.dp != dp:
            continue
        fit = predict_peak_bytes(width_spec(base, r.width), r.physical_batch, 0, central)
        above = fit - central.baseline_bytes
        needed = max(needed, r.peak_bytes - r.floor_bytes + reference.floor_bytes - fit - fraction * above)
    return dataclasses.replace(
        central, margin_bytes=float(max(least, math.ceil(needed / 1e6) * 1e6)), margin_fraction=fraction,
        source=central.source + f"; margin {max(least, math.ceil(needed / 1e6) * 1e6) / 1e6:.0f} MB "
                                f"+ {fraction:.3f} x the fit above it")
