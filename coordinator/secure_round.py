"""Secure aggregation (SecAgg+) with distributed discrete Gaussian noise in `fedprune simulate`:
the coordinator's side of a round, and the run's noise and privacy ledger.

A round: the selected devices train as always (plain SGD unless DP-SGD is asked for as well);
each keeps its upload to itself. The driver then runs SecAgg+'s four stages (keys, shares,
masked inputs, unmasking) between the device objects (`edge_sdk/secure_update.py`) and one
`SecAggServer`, relaying real message bytes as the coordinator would over MQTT. The server
learns the sum of the surviving devices' clipped, quantized, noised changes per global
coordinate and, per coordinate, how many of them hold it; never one device's input.

The mean change per coordinate is that sum divided by the number of inputs in it that hold the
coordinate (`SecAggResult.holders`: the server knows who sent a masked input and every support is
public), exactly: without noise the new global model is the unweighted mean of the devices'
models over each coordinate's holders, to quantization error. A sample count is no weight here
(it would be the device's to claim, and the sum's sensitivity is the clip). A coordinate with
fewer than `min_holders` inputs in the sum is withheld: it keeps its global value. The division
by a public count is post-processing of the noised sum; the privacy is the sum's.

Privacy: user-level DP of each device's round contribution (its update replaced by any other of
L2 norm at most `clip_norm`), against the coordinator and anyone who sees a global model. The
per-device noise is sized so that `min_holders` shares, the fewest behind any released
coordinate, carry the noise of the target (`edge_sdk/secagg/accounting.py`: Kairouz, Liu and
Steinke's bound as an effective Gaussian noise multiplier), composed over the planned rounds at
sampling rate 1: the coordinator draws the devices, so amplification by sampling does not hold
against it. Each round is accounted with the noise shares really behind its least-held released
coordinate. What a device's participation reveals (the coordinator sees who takes part) is not
protected.

Simulator-only in this version: the service refuses `[secure_aggregation]` (its MQTT stages are
not wired), as do a planned fleet (its planner may choose magnitude top-k uploads), Byzantine
simulation and the Ray backend.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from edge_sdk.secagg import SecAggError, SecAggResult, SecAggServer
from edge_sdk.secagg.accounting import effective_noise_multiplier, noise_for_epsilon
from edge_sdk.secagg.discrete_gaussian import MAX_SIGMA
from edge_sdk.secagg.params import default_degree
from edge_sdk.secagg.quantize import QuantizeSettings, decode
from edge_sdk.secure_update import SecureDevice, SecureLayout
from edge_sdk.settings import Settings

from .central_dp import calibrate_noise, central_epsilon


class SecureAggregationError(ValueError):
    """A secure-aggregation configuration or round that cannot be run; the text says why."""


class SecureAggregationSettings(Settings):
    """The run's `[secure_aggregation]` section."""

    enabled: bool = False
    # A coordinate's aggregate is released only when at least this many inputs in the sum hold
    # it; the noise is sized for this many shares.
    min_holders: int = Field(2, ge=2)
    # Shamir threshold t: a fraction (0.5, 1] of a closed neighbourhood, or a count (> 1). None:
    # from `dropout_tolerance`.
    threshold: float | None = Field(None, gt=0.5)
    # The share of a closed neighbourhood that may drop with the round still completing.
    dropout_tolerance: float = Field(0.3, ge=0, lt=0.5)
    bits: int = Field(32, ge=8, le=32)          # the modulus 2**bits of each masked value
    clip_norm: float = Field(1.0, gt=0)         # C: L2 bound of one device's change per round
    noise_multiplier: float | None = Field(None, gt=0)  # of the summed noise, over min_holders
    target_epsilon: float | None = Field(None, gt=0)    # over the planned rounds, at `delta`
    delta: float = Field(1e-5, gt=0, lt=1)
    # Record-level DP-SGD on the device as well (refused unless asked for: the distributed
    # noise is what protects the update; DP-SGD adds its own noise for a second guarantee).
    with_dp_sgd: bool = False
    # The simulator's dropouts, as shares of a round's devices: after sharing keys and before
    # sending a masked input (left out of the sum), and after sending it (recovered).
    drop_before_input: float = Field(0.0, ge=0, lt=1)
    drop_after_input: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _one_noise_source(self):
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("set secure_aggregation.noise_multiplier or "
                             "secure_aggregation.target_epsilon, not both")
        count = self.threshold is not None and self.threshold > 1
        if count and self.threshold != int(self.threshold):
            raise ValueError("secure_aggregation.threshold: a fraction in (0.5, 1] of a device's "
                             f"neighbourhood, or a whole count of devices (got {self.threshold})")
        return self

    @property
    def noised(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    def threshold_for(self, closed: int) -> int:
        """t for a closed neighbourhood of `closed` devices: the configured count or fraction,
        else the most that still tolerates `dropout_tolerance` of them dropping; at least a
        majority (the library's condition)."""
        if self.threshold is None:
            t = closed - math.floor(self.dropout_tolerance * closed)
        elif self.threshold > 1:
            t = int(self.threshold)
        else:
            t = math.ceil(self.threshold * closed - 1e-9)
        t = max(t, closed // 2 + 1)
        if t > closed:
            raise SecureAggregationError(
                f"secure_aggregation.threshold {self.threshold:g} is more than the {closed} "
                "devices of a neighbourhood this round: lower it or draw more devices a round")
        return t


def conflict(settings: Any, bounded_updates: bool) -> str | None:
    """Why secure aggregation cannot run with the rest of `settings` (a LearningSettings), or
    None. `bounded_updates`: the strategy uploads signs (HideNseek)."""
    secure = settings.secure_aggregation
    if not secure.enabled:
        return None
    if settings.central_dp.enabled:
        return ("secure_aggregation: central_dp is on as well; choose one: secure aggregation adds "
                "the noise on the devices and hides each update from the coordinator, central DP "
                "trusts the coordinator with them (turn one section off)")
    if settings.aggregator.rule != "mean":
        return (f"secure_aggregation: aggregator.rule {settings.aggregator.rule!r} needs each "
                "device's update, and the coordinator only learns their sum under secure "
                "aggregation; use aggregator.rule = \"mean\"")
    if bounded_updates:
        return (f"secure_aggregation: strategy {settings.strategy!r} uploads signs at indices of "
                "its own mask, not changes that can be summed; use a strategy that uploads "
                "values or changes")
    if settings.dp.enabled and not secure.with_dp_sgd:
        return ("secure_aggregation: dp (record-level DP-SGD) is on as well; the distributed noise "
                "already protects what a device sends, so DP-SGD is off under secure aggregation "
                "unless asked for: set dp.enabled = false, or secure_aggregation.with_dp_sgd = "
                "true to run both")
    return None


def check_uploads(strategy: Any) -> None:
    """A strategy whose devices upload nothing (LocalOnly) has nothing to aggregate securely."""
    if not strategy.plan(0, 1, 1).uploaded:
        raise SecureAggregationError(f"secure_aggregation: strategy {strategy.name!r} uploads "
                                     "nothing, so there is no sum to aggregate; turn "
                                     "secure_aggregation off")


def simulation_conflict(config: Any) -> str | None:
    """Why a simulation cannot run secure aggregation (a SimulationSettings), or None."""
    if not config.secure_aggregation.enabled:
        return None
    per_round = max(1, round(config.fraction * config.clients))
    if config.fleet:
        return ("secure_aggregation: a fleet's planner may give a device a magnitude top-k upload "
                "(upload keep below 1), whose entries depend on its data; run without fleet")
    if config.byzantine.fraction:
        return ("secure_aggregation: byzantine devices are simulated on plain uploads; set "
                "byzantine.fraction = 0")
    if config.backend != "inprocess":
        return (f"secure_aggregation: backend {config.backend!r}: the secure stages run with the "
                "devices in the driver's process in this version; use backend = \"inprocess\"")
    if per_round < max(2, config.secure_aggregation.min_holders):
        return (f"secure_aggregation: {per_round} devices a round (fraction x clients), "
                f"min_holders is {config.secure_aggregation.min_holders}: no coordinate could be "
                "released; draw more devices a round or lower min_holders")
    return None


# --- noise and scale ----------------------------------------------------------------------------
def _scale_for(clip: float, bits: int, devices: int, per_unit_sigma: float) -> float:
    """The largest power-of-two scale whose sums over `devices` stay well inside 2**(bits-1)
    (a quarter of it: `check_range` must pass whatever the rounding draws) and whose per-device
    sigma (`per_unit_sigma` x scale) stays within the sampler's limit."""
    scale = 2.0 ** 40
    while scale > 2.0 ** -20:
        sigma = per_unit_sigma * scale
        bound = devices * (clip * scale + 1) + 8 * math.sqrt(devices) * sigma
        if bound < 2 ** (bits - 2) and sigma <= MAX_SIGMA / 2:
            return scale
        scale /= 2
    raise SecureAggregationError(f"secure_aggregation.bits {bits} cannot carry sums of {devices} "
                                 "devices: raise bits")


def plan_quantization(settings: SecureAggregationSettings, dim: int, devices: int,
                      rounds: int) -> QuantizeSettings:
    """The run's scale and per-device sigma: noise for `min_holders` shares (the fewest behind a
    released coordinate) at the target over `rounds` rounds at sampling rate 1, or at the given
    noise multiplier; `dim`: the most coordinates one device holds (the rounding's bound grows
    with it); `devices`: the most inputs one sum takes."""
    shares, clip = settings.min_holders, settings.clip_norm
    if not settings.noised:
        return QuantizeSettings(clip, _scale_for(clip, settings.bits, devices, 0.0), settings.bits)
    z = settings.noise_multiplier or calibrate_noise(settings.target_epsilon, settings.delta, 1.0,
                                                     rounds)
    # sigma ~ z x sensitivity / sqrt(shares), the sensitivity ~ clip x scale (plus rounding)
    scale = _scale_for(clip, settings.bits, devices, 1.5 * z * clip / math.sqrt(shares))
    base = QuantizeSettings(clip, scale, settings.bits)
    if settings.noise_multiplier is not None:
        sigma = z * base.sensitivity(dim) / math.sqrt(shares)
    else:
        try:
            sigma = noise_for_epsilon(settings.target_epsilon, base, dim, shares, rounds, 1.0,
                                      settings.delta)
        except SecAggError as exc:
            raise SecureAggregationError(f"secure_aggregation.target_epsilon: {exc}") from None
    planned = replace(base, noise_sigma=sigma)
    try:
        planned.check_range(devices)
    except SecAggError as exc:
        raise SecureAggregationError(f"secure_aggregation: {exc}") from None
    return planned


# --- the coordinator's side of a round --------------------------------------------------------
def global_offsets(state: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Where each tensor starts in the round's global flat vector (the global state's order)."""
    offsets, at = {}, 0
    for name, value in state.items():
        offsets[name] = at
        at += int(np.asarray(value).size)
    return offsets


def layout_of(task: Any, pipeline: Any, offsets: Mapping[str, int]) -> SecureLayout:
    """A device's support from its plan alone: every entry of every tensor it uploads, at its
    width (the slice map's global indices), in the global flat vector."""
    view = pipeline.view(task.width_ratio)
    coordinates = []
    for name in task.plan.uploaded:
        local = np.arange(int(np.prod(view.shapes[name], dtype=np.int64)), dtype=np.int64) \
            if view.smap is None else np.asarray(view.smap[name], np.int64).reshape(-1)
        coordinates.append((name, offsets[name] + local))
    return SecureLayout(tuple(coordinates))


def check_task(task: Any) -> None:
    """Refuses a plan whose upload would depend on the device's data (magnitude top-k)."""
    if task.plan.upload_keep < 1:
        raise SecureAggregationError(
            f"secure_aggregation: device {task.device_index}'s plan uploads the "
            f"{task.plan.upload_keep:g} of entries that changed most, a support that depends on its data; secure aggregation "
            "needs supports known before training (upload keep 1)")


# Called with ("coordinator", stage, device id, bytes) for every message the server sends or is
# handed and ("coordinator", "result", None, SecAggResult) once a round: everything the
# coordinator holds of a round; and with ("device", "input", device id, values) for what each
# device masks (its own, never sent): tests compare the two.
ServerObserver = Callable[[str, str, "str | None", Any], None]


@dataclass
class SecureAggregate:
    """A committed round's aggregate, as RoundCombiner's mechanism (`central`): the mean change
    per coordinate where released, 0 (the global value kept) where withheld."""

    mean: dict[str, np.ndarray]

    def mean_change(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        return {name: self.mean[name].reshape(shape) for name, shape in shapes.items()}


@dataclass
class _Member:
    device: SecureDevice
    layout: SecureLayout
    down: int = 0
    up: int = 0


@dataclass
class SecureRound:
    """One round's devices, their supports and the relay between them and the server."""

    run: SecureAggregation
    global_state: Mapping[str, np.ndarray]
    members: dict[str, _Member] = field(default_factory=dict)
    neighbourhood: int = 0  # devices in a closed neighbourhood (SecAgg+'s graph degree + 1)

    def join(self, device_index: int, client: Any, task: Any, pipeline: Any, outcome: Any) -> None:
        """A device that trained: its upload stays with it; its support comes from its plan."""
        check_task(task)
        device = SecureDevice(device_id(device_index), client)
        device.keep_upload(outcome, task.plan.uploaded)
        self.members[device.device_id] = _Member(
            device, layout_of(task, pipeline, global_offsets(self.global_state)))

    def aggregate(self, observe: ServerObserver | None = None
                  ) -> tuple[SecureAggregate | None, dict[str, Any]]:
        """The four stages among the round's devices; (the aggregate, the round's report), or
        (None, the report with why) when the round cannot be unmasked."""
        started = time.perf_counter()
        report: dict[str, Any] = {"devices": len(self.members), "bits": self.run.quantize.bits}
        if len(self.members) < 2:
            report.update(committed=False, reason=f"{len(self.members)} device(s) trained; "
                          "secure aggregation needs at least 2")
            return None, report
        try:
            result, stages, dropped = self._stages(observe)
        except SecAggError as exc:
            report.update(committed=False, reason=str(exc), seconds=time.perf_counter() - started)
            return None, report
        if observe is not None:
            observe("coordinator", "result", None, result)
        mean = self.run.mean(self.global_state, result)
        withheld = int(np.count_nonzero((result.holders > 0) & ~result.released))
        report.update(committed=True, dropped_before_input=dropped[0],
                      dropped_after_input=dropped[1], recovered=len(dropped[1]),
                      survivors=len(result.survivors), withheld_coordinates=withheld,
                      released_coordinates=int(np.count_nonzero(result.released)),
                      noise_shares=result.min_released_holders, stage_bytes=stages["bytes"],
                      stage_seconds=stages["seconds"], threshold=self.run.threshold_used,
                      neighbourhood=self.neighbourhood,
                      tolerated_dropouts=self.neighbourhood - self.run.threshold_used,
                      **self.run.spend(result.min_released_holders))
        report["seconds"] = time.perf_counter() - started
        return mean, report

    def bytes_by_device(self) -> dict[str, tuple[int, int]]:
        """(bytes down, bytes up) each device exchanged in the secure stages."""
        return {name: (m.down, m.up) for name, m in self.members.items()}

    def _stages(self, observe: ServerObserver | None):
        members = self.members
        names = sorted(members)
        server = self.run.server_for({d: members[d].layout.support for d in names})
        self.neighbourhood = default_degree(len(names)) + 1
        before, after = _dropouts(names, self.run.settings, self.run.rng)
        seconds: dict[str, float] = {}
        sizes = {stage: 0 for stage in ("setup", "advertise", "keys", "shares", "forward",
                                        "masked", "unmask_request", "unmask")}

        def relay(stage: str, device: str, message: bytes, sent: bool) -> bytes:
            """A message passing the coordinator, counted (`sent`: to the device) and observed."""
            sizes[stage] += len(message)
            if sent:
                members[device].down += len(message)
            else:
                members[device].up += len(message)
            if observe is not None:
                observe("coordinator", stage, device, message)
            return message

        def down(stage: str, device: str, message: bytes) -> bytes:
            return relay(stage, device, message, sent=True)

        def up(stage: str, device: str, message: bytes) -> bytes:
            return relay(stage, device, message, sent=False)

        clock = time.perf_counter()
        for d in names:
            server.receive_advertise(up("advertise", d, members[d].device.setup(
                down("setup", d, server.setup_message(d)), members[d].layout, self.run.quantize)))
        seconds["keys"] = time.perf_counter() - clock
        clock = time.perf_counter()
        for d, message in server.keys_messages().items():
            shares = members[d].device.share_keys(down("keys", d, message))
            server.receive_shares(up("shares", d, shares))
        seconds["shares"] = time.perf_counter() - clock
        clock = time.perf_counter()
        for d, message in server.forward_messages().items():
            masked = members[d].device.mask_input(down("forward", d, message))
            if observe is not None:
                observe("device", "input", d, members[d].device.quantized)
            if d not in before:
                server.receive_masked_input(up("masked", d, masked))
        seconds["masked_inputs"] = time.perf_counter() - clock
        clock = time.perf_counter()
        for d, message in server.unmask_requests().items():
            answer = members[d].device.unmask(down("unmask_request", d, message))
            if d not in after:
                server.receive_unmask(up("unmask", d, answer))
        result = server.result()
        seconds["unmasking"] = time.perf_counter() - clock
        return result, {"bytes": sizes, "seconds": seconds}, (sorted(before), sorted(after))


def device_id(device_index: int) -> str:
    return f"device-{device_index:06d}"


def _dropouts(names: list[str], settings: SecureAggregationSettings, rng: np.random.Generator
              ) -> tuple[set[str], set[str]]:
    """The simulated dropouts: round(share x devices) before their masked input, as many again
    (of the others) after it; drawn from the run's seeded generator (which devices drop is no
    secret)."""
    order = [names[i] for i in rng.permutation(len(names))]
    k_before = round(settings.drop_before_input * len(names))
    k_after = round(settings.drop_after_input * len(names))
    return set(order[:k_before]), set(order[k_before:k_before + k_after])


class SecureAggregation:
    """A run's secure aggregation: its quantization and noise, and its privacy ledger (one
    effective noise multiplier per committed round, at sampling rate 1)."""

    def __init__(self, settings: SecureAggregationSettings, global_state: Mapping[str, np.ndarray],
                 devices_per_round: int, rounds: int, seed: int = 0):
        """`seed`: the run's; the simulated dropouts draw from a stream of their own, so turning
        secure aggregation on leaves the run's draw of devices as it was."""
        self.settings = settings
        self.rng = np.random.default_rng([seed, 0x5EC466])
        self.dim = sum(int(np.asarray(v).size) for v in global_state.values())
        self.quantize = plan_quantization(settings, self.dim, devices_per_round, rounds)
        self.history: list[tuple[float, float]] = []
        self.threshold_used: int | None = None

    def round(self, global_state: Mapping[str, np.ndarray]) -> SecureRound:
        return SecureRound(self, global_state)

    def server_for(self, supports: Mapping[str, np.ndarray]) -> SecAggServer:
        """The round's server over these devices' supports: SecAgg+'s degree for their number,
        the threshold the settings give its neighbourhoods, min_holders at most the devices.
        The simulator's driver and the service's stages both open their round with it."""
        n = len(supports)
        degree = default_degree(n)
        self.threshold_used = self.settings.threshold_for(degree + 1)
        return SecAggServer(supports, self.dim, bits=self.quantize.bits,
                            threshold=self.threshold_used, degree=degree,
                            min_holders=min(self.settings.min_holders, n))

    def mean(self, global_state: Mapping[str, np.ndarray], result: SecAggResult) -> SecureAggregate:
        """The decoded sum over each released coordinate's holders, per global tensor."""
        total = decode(result.sum, self.quantize)
        change = np.zeros(self.dim, np.float64)
        on = result.released
        change[on] = total[on] / result.holders[on]
        offsets = global_offsets(global_state)
        return SecureAggregate({name: change[offsets[name]:offsets[name] + np.asarray(v).size]
                                for name, v in global_state.items()})

    def spend(self, shares: int) -> dict[str, Any]:
        """Records a committed round with `shares` noise shares behind its least-held released
        coordinate; what the results carry of it."""
        entry: dict[str, Any] = {"clip_norm": self.settings.clip_norm,
                                 "scale": self.quantize.scale,
                                 "noise_sigma": self.quantize.noise_sigma}
        if not self.settings.noised or shares < 1:
            return {**entry, "epsilon": None}
        z = effective_noise_multiplier(self.quantize, self.dim, shares)
        self.history.append((1.0, z))
        return {**entry, "noise_multiplier": z, "delta": self.settings.delta,
                "epsilon": central_epsilon(self.history, self.settings.delta)}
