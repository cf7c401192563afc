"""Size each device's submodel and round from its profile.

Memory first: the widest submodel (then, before narrowing further, smaller physical batches via
Opacus virtual steps) whose predicted peak fits `available memory x safety margin`. Then transfer:
the value precision and sparsity ladder is walked until download + upload fit the device's share
of the round deadline at its bandwidth. Then compute: local samples per round are capped so local
training fits the rest of the deadline at the device's measured DP throughput. When nothing fits,
the plan says so (`fits = false`) with the reasons, rather than handing a device a model that
will be killed by the OOM killer or miss every deadline.
"""

from __future__ import annotations

import math
from functools import lru_cache
from dataclasses import dataclass

import numpy as np

from device_profiles import DeviceProfile
from edge_sdk import codec
from edge_sdk.budget import BudgetPlan, DataSlice
from edge_sdk.models import ModelSpec, build_model
from edge_sdk.pruning import is_prunable, magnitude_mask
from edge_sdk.slicing import width_spec

from .memory import MemoryCoefficients, footprint, predict_peak_bytes

WIDTHS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)
# Transfer ladder: cheapest change first (halve the bytes losslessly enough), then sparsify.
TRANSFER_LADDER = (("fp32", 1.0), ("fp16", 1.0), ("fp16", 0.5), ("fp16", 0.25), ("fp16", 0.1))


@dataclass(frozen=True)
class PlannerSettings:
    deadline_seconds: float = 600.0
    transfer_share: float = 0.5
    safety_margin: float = 0.9
    batch_size: int = 48
    min_physical_batch: int = 8
    local_samples: int = 420
    local_epochs: int = 1
    dp: bool = True
    momentum: float = 0.0
    slicing: str = "prefix"


def plan_device(profile: DeviceProfile, base: ModelSpec, model_name: str, settings: PlannerSettings,
                coefficients: MemoryCoefficients, data: DataSlice | None = None) -> BudgetPlan:
    budget = int(profile.memory_available_bytes * settings.safety_margin)
    reasons: list[str] = []
    choice = _fit_memory(base, settings, coefficients, budget)
    if choice is None:
        smallest = width_spec(base, WIDTHS[-1])
        need = predict_peak_bytes(smallest, settings.min_physical_batch, settings.local_samples,
                                  coefficients)
        reasons.append(f"memory: even width {WIDTHS[-1]} with physical batch "
                       f"{settings.min_physical_batch} needs {need / 1e6:.0f} MB, over the budget of "
                       f"{budget / 1e6:.0f} MB ({profile.memory_available_bytes / 1e6:.0f} MB "
                       f"available x {settings.safety_margin})")
        ratio, physical, peak = WIDTHS[-1], settings.min_physical_batch, need
    else:
        ratio, physical, peak = choice
    spec = width_spec(base, ratio)

    transfer_budget = settings.deadline_seconds * settings.transfer_share
    for dtype, keep in TRANSFER_LADDER:
        down, up = payload_bytes(spec, dtype, keep)
        transfer = down / profile.network.downlink_bytes_per_s + up / profile.network.uplink_bytes_per_s
        if transfer <= transfer_budget:
            break
    else:
        reasons.append(f"transfer: {down + up:,} bytes at the sparsest setting take {transfer:.0f} s, "
                       f"over {transfer_budget:.0f} s ({settings.transfer_share:.0%} of the deadline)")

    compute_budget = settings.deadline_seconds - transfer
    rate = _throughput(profile, base, spec, settings.dp)
    samples = min(settings.local_samples, int(rate * max(compute_budget, 0) / settings.local_epochs))
    if samples < settings.batch_size:
        reasons.append(f"compute: at {rate:.0f} samples/s the {max(compute_budget, 0):.0f} s left "
                       f"after transfer allow {samples} local samples, under one batch of "
                       f"{settings.batch_size}")
    steps = settings.local_epochs * math.ceil(samples / settings.batch_size) if samples else 0
    return BudgetPlan(
        device=profile.name, model=model_name, width_ratio=ratio, slicing=settings.slicing,
        batch_size=settings.batch_size, physical_batch_size=physical, local_steps=steps,
        local_samples=samples, dp=settings.dp, momentum=settings.momentum, value_dtype=dtype,
        download_keep=keep, upload_keep=keep, parameters=footprint(spec).parameters,
        predicted_peak_bytes=peak, budget_bytes=budget, download_bytes=down, upload_bytes=up,
        transfer_seconds=transfer,
        compute_seconds=samples * settings.local_epochs / rate if rate else 0.0,
        deadline_seconds=settings.deadline_seconds, fits=not reasons, reasons=reasons,
        data=data or DataSlice())


def _fit_memory(base: ModelSpec, settings: PlannerSettings, coefficients: MemoryCoefficients,
                budget: int) -> tuple[float, int, int] | None:
    physical_options = []
    size = settings.batch_size
    while size > settings.min_physical_batch:
        physical_options.append(size)
        size //= 2
    physical_options.append(min(settings.min_physical_batch, settings.batch_size))
    for ratio in WIDTHS:
        spec = width_spec(base, ratio)
        for physical in physical_options if settings.dp else physical_options[:1]:
            peak = predict_peak_bytes(spec, physical, settings.local_samples, coefficients)
            if peak <= budget:
                return ratio, physical, peak
    return None


def _throughput(profile: DeviceProfile, base: ModelSpec, spec: ModelSpec, dp: bool) -> float:
    """The profile measures the reference model at full width; cost scales with forward MACs."""
    rate = profile.compute.dp_samples_per_s if dp else profile.compute.samples_per_s
    return rate * footprint(base).macs / max(footprint(spec).macs, 1)


@lru_cache(maxsize=256)
def payload_bytes(spec: ModelSpec, dtype: str, keep: float) -> tuple[int, int]:
    """Exact encoded sizes of a download and an upload of this submodel (codec, not estimates).

    Values come from a fresh initialisation; sizes depend on counts and index layout, which the
    magnitude mask fixes, not on the trained values (zstd gains little on float mantissas).
    Cached: a fleet plans many devices with the same few (width, precision, keep) settings.
    """
    state = {k: v.detach().numpy() for k, v in build_model(spec, seed=0).state_dict().items()}
    value_dtype = codec.ValueDtype.from_name(dtype)
    tensors = {}
    for name, values in state.items():
        mask = magnitude_mask(values, keep) if keep < 1.0 and is_prunable(values.shape) else None
        tensors[name] = codec.SparseTensor.from_dense(values.astype(np.float32), mask)
    size = len(codec.encode(tensors, value_dtype))
    return size, size
