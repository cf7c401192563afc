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
from typing import Literal

AccountantName = Literal["rdp", "prv"]


class PrivacyBudgetExceeded(RuntimeError):
    """Training this task would push the device past its epsilon budget; the device refuses it."""


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings of a device. Give a noise multiplier, or a target epsilon for the whole run
    (then the noise is calibrated so that `planned_steps` steps spend exactly that budget)."""

    max_grad_norm: float = 1.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    epsilon_budget: float | None = None
    accountant: AccountantName = "rdp"

    @property
    def budget(self) -> float | None:
        """The epsilon past which the device refuses to train (the target, unless set apart)."""
        return self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("DP needs exactly one of noise_multiplier or target_epsilon")
        if self.max_grad_norm <= 0:
            raise ValueError(f"dp.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp.delta must be in (0, 1), got {self.delta}")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"dp.target_epsilon must be > 0, got {self.target_epsilon}")

    def resolve_noise(self, sample_rate: float, planned_steps: int) -> float:
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        from opacus.accountants.utils import get_noise_multiplier  # lazy: opacus costs ~4 s to import

        return get_noise_multiplier(target_epsilon=self.target_epsilon, target_delta=self.delta,
                                    sample_rate=sample_rate, steps=planned_steps,
                                    accountant=self.accountant)


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
        return float(accountant.get_epsilon(delta=self.delta))

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
