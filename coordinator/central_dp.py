"""User-level central differential privacy: DP-FedAvg (McMahan, Ramage, Talwar and Zhang,
"Learning Differentially Private Recurrent Language Models", ICLR 2018) for a trusted coordinator.

What is protected: everything one device contributes over the whole run (all its records at
once), in every global model the coordinator releases, against the devices and anyone who sees
a global model or an export. Not against the coordinator itself, which sees each update in the
clear: that is what "trusted" means here (secure aggregation with distributed noise is the mode
that does not need it).

The mechanism, each round: every accepted update is turned into the device's change from the
state it started from, over the coordinates it uploaded, and clipped to L2 norm `clip_norm` C;
the clipped changes are summed unweighted, so adding or removing one device moves the sum by at
most C (user-level sensitivity C: a device's sample count is not a weight, or a device could
claim more weight than the clip allows); Gaussian noise N(0, z^2 C^2) is added to every
coordinate some device of the population holds; and the sum is divided by a fixed denominator.

The denominator is the expected number of contributions, never the realised count: the count
tells whether a given device took part (one more or one fewer), and dividing by it would make
the released model a function of participation that the Gaussian's analysis does not cover
(McMahan et al.'s fixed-denominator estimator, their Section 3). With per-device submodels a
coordinate is held by only some devices (width prefixes, FedRolex windows, FedP3's layer
groups), so the denominator is per coordinate: with each of the population's devices drawn
with probability q, the expected number of updates carrying coordinate e is q * H(e), H(e) the
number of the population's devices whose plan for the round uploads e (`holder_counts`). That
is exact under Poisson sampling, unbiased for e's mean change, and depends on the plans alone,
never on who was drawn or what they sent. A coordinate no device holds gets neither noise nor
change. What a device's plan holds is decided before it trains (tensor and width); an upload
keep below 1 sends a data-dependent part of it, which is fine: a coordinate left out adds 0 to
the sum, and the clip bounds what is sent.

Accounting: each released round is one Poisson-subsampled Gaussian (rate q = devices per round
/ fleet size, noise multiplier z), composed over rounds by dp-accounting's RDP accountant over a
wide range of orders. `fedprune simulate` draws devices by Poisson sampling under central DP,
so the bound is exact there; the service draws a fixed number k of the M eligible devices and
accounts it at q = k/M, the usual practice (TensorFlow Federated's DP-FedAvg does the same) but
not a proof for sampling without replacement. The draw and the noise come from an OS-seeded
generator: a run's seed is in its configuration, and noise or a draw anyone can replay protects
nothing.

Where it is useful: the noise on the mean change is z C / (q N) per coordinate, against a clipped
signal of norm at most C, so the noise-to-signal ratio is about z sqrt(d) / (q N) for d noised
coordinates. At epsilon near 8 over tens of rounds z is near 1, which takes thousands of
devices per round for a model of 10^5 parameters; with tens of devices only an epsilon in the
thousands leaves a model that learns (tests/test_central_dp.py measures one).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from edge_sdk import codec
from edge_sdk.settings import Settings
from edge_sdk.training.privacy import RDP_ORDERS

from .aggregation import AggregationError

# The device ledger's orders widened at both ends: at a generous epsilon (z well below 1) the
# best order lies near 1, at a strict one with few rounds far above 1024.
CENTRAL_RDP_ORDERS = (1.001, 1.002, 1.005, *RDP_ORDERS, 1536, 2048, 4096)
# The slack a calibrated budget allows: calibration meets the target only to its tolerance.
BUDGET_SLACK = 1.01


class CentralDPError(ValueError):
    """A central-DP configuration or round that cannot be run; the text says why."""


class CentralDPSettings(Settings):
    """The run's `[central_dp]` section: a noise multiplier, or a target epsilon over the planned
    rounds (the noise is then calibrated to spend exactly that), or neither (off)."""

    clip_norm: float = Field(1.0, gt=0)          # C: L2 bound of one device's change per round
    noise_multiplier: float | None = Field(None, gt=0)   # z: noise std is z * C on the sum
    target_epsilon: float | None = Field(None, gt=0)     # over the planned rounds, at `delta`
    delta: float = Field(1e-5, gt=0, lt=1)
    # The number of devices rounds are drawn from, for q = devices per round / fleet_size. The
    # simulator's is its `clients`; the service needs it to calibrate a target_epsilon (it
    # accounts each round at the eligible devices it really drew from).
    fleet_size: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_noise_source(self):
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("set central_dp.noise_multiplier or central_dp.target_epsilon, "
                             "not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    def resolve_noise(self, sample_rate: float, rounds: int) -> float:
        """The noise multiplier: the given one, or the least that spends target_epsilon over
        `rounds` rounds at `sample_rate`."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        return calibrate_noise(self.target_epsilon, self.delta, sample_rate, rounds)


def conflict(settings: Any, bounded_updates: bool) -> str | None:
    """Why central DP cannot run with the rest of `settings` (a LearningSettings), or None.
    `bounded_updates`: the strategy's own (its uploads are signs, not changes a norm bounds)."""
    if not settings.central_dp.enabled:
        return None
    if settings.aggregator.rule != "mean":
        return (f"central_dp: aggregator.rule {settings.aggregator.rule!r} cannot be combined "
                "with central DP, whose noise is sized for the clipped sum of the updates (a "
                "median or trimmed mean of them has another sensitivity, and clipping already "
                "bounds what one device can do); use aggregator.rule = \"mean\"")
    if bounded_updates:
        return (f"central_dp: strategy {settings.strategy!r} uploads signs, one bit per weight, "
                "not changes of weights that a clip norm bounds and Gaussian noise can hide; "
                "use a strategy that uploads values or changes")
    return None


# --- accounting --------------------------------------------------------------------------------
def _round_event(sample_rate: float, noise_multiplier: float):
    import dp_accounting

    return dp_accounting.PoissonSampledDpEvent(sample_rate,
                                               dp_accounting.GaussianDpEvent(noise_multiplier))


def _accountant():
    from dp_accounting.rdp import rdp_privacy_accountant

    return rdp_privacy_accountant.RdpAccountant(list(CENTRAL_RDP_ORDERS))


class _Unconverged(logging.Filter):
    """dp-accounting's series for a fractional order near 1 stops after 1000 terms at little
    noise; it then leaves that order out (sound: the bound is taken over the others) and warns
    once per order and query, which would fill a run's log with a line per order a round."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("_compute_log_a_frac failed to converge")


@contextlib.contextmanager
def _unconverged_orders_unsaid():
    absl, quiet = logging.getLogger("absl"), _Unconverged()
    absl.addFilter(quiet)
    try:
        yield
    finally:
        absl.removeFilter(quiet)


def central_epsilon(history: Sequence[tuple[float, float]], delta: float) -> float:
    """User-level epsilon at `delta` of the released rounds, each (sample rate, noise
    multiplier); rounds alike are composed at once (RDP composition is additive)."""
    if not history:
        return 0.0
    alike = Counter((float(q), float(z)) for q, z in history)
    return _epsilon(tuple(sorted(alike.items())), float(delta))


@functools.lru_cache(maxsize=256)
def _epsilon(alike: tuple[tuple[tuple[float, float], int], ...], delta: float) -> float:
    """Cached: a query costs up to a second (dp-accounting sums its series for ~100 orders in
    Python), and the service asks again at every round it considers opening."""
    import dp_accounting

    accountant = _accountant()
    with _unconverged_orders_unsaid():
        for (rate, noise), count in alike:
            accountant.compose(dp_accounting.SelfComposedDpEvent(_round_event(rate, noise), count))
        return float(accountant.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """The least noise multiplier whose `rounds` rounds at `sample_rate` spend at most
    `target_epsilon` (dp-accounting's calibration, then nudged up until the ledger agrees)."""
    import dp_accounting

    with _unconverged_orders_unsaid():
        noise = float(dp_accounting.calibrate_dp_mechanism(
            _accountant, lambda z: dp_accounting.SelfComposedDpEvent(
                _round_event(sample_rate, z), rounds), target_epsilon, delta, tol=1e-7))
    while central_epsilon([(sample_rate, noise)] * rounds, delta) > target_epsilon:
        noise *= 1 + 1e-6  # Brent's tolerance may leave it a hair on the wrong side
    return noise


class CentralLedger:
    """The coordinator's spending: one (sample rate, noise multiplier) per released round."""

    def __init__(self, settings: CentralDPSettings, noise_multiplier: float,
                 history: Iterable[tuple[float, float]] = ()):
        self.settings, self.noise_multiplier = settings, noise_multiplier
        self.history = [(float(q), float(z)) for q, z in history]

    def epsilon(self, extra: Sequence[tuple[float, float]] = ()) -> float:
        return central_epsilon([*self.history, *extra], self.settings.delta)

    def over_budget(self, sample_rate: float) -> str | None:
        """Why one more round at `sample_rate` is not released (a target_epsilon spent), or None."""
        target = self.settings.target_epsilon
        if target is None:
            return None
        after = self.epsilon([(sample_rate, self.noise_multiplier)])
        if after <= target * BUDGET_SLACK:
            return None
        return (f"central DP budget: one more round at sample rate {sample_rate:.4g} would bring "
                f"the coordinator's epsilon to {after:.3f}, over central_dp.target_epsilon "
                f"{target:g} at delta {self.settings.delta:g}")

    def released(self, sample_rate: float) -> dict[str, Any]:
        """What results and round summaries carry as `central_dp` once one more round at
        `sample_rate` is released (not recorded: the service records it from its store)."""
        return {"epsilon": self.epsilon([(sample_rate, self.noise_multiplier)]),
                "delta": self.settings.delta, "noise_multiplier": self.noise_multiplier,
                "clip_norm": self.settings.clip_norm, "rounds": len(self.history) + 1,
                "sample_rate": float(sample_rate)}

    def spend(self, sample_rate: float) -> dict[str, Any]:
        """Record a released round; returns what `released` says of it."""
        report = self.released(sample_rate)
        self.history.append((float(sample_rate), self.noise_multiplier))
        return report


def released_history(summaries: Iterable[Mapping[str, Any] | None]) -> list[tuple[float, float]]:
    """(sample rate, noise multiplier) of every released round among stored round summaries
    (the service's committed rounds carry `central_dp`)."""
    history = []
    for summary in summaries:
        entry = (summary or {}).get("central_dp")
        if isinstance(entry, dict) and "epsilon" in entry:
            history.append((float(entry["sample_rate"]), float(entry["noise_multiplier"])))
    return history


# --- the mechanism -------------------------------------------------------------------------------
def holder_counts(tasks: Iterable[Any], pipeline: Any) -> dict[str, np.ndarray]:
    """H(e): per global tensor (flat), how many of `tasks` (one per device of the population,
    from `pipeline`, a RoundPipeline) upload each coordinate. Devices alike (same width, same
    uploaded tensors) are counted at once."""
    alike = Counter((task.width_ratio, tuple(task.plan.uploaded)) for task in tasks)
    counts: dict[str, np.ndarray] = {}
    for (ratio, uploaded), devices in alike.items():
        view = pipeline.view(ratio)
        for name in uploaded:
            size = int(np.prod(pipeline.global_state[name].shape, dtype=np.int64))
            held = counts.setdefault(name, np.zeros(size, dtype=np.int64))
            held[slice(None) if view.smap is None else view.smap[name].reshape(-1)] += devices
    return counts


def clipped(change: Mapping[str, codec.SparseTensor], clip_norm: float
            ) -> dict[str, codec.SparseTensor]:
    """`change` scaled to L2 norm at most `clip_norm`, over all its coordinates at once."""
    norm = float(np.sqrt(sum(np.sum(t.values.astype(np.float64) ** 2) for t in change.values())))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: codec.SparseTensor(t.shape, t.indices, t.values.astype(np.float64) * scale)
            for name, t in change.items()}


class CentralRound:
    """One round of DP-FedAvg: clipped changes summed, noised and divided by q * H(e)."""

    def __init__(self, clip_norm: float, noise_multiplier: float, sample_rate: float,
                 holders: Mapping[str, np.ndarray], rng: np.random.Generator | None = None):
        """`holders`: H(e) per tensor (`holder_counts`); `rng`: the noise's generator, OS-seeded
        unless a test gives one."""
        if not 0 < sample_rate <= 1:
            raise CentralDPError(f"central DP: the sample rate must be in (0, 1], got {sample_rate}")
        self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier
        self.sample_rate = sample_rate
        self.holders = {name: np.asarray(h, dtype=np.int64).reshape(-1) for name, h in holders.items()}
        self.rng = rng if rng is not None else np.random.default_rng()
        self.sums = {name: np.zeros(h.size, dtype=np.float64) for name, h in self.holders.items()}
        self.updates = 0

    def add(self, change: Mapping[str, codec.SparseTensor]) -> None:
        """One device's change (global indices), clipped and summed; a change on a coordinate
        no device of the population holds is refused whole (its plan is not the round's)."""
        for name, tensor in change.items():
            held = self.holders.get(name)
            where = slice(None) if tensor.indices is None else tensor.indices
            if held is None or (tensor.values.size and not np.all(held[where] > 0)):
                raise AggregationError(f"tensor {name!r}: the update carries coordinates no "
                                       "device of the round's population holds")
        for name, tensor in clipped(change, self.clip_norm).items():
            self.sums[name][slice(None) if tensor.indices is None else tensor.indices] += tensor.values
        self.updates += 1

    def mean_change(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """(sum + N(0, z^2 C^2)) / (q H(e)) on every held coordinate, 0 elsewhere, per tensor."""
        out = {}
        for name, shape in shapes.items():
            held = self.holders.get(name)
            change = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=np.float64)
            if held is not None:
                on = held > 0
                noise = self.rng.normal(0.0, self.noise_multiplier * self.clip_norm, int(on.sum()))
                change[on] = (self.sums[name][on] + noise) / (self.sample_rate * held[on])
            out[name] = change.reshape(shape)
        return out


class CentralDP:
    """A run's central DP: its noise multiplier, its ledger and its generator (OS-seeded: the
    draw and the noise must not be replayable from the configuration's seed)."""

    def __init__(self, settings: CentralDPSettings, sample_rate: float, rounds: int,
                 rng: np.random.Generator | None = None):
        """`sample_rate` and `rounds`: what a target_epsilon is calibrated over."""
        self.settings, self.sample_rate = settings, sample_rate
        self.noise_multiplier = settings.resolve_noise(sample_rate, rounds)
        self.ledger = CentralLedger(settings, self.noise_multiplier)  # the simulator's
        self.rng = rng if rng is not None else np.random.default_rng()

    def ledger_over(self, history: Iterable[tuple[float, float]]) -> CentralLedger:
        """A ledger of `history` (the service's, read from its store: restarts and a new leader
        see what was released)."""
        return CentralLedger(self.settings, self.noise_multiplier, history)

    @classmethod
    def for_service(cls, config: Any) -> CentralDP | None:
        """The service's, from its ServiceSettings (None when central DP is off). Its planned
        rate is rounds.devices_per_round over central_dp.fleet_size; each round is accounted at
        the eligible devices it really drew from."""
        settings = config.central_dp
        if not settings.enabled:
            return None
        per_round, fleet = config.rounds.devices_per_round, settings.fleet_size
        if fleet is None:
            if settings.target_epsilon is not None:
                raise CentralDPError(
                    "central_dp.target_epsilon needs central_dp.fleet_size in the service: the "
                    "number of devices rounds are drawn from, so that the noise can be sized for "
                    f"rounds.devices_per_round ({per_round}) of them a round over "
                    f"rounds.total ({config.rounds.total}); or set central_dp.noise_multiplier")
            fleet = per_round
        if per_round > fleet:
            raise CentralDPError(f"central_dp.fleet_size {fleet} is smaller than "
                                 f"rounds.devices_per_round {per_round}")
        return cls(settings, per_round / fleet, config.rounds.total)

    def draw(self, population: int) -> list[int]:
        """Poisson sampling: each of `population` devices independently at the sample rate (the
        draw the accounting assumes)."""
        return np.flatnonzero(self.rng.random(population) < self.sample_rate).tolist()

    def round(self, tasks: Iterable[Any], pipeline: Any, sample_rate: float | None = None
              ) -> CentralRound:
        """The round's mechanism over a population given as one task per device."""
        return CentralRound(self.settings.clip_norm, self.noise_multiplier,
                            self.sample_rate if sample_rate is None else sample_rate,
                            holder_counts(tasks, pipeline), self.rng)

    def spend(self, sample_rate: float | None = None) -> dict[str, Any]:
        return self.ledger.spend(self.sample_rate if sample_rate is None else sample_rate)


def check_uploads(strategy: Any) -> None:
    """A strategy whose devices upload nothing (LocalOnly) gives central DP nothing to protect."""
    if not strategy.plan(0, 1, 1).uploaded:
        raise CentralDPError(f"central_dp: strategy {strategy.name!r} uploads nothing, so there "
                             "is no update to clip and noise; turn central_dp off")
