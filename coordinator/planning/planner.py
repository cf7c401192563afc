"""Size each device's submodel and round from its profile.

Memory first: the widest submodel (then, before narrowing further, smaller physical batches via
Opacus virtual steps) whose predicted peak fits `available memory x safety margin`. The peak is
the model's own prediction (`model_memory.memory_model`): the shipped calibration for a built-in
network, the model's own rehearsals (measured on first use, kept per structure) for any other,
under DP-SGD or plain SGD as the run trains. Then transfer: the value precision and sparsity
ladder is walked, download and upload separately (their links differ), until both fit the
device's share of the round deadline at its bandwidth. Then compute: local samples per round are
capped so local training fits the rest of the deadline at the device's measured DP throughput. When nothing fits,
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
from edge_sdk.sizing import DevicePlan, DataSlice
from edge_sdk.models import ModelSpec, SpecError, build_model, model_names, model_spec, tensor_shapes
from edge_sdk.models.network import structure
from edge_sdk.training.local import OPTIMIZER_STATE
from edge_sdk.pruning import is_prunable, magnitude_mask
from edge_sdk.slicing import width_spec

from .memory import MemoryCoefficients, MemoryModel, footprint
from .model_memory import memory_model

WIDTHS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)
# Transfer ladder, walked per direction: the cheapest change first (halve the bytes at little
# cost in accuracy), then sparser and sparser magnitude top-k.
TRANSFER_LADDER = (("fp32", 1.0), ("fp16", 1.0), ("fp16", 0.75), ("fp16", 0.5), ("fp16", 0.35),
                   ("fp16", 0.25), ("fp16", 0.15), ("fp16", 0.1))


@dataclass(frozen=True)
class PlannerSettings:
    deadline_seconds: float = 600.0
    transfer_share: float = 0.5
    safety_margin: float = 0.9
    # Share of the deadline a plan may fill: the rest is slack for payloads that compress worse
    # than the estimate (trained values, scattered indices) and for a slower round than profiled.
    deadline_margin: float = 0.9
    batch_size: int = 48
    min_physical_batch: int = 8
    local_samples: int = 420
    local_epochs: int = 1
    dp: bool = True
    momentum: float = 0.0
    optimizer: str = "sgd"
    slicing: str = "prefix"
    # The run's own settings bound the device's: the download keep never exceeds it (FedP3's
    # global_keep), and a run configured for fp16 is never planned at fp32.
    max_download_keep: float = 1.0
    download_dtype: str = "fp32"
    upload_dtype: str = "fp32"
    # Tensors the device uploads (None: all). Download keep applies to the weights it does not
    # upload (FedP3's Q_i); upload keep to those it does; byte counts follow that layout.
    uploaded: frozenset[str] | None = None
    # Baselines that do not size per device (benchmarks/payoff.py): the widths the memory step
    # may pick from, and whether transfer and local samples adapt to the device at all.
    widths: tuple[float, ...] = WIDTHS
    adapt_transfer: bool = True
    adapt_compute: bool = True
    # Where a model's own memory rehearsals are kept (None: $FEDPRUNE_MEMORY_CACHE, else
    # ~/.cache/fedprune/memory); a coordinator passes a folder of its state dir.
    memory_cache: str | None = None


def optimizer_state(settings: PlannerSettings) -> int:
    """Tensors the size of the parameters the run's optimizer keeps between steps."""
    return OPTIMIZER_STATE[settings.optimizer](settings.momentum)


def memory_for(base: ModelSpec, settings: PlannerSettings,
               coefficients: MemoryCoefficients | MemoryModel) -> MemoryModel:
    """The model's prediction: given as is, or found from the shipped coefficients (whose
    per-parameter terms, floor and margin a model's own rehearsals are fitted on)."""
    if isinstance(coefficients, MemoryModel):
        return coefficients
    return memory_model(base, coefficients, settings.memory_cache)


def runtime_refusal(memory: MemoryModel, settings: PlannerSettings, available: int) -> str | None:
    """Where the runtime alone is over the device's limit, why nothing fits: no model, width or
    flag can help, so the refusal leads with it (the narrowest width's need would only suggest
    that a smaller model might). None where the runtime fits."""
    runtime = memory.runtime_bytes(settings.dp)
    limit = int(available * settings.safety_margin)
    if runtime < limit:
        return None
    # The baseline is measured with Opacus imported either way (memory.py), as a device runs.
    return (f"the runtime alone (Python, torch, Opacus) needs about {runtime / 1e6:.0f} MB of "
            f"this device's {limit / 1e6:.0f} MB ({available / 1e6:.0f} MB available x "
            f"{settings.safety_margin}); no model or width fits, and no flag changes that: "
            f"fedprune needs a device with about {runtime / settings.safety_margin / 1e6:.0f} MB "
            "available and more for the model")


def plan_device(profile: DeviceProfile, base: ModelSpec, model_name: str, settings: PlannerSettings,
                coefficients: MemoryCoefficients | MemoryModel,
                data: DataSlice | None = None) -> DevicePlan:
    memory_limit = int(profile.memory_available_bytes * settings.safety_margin)
    reasons: list[str] = []
    decisions: dict[str, str] = {}
    memory = memory_for(base, settings, coefficients)
    fit = _fit_memory(base, settings, memory, memory_limit)
    if fit.choice is None:
        narrowest = settings.widths[-1]
        need = memory.peak(width_spec(base, narrowest), settings.min_physical_batch,
                           settings.local_samples, settings.dp, optimizer_state(settings))
        runtime = runtime_refusal(memory, settings, profile.memory_available_bytes)
        reasons.append("memory: " + (runtime or (
            f"even width {narrowest} with physical batch {settings.min_physical_batch} needs "
            f"{need / 1e6:.0f} MB, over the memory limit of {memory_limit / 1e6:.0f} MB "
            f"({profile.memory_available_bytes / 1e6:.0f} MB available x {settings.safety_margin})")))
        ratio, physical, peak = narrowest, settings.min_physical_batch, need
    else:
        ratio, physical, peak = fit.choice
    decisions["width"] = (fit.explain(memory_limit, profile.memory_available_bytes,
                                      settings.safety_margin) + f"; peak predicted by {memory.origin}")
    fixed = structure(base).fixed  # every path that builds the model applies the same changes
    if fixed:
        decisions["model"] = f"trained as changed for Opacus's per-sample clipping: {'; '.join(fixed)}"
    spec = width_spec(base, ratio)

    transfer_limit = settings.deadline_seconds * settings.transfer_share
    link = _TransferChoice(spec, settings, profile)
    # A baseline that does not adapt its transfer is held to the deadline only (below).
    if not link.fit(transfer_limit) and settings.adapt_transfer:
        reasons.append(f"transfer: {link.bytes_total:,} bytes at the sparsest setting take "
                       f"{link.seconds:.0f} s, over {transfer_limit:.0f} s "
                       f"({settings.transfer_share:.0%} of the deadline)")
    decisions.update(link.explain(transfer_limit))
    transfer = link.seconds

    compute_left = settings.deadline_seconds * settings.deadline_margin - transfer
    rate = training_rate(profile, spec, settings.dp)
    affordable = int(rate * max(compute_left, 0) / settings.local_epochs)
    samples = min(settings.local_samples, affordable) if settings.adapt_compute else settings.local_samples
    decisions["local_samples"] = (
        f"{samples}: all the device holds; {rate:.0f} samples/s x {max(compute_left, 0):.0f} s "
        f"left after transfer would allow {affordable}" if samples == settings.local_samples else
        f"{samples}: {rate:.0f} samples/s x {max(compute_left, 0):.0f} s left after transfer "
        f"in {settings.deadline_margin:.0%} of the deadline (of {settings.local_samples} held)")
    compute_seconds = samples * settings.local_epochs / rate if rate else 0.0
    if transfer + compute_seconds > settings.deadline_seconds * (1 + 1e-9):
        reasons.append(f"deadline: {transfer:.0f} s of transfer and {compute_seconds:.0f} s of "
                       f"training for {samples} samples are over the {settings.deadline_seconds:g} s "
                       "deadline")
    elif samples < min(settings.batch_size, settings.local_samples):  # a device may hold less
        reasons.append(f"compute: at {rate:.0f} samples/s the {max(compute_left, 0):.0f} s left "
                       f"after transfer allow {samples} local samples, under one batch of "
                       f"{settings.batch_size}")
    steps = settings.local_epochs * math.ceil(samples / settings.batch_size) if samples else 0
    return DevicePlan(
        device_id=profile.name, model=model_name, width_ratio=ratio, slicing=settings.slicing,
        batch_size=settings.batch_size, physical_batch_size=physical, local_steps=steps,
        local_samples=samples, dp=settings.dp, momentum=settings.momentum,
        optimizer=settings.optimizer,
        download_dtype=link.down[0], download_keep=link.down[1], upload_dtype=link.up[0],
        upload_keep=link.up[1], parameters=footprint(spec).parameters,
        predicted_peak_bytes=peak, memory_limit_bytes=memory_limit, download_bytes=link.bytes_down,
        upload_bytes=link.bytes_up, transfer_seconds=transfer,
        compute_seconds=compute_seconds, deadline_seconds=settings.deadline_seconds,
        fits=not reasons, reasons=reasons, decisions=decisions, data=data or DataSlice())


@dataclass(frozen=True)
class _MemoryFit:
    choice: tuple[float, int, int] | None      # (width, physical batch, predicted peak)
    rejected: tuple[float, int, int] | None    # the last wider or larger-batch try, over the limit

    def explain(self, memory_limit: int, available: int, margin: float) -> str:
        limit = f"the {memory_limit / 1e6:.0f} MB limit ({available / 1e6:.0f} MB available x {margin})"
        if self.choice is None:
            return f"nothing fits {limit}"
        ratio, physical, peak = self.choice
        text = f"width {ratio:g}, physical batch {physical}: predicted peak {peak / 1e6:.0f} MB within {limit}"
        if self.rejected is not None:
            r, b, need = self.rejected
            text += f"; width {r:g} at physical batch {b} would need {need / 1e6:.0f} MB"
        return text


def _fit_memory(base: ModelSpec, settings: PlannerSettings, memory: MemoryModel,
                memory_limit: int) -> _MemoryFit:
    physical_options = []
    size = settings.batch_size
    while size > settings.min_physical_batch:
        physical_options.append(size)
        size //= 2
    physical_options.append(min(settings.min_physical_batch, settings.batch_size))
    rejected = None
    for ratio in settings.widths:
        spec = width_spec(base, ratio)
        for physical in physical_options if settings.dp else physical_options[:1]:
            peak = memory.peak(spec, physical, settings.local_samples, settings.dp,
                               optimizer_state(settings))
            if peak <= memory_limit:
                return _MemoryFit((ratio, physical, peak), rejected)
            rejected = (ratio, physical, peak)
    return _MemoryFit(None, rejected)


class _TransferChoice:
    """Download and upload settings walked down the ladder separately: at each step the direction
    that takes longer moves one rung, until both fit the transfer time limit together. A rung that
    saves no byte in a direction (no weight the keep applies to) is skipped for that direction."""

    def __init__(self, spec: ModelSpec, settings: PlannerSettings, profile: DeviceProfile):
        self.spec, self.settings, self.network = spec, settings, profile.network
        names = frozenset(tensor_shapes(spec))
        self.uploaded = names if settings.uploaded is None else names & settings.uploaded
        self.not_uploaded = names - self.uploaded
        self.down_rungs = _rungs(settings.download_dtype, settings.max_download_keep)
        self.up_rungs = _rungs(settings.upload_dtype, 1.0)
        if not settings.adapt_transfer:  # the run's own settings for every device
            self.down_rungs, self.up_rungs = self.down_rungs[:1], self.up_rungs[:1]
        self.down_at = self.up_at = 0
        self.history: list[tuple[tuple[str, float], tuple[str, float], float]] = []
        self._measure()

    @property
    def down(self) -> tuple[str, float]:
        return self.down_rungs[self.down_at]

    @property
    def up(self) -> tuple[str, float]:
        return self.up_rungs[self.up_at]

    def _bytes(self, rung: tuple[str, float], upload: bool) -> int:
        dtype, keep = rung
        if upload:
            return encoded_bytes(self.spec, dtype, keep, self.uploaded, self.uploaded)
        return encoded_bytes(self.spec, dtype, keep, self.uploaded | self.not_uploaded,
                             self.not_uploaded)

    def _measure(self) -> None:
        self.bytes_down = self._bytes(self.down, upload=False)
        self.bytes_up = self._bytes(self.up, upload=True)
        self.seconds_down = self.bytes_down / self.network.downlink_bytes_per_s
        self.seconds_up = self.bytes_up / self.network.uplink_bytes_per_s
        self.history.append((self.down, self.up, self.seconds))

    @property
    def seconds(self) -> float:
        return self.seconds_down + self.seconds_up

    @property
    def bytes_total(self) -> int:
        return self.bytes_down + self.bytes_up

    def _next(self, upload: bool) -> int | None:
        """The next rung in one direction that sends fewer bytes, if any."""
        rungs, at = (self.up_rungs, self.up_at) if upload else (self.down_rungs, self.down_at)
        now = self._bytes(rungs[at], upload)
        for later in range(at + 1, len(rungs)):
            if self._bytes(rungs[later], upload) < now:
                return later
        return None

    def fit(self, limit: float) -> bool:
        while self.seconds > limit:
            down, up = self._next(upload=False), self._next(upload=True)
            if down is None and up is None:
                return False
            if up is None or (down is not None and self.seconds_down >= self.seconds_up):
                self.down_at = down
            else:
                self.up_at = up
            self._measure()
        return True

    def explain(self, limit: float) -> dict[str, str]:
        net = self.network
        share = f"{limit:.0f} s transfer limit ({self.settings.transfer_share:.0%} of the " \
                f"{self.settings.deadline_seconds:g} s deadline)"
        first = self.history[0]
        denser = "" if len(self.history) == 1 else \
            f"; {first[0][0]} keep {first[0][1]:g} down and {first[1][0]} keep {first[1][1]:g} up " \
            f"would take {first[2]:.0f} s in all"
        return {
            "download": f"{self.down[0]} keep {self.down[1]:g}: {self.bytes_down:,} B at "
                        f"{net.downlink_bytes_per_s / 1e3:.0f} kB/s down = {self.seconds_down:.1f} s; "
                        f"{share}{denser}",
            "upload": f"{self.up[0]} keep {self.up[1]:g}: {self.bytes_up:,} B at "
                      f"{net.uplink_bytes_per_s / 1e3:.0f} kB/s up = {self.seconds_up:.1f} s",
        }


def _rungs(floor_dtype: str, max_keep: float) -> tuple[tuple[str, float], ...]:
    """The ladder within the run's bounds: never above `max_keep`, never finer than fp16 when
    the run asks for fp16. The first rung is the densest allowed setting."""
    rungs = [(dtype if floor_dtype == "fp32" else "fp16", min(keep, max_keep))
             for dtype, keep in TRANSFER_LADDER]
    return tuple(dict.fromkeys(rungs))  # in order, without repeats


def training_rate(profile: DeviceProfile, spec: ModelSpec, dp: bool) -> float:
    """Samples per second the device trains `spec` at: the profile measures its reference model
    (`compute.reference_model`, on 28x28 grey images, 10 classes); cost scales with forward MACs."""
    rate = profile.compute.dp_samples_per_s if dp else profile.compute.samples_per_s
    return rate * _reference_macs(profile.compute.reference_model) / max(footprint(spec).macs, 1)


@lru_cache(maxsize=8)
def _reference_macs(name: str) -> int:
    try:
        return footprint(model_spec(name, (1, 28, 28), 10)).macs
    except SpecError:
        raise ValueError(f"the profile's compute.reference_model {name[:64]!r} is not a model this "
                         f"coordinator knows ({', '.join(model_names())}); measure the device again with "
                         "`fedprune-edge profile`") from None


@lru_cache(maxsize=512)
def encoded_bytes(spec: ModelSpec, dtype: str, keep: float, names: frozenset[str],
                  pruned: frozenset[str]) -> int:
    """Exact encoded size of the tensors `names` of this submodel, those in `pruned` (weights
    and kernels only) at magnitude top-k `keep` (codec, not estimates).

    Values come from a fresh initialisation; sizes depend on counts and index layout, which the
    mask fixes, not on the trained values (zstd gains little on float mantissas). Cached: a
    fleet plans many devices with the same few settings.
    """
    state = {k: v.detach().numpy() for k, v in build_model(spec, seed=0).state_dict().items()
             if k in names}
    tensors = {}
    for name, values in state.items():
        prune = name in pruned and keep < 1.0 and is_prunable(values.shape)
        mask = magnitude_mask(values, keep) if prune else None
        tensors[name] = codec.SparseTensor.from_dense(values.astype(np.float32), mask)
    return len(codec.encode(tensors, codec.ValueDtype.from_name(dtype)))


def payload_bytes(spec: ModelSpec, dtype: str, keep: float) -> tuple[int, int]:
    """(download, upload) bytes of the whole submodel with `keep` on every weight."""
    names = frozenset(tensor_shapes(spec))
    size = encoded_bytes(spec, dtype, keep, names, names)
    return size, size
