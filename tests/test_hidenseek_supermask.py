"""HideNseek's supermask: SynFlow keeps the target density without emptying a layer; a device
uploads one sign bit per kept weight (indices known to the coordinator), the server takes the
sign vote (a tie keeps the old sign), and pruned weights stay zero."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk import codec
from edge_sdk.models import build_model
from harness.strategies import SPEC, one_task


def test_synflow_keeps_the_target_density_without_emptying_a_layer():
    from coordinator.strategies.hidenseek import synflow_masks
    masks = synflow_masks(SPEC, density=0.2, iterations=10, seed=0)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.size for m in masks.values())
    assert kept == pytest.approx(0.2 * total, rel=0.02)
    assert all(m.any() for m in masks.values())  # SynFlow avoids layer collapse
    assert set(masks) == {n for n, p in build_model(SPEC).named_parameters() if p.dim() > 1}


def test_hidenseek_uploads_one_bit_per_kept_weight_and_votes(fmnist_clients):
    strategy, plan, outcome = one_task("hidenseek", fmnist_clients)
    kept = {n: int(m.sum()) for n, m in strategy.masks.items()}
    sign_bytes = sum(-(-k // 8) for k in kept.values())
    framing = 16 + sum(2 + len(n) + 1 + 4 * 4 + 9 for n in kept) + 64  # header, records, zstd
    assert len(outcome.payload) <= sign_bytes + framing
    update = codec.decode(outcome.payload, known_indices=strategy.upload_known_indices)
    for name, tensor in update.items():
        assert np.array_equal(tensor.indices, strategy.upload_known_indices[name])
        assert set(np.unique(tensor.values)) <= {-1.0, 1.0}
    name = next(iter(strategy.masks))
    old = {n: np.ones(m.shape, np.float32) for n, m in strategy.masks.items()}
    mean = {n: np.full(m.shape, 0.5, np.float32) for n, m in strategy.masks.items()}
    old[name].reshape(-1)[:3] = [1.0, 1.0, -1.0]
    mean[name].reshape(-1)[:3] = [0.5, -0.2, 0.0]
    new = strategy.server_update(old, mean)
    np.testing.assert_array_equal(new[name].reshape(-1)[:3], [1.0, -1.0, -1.0])  # a tie keeps the old sign
    weights = strategy.materialize(strategy.initial_state())
    assert np.array_equal(weights[name] != 0, strategy.masks[name])  # pruned weights are zero
