"""FFGG's server: it steps the shared tensors by its learning rate times the mean change (private
ones untouched), and applies stale updates within its staleness bound and still learns."""

from __future__ import annotations

import numpy as np

from coordinator.combine import RoundCombiner
from coordinator.simulation import run_simulation
from coordinator.strategies import build_strategy
from edge_sdk import codec
from edge_sdk.models import build_model
from harness.strategies import SPEC, simulation_config


def test_ffgg_server_steps_on_the_mean_change():
    strategy = build_strategy(simulation_config("ffgg", **{"ffgg.server_lr": 0.5}), SPEC)
    name = strategy.shared[0]
    shape = build_model(SPEC).state_dict()[name].shape
    old = {n: np.zeros(tuple(v.shape), np.float32) for n, v in build_model(SPEC).state_dict().items()}
    combiner = RoundCombiner(strategy, old)
    for value in (2.0, 4.0):
        combiner.add({name: codec.SparseTensor.from_dense(np.full(shape, value, np.float32))}, 1.0)
    new = combiner.result()
    np.testing.assert_allclose(new[name], 0.5 * 3.0)  # old + lr x mean change
    untouched = strategy.private[0]
    np.testing.assert_array_equal(new[untouched], old[untouched])


def test_ffgg_applies_stale_updates_within_the_staleness_bound():
    config = simulation_config("ffgg", **{"ffgg.max_staleness": 2, "ffgg.server_lr": 0.5})
    result = run_simulation(config, progress=False).to_dict()
    assert result["final"]["personalized_accuracy"] > 0.45
    assert result["config"]["ffgg"]["max_staleness"] == 2
