"""Per-device privacy ledger over Opacus's accountants.

What is protected: each training example held by one device, against everything the device sends
(record-level DP of the device's updates, "local" with respect to the coordinator). The guarantee
is (epsilon, delta)-DP for DP-SGD with Poisson sampling, composed by Opacus's accountant over every
step of every round the device trained in. The ledger stores exactly what the accountant needs
(noise multiplier, sample rate, steps) so it can be persisted on the device and re-evaluated later.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

from ..settings import AccountantName


# The RDP orders epsilon is minimised over: Opacus's defaults (1.1 to 63) and beyond up to 1024 on
# both ends. At few steps and little noise (a device's first rounds at epsilon 8) the best order
# lay past 63, so its bound was looser than it need be and Opacus warned "Optimal order is the
# largest alpha" in every DP run; with these orders the optimum lies inside the range.
RDP_ORDERS = (1.01, 1.02, 1.05, *(1 + x / 10.0 for x in range(1, 100)), *range(12, 64),
              *range(64, 128, 8), *range(128, 256, 32), 256, 384, 512, 768, 1024)


# Fewer orders for searching a noise: each accountant call is a third of the full set's, and
# epsilon minimised over fewer orders is never smaller, so the noise found errs on the safe side
# (within 1% of epsilon where checked against RDP_ORDERS).
SEARCH_ORDERS = (1.1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 10, 12, 14, 16,
                 20, 24, 28, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024)


def accountant_options(accountant: AccountantName) -> dict:
    """What to pass to `get_epsilon` of `accountant` (the others take no orders)."""
    return {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}


class PrivacyBudgetExceeded(RuntimeError):
    """Training this task would push the device past its epsilon budget; the device refuses it."""


@dataclass
class PrivacyLedger:
    """Everything one device has spent: a list of (noise_multiplier, sample_rate, steps)."""

    delta: float
    budget_epsilon: float | None = None
    accountant: AccountantName = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)
    # (entries of history summed, their RDP curve): history is only ever appended to.
    _curve: tuple = field(default=(0, 0.0), init=False, repr=False, compare=False)

    def epsilon(self, extra: list[tuple[float, float, int]] | None = None) -> float:
        if self.accountant == "rdp":
            return self._rdp_epsilon(extra or [])
        merged = _merged(self.history + (extra or []))
        if not merged:
            return 0.0
        from opacus.accountants import create_accountant

        accountant = create_accountant(self.accountant)
        accountant.history = [(sigma, rate, steps) for (sigma, rate), steps in merged.items()]
        return float(accountant.get_epsilon(delta=self.delta, **accountant_options(self.accountant)))

    def _rdp_epsilon(self, extra: list[tuple[float, float, int]]) -> float:
        """What Opacus's RDP accountant computes (the sum of each entry's RDP curve, converted
        at delta), with the history's curve kept and extended as entries are recorded: with a
        noise re-planned every task no two entries merge, and recomputing every curve on each
        query made it grow with the rounds (75 ms an entry)."""
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        orders = list(RDP_ORDERS)
        counted, curve = self._curve if self._curve[0] <= len(self.history) else (0, 0.0)
        for sigma, rate, steps in self.history[counted:]:
            curve = curve + compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=orders)
        self._curve = (len(self.history), curve)
        for sigma, rate, steps in extra:
            curve = curve + compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=orders)
        if isinstance(curve, float):
            return 0.0
        return float(get_privacy_spent(orders=orders, rdp=curve, delta=self.delta)[0])

    def check_affordable(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after the planned steps; raises PrivacyBudgetExceeded when over budget.

        A 1% slack absorbs the tolerance of noise calibration, which targets the budget from below
        only up to Opacus's epsilon_tolerance.
        """
        after = self.epsilon([(noise_multiplier, sample_rate, steps)])
        if self.budget_epsilon is not None and after > self.budget_epsilon * 1.01:
            raise PrivacyBudgetExceeded(
                f"training {steps} more steps (noise {noise_multiplier:.3f}, sample rate "
                f"{sample_rate:.4f}) would bring epsilon to {after:.3f}, over the device's budget "
                f"of {self.budget_epsilon} at delta={self.delta}")
        return after

    def noise_for_target(self, target_epsilon: float, sample_rate: float, steps: int,
                         tasks: int) -> float:
        """The noise at which `tasks` more tasks of `steps` steps at `sample_rate` bring this
        ledger to `target_epsilon`: what is left of the target spread over the tasks expected.

        A device drawn more often than expected finds less left and trains with more noise; one
        drawn less often, with less. The noise depends only on public facts (the rounds, the
        rate, earlier noise), never on the data, so adaptive composition holds. A ledger already
        at the target gets the noise of a fresh one, and its budget decides (check_affordable).
        """
        from ..settings import calibrated_noise

        if not self.history or self.epsilon() >= target_epsilon * 0.999:
            return calibrated_noise(target_epsilon, self.delta, sample_rate, steps * tasks,
                                    self.accountant)
        return _noise_after(tuple(self.history), self.delta, self.accountant, target_epsilon,
                            sample_rate, steps * tasks)

    def record(self, history: list[tuple[float, float, int]]) -> None:
        self.history.extend((float(s), float(q), int(n)) for s, q, n in history)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def to_json(self) -> str:
        return json.dumps({"delta": self.delta, "budget_epsilon": self.budget_epsilon,
                           "accountant": self.accountant, "history": self.history})

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        data = json.loads(text)
        return cls(delta=data["delta"], budget_epsilon=data["budget_epsilon"],
                   accountant=data["accountant"],
                   history=[tuple(entry) for entry in data["history"]])


@functools.lru_cache(maxsize=1024)
def _noise_after(history: tuple, delta: float, accountant: AccountantName, target: float,
                 rate: float, steps: int) -> float:
    """The noise at which `steps` more steps at `rate` bring a ledger of `history` to `target`
    (within 0.01%, from below): regula falsi (Illinois) on log epsilon against log noise, which
    is nearly a line, so a handful of accountant calls suffice where bisection took twenty.
    Memoised: devices of a simulation that were drawn alike share their histories."""
    epsilon = _epsilon_with(PrivacyLedger(delta, accountant=accountant, history=list(history)),
                            rate, steps)

    def gap(x: float) -> float:  # decreasing in x = log noise
        return math.log(epsilon(math.exp(x))) - math.log(target)

    low, high = math.log(0.5), math.log(2.0)
    f_low, f_high = gap(low), gap(high)
    while f_high > 0:
        if high > math.log(1e4):
            return math.exp(high)
        low, f_low, high = high, f_high, high + math.log(4)
        f_high = gap(high)
    while f_low < 0 and low > math.log(0.05):
        high, f_high, low = low, f_low, low - math.log(4)
        f_low = gap(low)
    side = 0
    for _ in range(40):
        if f_high > -1e-4 or f_low < 0:
            break
        x = high - f_high * (high - low) / (f_high - f_low)
        f_x = gap(x)
        if f_x > 0:
            low, f_low = x, f_x
            f_high = f_high / 2 if side == 1 else f_high
            side = 1
        else:
            high, f_high = x, f_x
            f_low = f_low / 2 if side == -1 else f_low
            side = -1
    return math.exp(high)


def _epsilon_with(ledger: PrivacyLedger, rate: float, steps: int):
    """epsilon(noise): the ledger's epsilon after `steps` more steps at `rate` and that noise.
    Under RDP the history's curve is computed once and the new steps' added to it."""
    if ledger.accountant != "rdp":
        return lambda sigma: ledger.epsilon([(sigma, rate, steps)])
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = list(SEARCH_ORDERS)
    spent = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=orders)
                for (sigma, q), n in _merged(ledger.history).items())

    def epsilon(sigma: float) -> float:
        rdp = spent + compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=orders)
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=ledger.delta)[0])
    return epsilon


def _merged(history: list[tuple[float, float, int]]) -> dict[tuple[float, float], int]:
    """Steps per (noise, rate): steps at the same pair compose additively, so merging them is
    exact and keeps an epsilon query's cost independent of how many rounds repeated them."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:
        merged[(sigma, rate)] = merged.get((sigma, rate), 0) + steps
    return merged
