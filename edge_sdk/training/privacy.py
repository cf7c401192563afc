"""Per-device privacy ledger over Opacus's accountants.

What is protected: each training example held by one device, against everything the device sends
(record-level DP of the device's updates, "local" with respect to the coordinator). The guarantee
is (epsilon, delta)-DP for DP-SGD with Poisson sampling, composed by Opacus's accountant over every
step of every round the device trained in. The ledger stores exactly what the accountant needs
(noise multiplier, sample rate, steps) so it can be persisted on the device and re-evaluated later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..settings import AccountantName


# The RDP orders epsilon is minimised over: Opacus's defaults (1.1 to 63) and beyond up to 1024 on
# both ends. At few steps and little noise (a device's first rounds at epsilon 8) the best order
# lay past 63, so its bound was looser than it need be and Opacus warned "Optimal order is the
# largest alpha" in every DP run; with these orders the optimum lies inside the range.
RDP_ORDERS = (1.01, 1.02, 1.05, *(1 + x / 10.0 for x in range(1, 100)), *range(12, 64),
              *range(64, 128, 8), *range(128, 256, 32), 256, 384, 512, 768, 1024)


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

    def epsilon(self, extra: list[tuple[float, float, int]] | None = None) -> float:
        # Steps at the same (noise, rate) compose additively, so merging them is exact and keeps
        # the cost of an epsilon query independent of how many rounds the device has done.
        merged: dict[tuple[float, float], int] = {}
        for sigma, rate, steps in self.history + (extra or []):
            merged[(sigma, rate)] = merged.get((sigma, rate), 0) + steps
        if not merged:
            return 0.0
        from opacus.accountants import create_accountant

        accountant = create_accountant(self.accountant)
        accountant.history = [(sigma, rate, steps) for (sigma, rate), steps in merged.items()]
        return float(accountant.get_epsilon(delta=self.delta, **accountant_options(self.accountant)))

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
