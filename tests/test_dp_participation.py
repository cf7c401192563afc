"""A target epsilon is spread over the tasks a device is expected to run (its chance of being
drawn times the rounds left), not over every planned round, and re-planned from what its ledger
has spent when it is drawn more or less often than expected."""

from __future__ import annotations

import pytest

from edge_sdk.client import LocalClient
from edge_sdk.data import ClientData
from edge_sdk.settings import TrainSettings, calibrated_noise
from edge_sdk.training import PrivacyLedger

TARGET, DELTA, RATE, STEPS, ROUNDS = 8.0, 1e-5, 0.1, 9, 50


def device(selection_rate: float) -> LocalClient:
    import torch

    empty = ClientData(0, torch.zeros(0, 1), torch.zeros(0, dtype=torch.long),
                       torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))
    return LocalClient(empty, TrainSettings(), planned_rounds=ROUNDS, selection_rate=selection_rate)


def run(client: LocalClient, drawn) -> tuple[PrivacyLedger, list[float]]:
    """The device's noise in each round it is drawn in, and its ledger afterwards."""
    ledger, noises = PrivacyLedger(DELTA), []
    for round_number in drawn:
        noise = ledger.noise_for_target(TARGET, RATE, STEPS, client.expected_tasks(round_number))
        ledger.record([(noise, RATE, STEPS)])
        noises.append(noise)
    return ledger, noises


def test_noise_is_sized_for_the_tasks_a_device_expects_not_every_round():
    """Drawn in a fifth of 50 rounds, a device expects 10 tasks and plans for 16 (mean plus two
    standard deviations); its noise is that of 16 tasks, well below that of 50."""
    fifth = device(0.2)
    assert [fifth.expected_tasks(r) for r in (1, 25, 50)] == [16, 10, 1]
    first = PrivacyLedger(DELTA).noise_for_target(TARGET, RATE, STEPS, 16)
    assert first == calibrated_noise(TARGET, DELTA, RATE, STEPS * 16, "rdp")
    assert first < 0.8 * calibrated_noise(TARGET, DELTA, RATE, STEPS * ROUNDS, "rdp")


def test_drawn_as_expected_a_device_spends_most_of_its_target_and_never_more():
    ledger, noises = run(device(0.2), range(1, ROUNDS + 1, 5))
    assert ledger.epsilon() <= TARGET
    assert ledger.epsilon() > 0.85 * TARGET  # the margin it kept, spent as the rounds ran out
    assert noises[-1] < noises[0]


def test_a_device_drawn_more_often_than_expected_is_replanned_and_stays_within_its_target():
    """Drawn in a third of the rounds (17 tasks, one more than it planned for at first): each
    task finds less left and adds more noise, and the last still fits in the target."""
    ledger, noises = run(device(0.2), range(1, ROUNDS + 1, 3))
    assert len(noises) == 17 and noises[-1] > noises[0]
    assert all(b >= a * 0.999 for a, b in zip(noises, noises[1:]))
    assert ledger.epsilon() <= TARGET


def test_full_participation_keeps_the_noise_of_every_planned_round():
    ledger, noises = run(device(1.0), range(1, 11))
    assert noises[0] == calibrated_noise(TARGET, DELTA, RATE, STEPS * ROUNDS, "rdp")
    assert max(noises) / min(noises) < 1.02
    assert ledger.epsilon() < TARGET / 2  # 10 of the 50 planned rounds
