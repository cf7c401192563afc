"""DP accounting: the ledger's epsilon is Opacus's, and an independent accountant agrees."""

from __future__ import annotations

import logging

import dp_accounting
import pytest

from edge_sdk.protocol.envelope import Envelope, EnvelopeError, MessageType
from edge_sdk.protocol.messages import parse_header
from dp_accounting.rdp import rdp_privacy_accountant

from edge_sdk.training import PrivacyBudgetExceeded, PrivacyLedger, dp_sampling
from edge_sdk.settings import DPSettings

logging.getLogger("absl").setLevel(logging.ERROR)


def independent_epsilon(history, delta: float) -> float:
    """Google's dp_accounting RDP accountant, composing the same Poisson-subsampled Gaussians."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    for sigma, rate, steps in history:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("history", [
    [(1.0, 1 / 9, 27)],
    [(2.0, 0.02, 500)],
    [(1.1, 1 / 12, 12), (1.1, 1 / 12, 12), (1.1, 1 / 12, 12)],  # three rounds composed
])
def test_ledger_epsilon_matches_independent_accountant(history):
    ledger = PrivacyLedger(delta=1e-5)
    ledger.record(history)
    ours = ledger.epsilon()
    assert ours == pytest.approx(independent_epsilon(history, 1e-5), rel=0.01)
    assert ledger.steps == sum(h[2] for h in history)


def test_epsilon_grows_with_every_round_composed():
    ledger = PrivacyLedger(delta=1e-5)
    seen = [ledger.epsilon()]
    for _ in range(4):
        ledger.record([(1.0, 0.1, 10)])
        seen.append(ledger.epsilon())
    assert seen[0] == 0.0
    assert all(b > a for a, b in zip(seen, seen[1:]))


def test_target_epsilon_calibration_spends_the_budget_over_planned_rounds():
    config = DPSettings(target_epsilon=4.0, delta=1e-5)
    rate, steps_per_round = dp_sampling(420, 48, epochs=1)
    sigma = config.resolve_noise(rate, steps_per_round * 5)
    ledger = PrivacyLedger(delta=1e-5, budget_epsilon=config.budget)
    for _ in range(5):
        ledger.check_affordable(sigma, rate, steps_per_round)
        ledger.record([(sigma, rate, steps_per_round)])
    assert 3.8 <= ledger.epsilon() <= 4.0
    with pytest.raises(PrivacyBudgetExceeded, match="over the device's budget of 4.0"):
        ledger.check_affordable(sigma, rate, steps_per_round)


def test_ledger_survives_a_json_round_trip():
    ledger = PrivacyLedger(delta=1e-6, budget_epsilon=3.0, accountant="prv")
    ledger.record([(1.3, 0.05, 40), (1.3, 0.05, 40)])
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again.history == ledger.history
    assert again.epsilon() == pytest.approx(ledger.epsilon())


def test_dp_sampling_matches_opacus_data_loader():
    assert dp_sampling(420, 48, epochs=2) == (1 / 9, 18)
    assert dp_sampling(48, 48, epochs=1) == (1.0, 1)


@pytest.mark.parametrize("kwargs, message", [
    ({"noise_multiplier": 1.0, "target_epsilon": 2.0}, "not both"),
    ({"noise_multiplier": 1.0, "delta": 2.0}, "delta\n  Input should be less than 1"),
    ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm\n  Input should be greater than 0"),
    ({"noise_multiplier": float("nan")}, "noise_multiplier\n  Input should be a finite number"),
])
def test_bad_dp_settings_are_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPSettings(**kwargs)


def test_a_task_whose_dp_names_no_noise_is_refused():
    """DPSettings() is "no DP" in a run's configuration; in a TASK it must be null instead."""
    header = {"device_id": "d", "round": 1, "task": "t", "plan": {}, "train": {}, "dp": {},
              "planned_rounds": 1, "deadline": 0.0}
    with pytest.raises(EnvelopeError, match="dp names neither noise_multiplier nor target_epsilon"):
        parse_header(Envelope(MessageType.TASK, header))
