"""Robust aggregation rules (median, trimmed mean, centered clipping): the right value on small
hand-made cases, entries a device did not upload left out, an outlier's pull bounded, and a fifth
of sign-flipping (Byzantine) devices resisted where the plain mean is not."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.byzantine import ByzantineSettings, attack
from coordinator.robust import AggregatorSettings, RobustAggregator
from edge_sdk import codec


def _dense(values):
    return {"w": codec.SparseTensor.from_dense(np.asarray(values, dtype=np.float32))}


@pytest.mark.parametrize("rule, expected", [("median", 2.0), ("trimmed_mean", 2.0), ("mean", 103 / 3)])
def test_robust_rules_give_the_expected_value_on_a_hand_made_case(rule, expected):
    agg = RobustAggregator({"w": (1,)}, AggregatorSettings(rule=rule, trim=1 / 3))
    for value in (1.0, 2.0, 100.0):
        agg.add_update(_dense([value]))
    assert agg.apply({"w": np.zeros(1, np.float32)})["w"][0] == pytest.approx(expected)


def test_robust_rules_ignore_entries_a_device_did_not_upload():
    agg = RobustAggregator({"w": (3,)}, AggregatorSettings(rule="median"))
    agg.add_update({"w": codec.SparseTensor.from_dense(np.array([1, 1, 1], np.float32),
                                                      np.array([True, False, True]))})
    agg.add_update(_dense([3, 5, 3]))
    agg.add_update(_dense([5, 7, 9]))
    new = agg.apply({"w": np.full(3, -1.0, np.float32)})["w"]
    np.testing.assert_allclose(new, [3, 6, 3])  # entry 1: median of the two devices that sent it


def test_centered_clipping_bounds_an_outliers_pull():
    agg = RobustAggregator({"w": (2,)}, AggregatorSettings(rule="centered_clip", clip_radius=1.0,
                                                       clip_iterations=1))
    for values in ([0.5, 0.0], [0.5, 0.0], [100.0, 0.0]):
        agg.add_update(_dense(values))
    new = agg.apply({"w": np.zeros(2, np.float32)})["w"]
    np.testing.assert_allclose(new, [(0.5 + 0.5 + 1.0) / 3, 0.0], atol=1e-6)


def test_robust_rules_resist_a_fifth_of_sign_flipping_devices_where_the_mean_does_not():
    rng = np.random.default_rng(0)
    honest_target = np.ones(50, np.float32)
    base = {"w": np.zeros(50, np.float32)}
    settings = ByzantineSettings(fraction=0.2, attack="sign_flip", scale=10.0)
    results = {}
    for rule in ("mean", "median", "trimmed_mean", "centered_clip"):
        agg = RobustAggregator({"w": (50,)}, AggregatorSettings(rule=rule, trim=0.25, clip_radius=2.0,
                                                            bucket=0))
        for i in range(10):
            update = _dense(honest_target + rng.normal(0, 0.1, 50))
            if i < 2:
                update = attack(update, base, settings, rng)
            agg.add_update(update)
        results[rule] = float(np.abs(agg.apply(base)["w"] - honest_target).mean())
    assert results["mean"] > 2.0
    assert all(results[r] < 0.5 for r in ("median", "trimmed_mean", "centered_clip")), results
