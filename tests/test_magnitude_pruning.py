"""Magnitude pruning: a mask keeps exactly ceil(keep x size) entries (computed exactly, not in
floats), the largest by absolute value, ties broken the same way every time; a keep outside
(0, 1] is refused; only tensors of two or more dimensions are pruned."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from edge_sdk.pruning import is_prunable, magnitude_mask


@pytest.mark.parametrize("keep", [0.01, 0.1, 0.25, 0.5, 0.77, 0.999, 1.0])
def test_a_magnitude_mask_keeps_the_largest_entries(keep):
    rng = np.random.default_rng(3)
    values = rng.normal(size=(37, 11)).astype(np.float32)
    mask = magnitude_mask(values, keep)
    assert mask.shape == values.shape and mask.dtype == np.bool_
    k = math.ceil(keep * values.size)
    assert int(mask.sum()) == k
    kept = np.abs(values[mask])
    dropped = np.abs(values[~mask])
    if dropped.size:
        assert kept.min() >= dropped.max()
    np.testing.assert_array_equal(np.sort(np.abs(values).ravel())[::-1][:k], np.sort(kept)[::-1])


def test_a_magnitude_mask_ranks_by_absolute_value_and_breaks_ties_deterministically():
    values = np.array([[-5.0, 1.0, 0.0], [0.0, 3.0, -0.5]], dtype=np.float32)
    np.testing.assert_array_equal(magnitude_mask(values, 0.5),
                                  [[True, True, False], [False, True, False]])
    zeros = np.zeros(10, dtype=np.float32)
    first = magnitude_mask(zeros, 0.3)
    assert int(first.sum()) == 3
    np.testing.assert_array_equal(first, magnitude_mask(zeros.copy(), 0.3))  # deterministic on ties


@pytest.mark.parametrize("keep,n", [(0.55, 100), (0.55, 102400), (0.5, 100), (0.3, 10)])
def test_a_magnitude_mask_keeps_exactly_the_ceiling_of_keep_times_size(keep, n):
    # ceil(0.55 * 100) is exactly 55, but in floats 0.55 * 100 == 55.00000000000001, whose ceil is 56.
    values = np.arange(1, n + 1, dtype=np.float32)
    assert int(magnitude_mask(values, keep).sum()) == math.ceil(Fraction(str(keep)) * n)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_a_keep_outside_0_1_is_refused(keep):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        magnitude_mask(np.ones((4, 4), dtype=np.float32), keep)


def test_only_tensors_of_two_or_more_dimensions_are_prunable():
    assert is_prunable((4, 1, 5, 5)) and is_prunable((10, 1024))
    assert not is_prunable((1024,)) and not is_prunable(())
