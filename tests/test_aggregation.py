"""Streaming, coverage-aware aggregation (coordinator/aggregation.py), checked by hand arithmetic."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from coordinator.aggregation import AggregationError, StreamingAggregator
from edge_sdk.codec import SparseTensor

SHAPES = {"w": (2, 3), "b": (3,), "c": (2,)}


def global_state():
    return {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3) * 10.0,   # 0 10 20 / 30 40 50
        "b": np.array([-1.0, -2.0, -3.0], dtype=np.float32),
        "c": np.array([0.5, 0.25], dtype=np.float32),
    }


def sparse(shape, indices, values):
    return SparseTensor(shape, np.asarray(indices, dtype=np.int64), np.asarray(values, dtype=np.float32))


def dense(array):
    return SparseTensor.from_dense(np.asarray(array, dtype=np.float32))


def snapshot(agg: StreamingAggregator):
    return (agg.updates, copy.deepcopy(agg._sums), copy.deepcopy(agg._weights),
            copy.deepcopy(agg._counts))


def assert_same_state(a, b):
    assert a[0] == b[0]
    for x, y in zip(a[1:], b[1:]):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k])


def assert_same_result(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def two_device_aggregator(w1=1.0, w2=1.0):
    agg = StreamingAggregator(SHAPES)
    # device 1 covers w flat entries 0, 1, 2; device 2 covers 1, 2, 4. Entries 3 and 5 are uncovered.
    agg.add_update({"w": sparse((2, 3), [0, 1, 2], [1.0, 2.0, 3.0])}, weight=w1)
    agg.add_update({"w": sparse((2, 3), [1, 2, 4], [5.0, 8.0, 7.0]),
                    "b": sparse((3,), [2], [9.0])}, weight=w2)
    return agg


# --------------------------------------------------------------------------- arithmetic


def test_overlapping_sparse_mean():
    agg = two_device_aggregator()
    out = agg.apply(global_state())
    np.testing.assert_allclose(out["w"], [[1.0, 3.5, 5.5], [30.0, 7.0, 50.0]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["b"], [-1.0, -2.0, 9.0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["c"], [0.5, 0.25])  # nobody uploaded it
    assert out["w"].shape == (2, 3) and out["w"].dtype == np.float32
    assert agg.updates == 2


def test_coverage_counts_exactly():
    agg = two_device_aggregator()
    np.testing.assert_array_equal(agg.coverage("w"), [[1, 2, 2], [0, 1, 0]])
    np.testing.assert_array_equal(agg.coverage("b"), [0, 0, 1])
    assert agg.coverage("w").shape == (2, 3)
    # weights do not change coverage counts
    np.testing.assert_array_equal(two_device_aggregator(1.0, 3.0).coverage("w"), [[1, 2, 2], [0, 1, 0]])


def test_coverage_of_untouched_tensor_is_zero():
    agg = StreamingAggregator(SHAPES)
    assert agg.coverage("b").shape == (3,)
    assert not agg.coverage("b").any()
    agg.add_update({"w": dense(np.ones((2, 3)))})
    np.testing.assert_array_equal(agg.coverage("w"), np.ones((2, 3)))
    assert not agg.coverage("b").any()


def test_weighted_mean_normalised_per_entry():
    agg = two_device_aggregator(1.0, 3.0)
    out = agg.apply(global_state())
    # shared entries: (1*a + 3*b) / 4; single-device entries: that device's value, not scaled
    expected_w = [[1.0, (1 * 2.0 + 3 * 5.0) / 4, (1 * 3.0 + 3 * 8.0) / 4], [30.0, 7.0, 50.0]]
    np.testing.assert_allclose(out["w"], expected_w, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["b"], [-1.0, -2.0, 9.0], rtol=0, atol=1e-6)


def test_dense_updates_with_sample_counts_equal_fedavg():
    rng = np.random.default_rng(0)
    shapes = {"w": (4, 5), "b": (5,)}
    samples = [17, 3, 250, 41, 9]
    uploads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in samples]
    agg = StreamingAggregator(shapes)
    for upload, n in zip(uploads, samples):
        agg.add_update({k: dense(v) for k, v in upload.items()}, weight=float(n))
    old = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    out = agg.apply(old)
    total = sum(samples)
    for k in shapes:
        expected = sum(n * u[k].astype(np.float64) for u, n in zip(uploads, samples)) / total
        np.testing.assert_allclose(out[k], expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(agg.coverage(k), np.full(shapes[k], len(samples)))


def test_order_independence():
    rng = np.random.default_rng(1)
    shapes = {"w": (8, 6), "b": (6,)}
    updates = []
    for _ in range(12):
        update = {}
        for k, s in shapes.items():
            numel = int(np.prod(s))
            idx = np.sort(rng.choice(numel, size=int(rng.integers(1, numel + 1)), replace=False))
            update[k] = sparse(s, idx, rng.normal(size=len(idx)) * 100)
        updates.append((update, float(rng.uniform(0.1, 50))))
    old = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}

    def run(order):
        agg = StreamingAggregator(shapes)
        for i in order:
            agg.add_update(*updates[i])
        return agg.apply(old), {k: agg.coverage(k).copy() for k in shapes}

    ref, ref_cov = run(range(len(updates)))
    for seed in range(3):
        out, cov = run(np.random.default_rng(seed + 10).permutation(len(updates)))
        for k in shapes:
            np.testing.assert_allclose(out[k], ref[k], rtol=0, atol=1e-6)
            np.testing.assert_array_equal(cov[k], ref_cov[k])


def test_no_updates_keeps_global_values():
    agg = StreamingAggregator(SHAPES)
    state = global_state()
    out = agg.apply(state)
    assert_same_result(out, global_state())


# --------------------------------------------------------------------------- atomicity


def _bad_updates():
    good_w = sparse((2, 3), [0, 5], [100.0, 200.0])
    good_b = dense([7.0, 7.0, 7.0])
    good_c = sparse((2,), [1], [4.0])
    return {
        "wrong shape": ({"w": dense(np.ones((3, 2)))}, 1.0),
        "wrong shape sparse": ({"b": sparse((4,), [0], [1.0])}, 1.0),
        "unknown tensor": ({"gamma": dense([1.0, 2.0, 3.0])}, 1.0),
        "nan values": ({"w": sparse((2, 3), [1, 2], [1.0, np.nan])}, 1.0),
        "inf values": ({"b": dense([1.0, np.inf, 0.0])}, 1.0),
        "zero weight": ({"w": good_w, "b": good_b}, 0.0),
        "negative weight": ({"w": good_w, "b": good_b}, -2.0),
        "nan weight": ({"w": good_w, "b": good_b}, float("nan")),
        "bad tensor in middle (unknown)": ({"w": good_w, "x": good_b, "c": good_c}, 1.0),
        "bad tensor in middle (nan)": ({"w": good_w, "b": dense([1.0, np.nan, 2.0]), "c": good_c}, 1.0),
        "bad tensor in middle (wrong shape)": ({"b": good_b, "w": dense(np.ones(6)), "c": good_c}, 1.0),
    }


@pytest.mark.parametrize("case", list(_bad_updates()))
def test_bad_update_is_refused_atomically(case):
    update, weight = _bad_updates()[case]
    agg = two_device_aggregator(1.0, 3.0)
    before = snapshot(agg)
    coverage_before = {k: agg.coverage(k).copy() for k in SHAPES}
    result_before = agg.apply(global_state())
    with pytest.raises(AggregationError):
        agg.add_update(update, weight=weight)
    assert_same_state(snapshot(agg), before)
    for k in SHAPES:
        np.testing.assert_array_equal(agg.coverage(k), coverage_before[k])
    assert_same_result(agg.apply(global_state()), result_before)
    # and the aggregator keeps working afterwards
    agg.add_update({"b": dense([0.0, 0.0, 0.0])})
    assert agg.updates == 3


def test_bad_update_on_fresh_aggregator_allocates_nothing():
    agg = StreamingAggregator(SHAPES)
    with pytest.raises(AggregationError):
        agg.add_update({"w": dense(np.ones((2, 3))), "b": dense([1.0, np.nan, 1.0])})
    assert agg.updates == 0
    assert agg._sums == {} and agg._weights == {} and agg._counts == {}
    assert_same_result(agg.apply(global_state()), global_state())


def test_error_messages_name_the_problem():
    agg = StreamingAggregator(SHAPES)
    with pytest.raises(AggregationError, match="'gamma'"):
        agg.add_update({"gamma": dense([1.0])})
    with pytest.raises(AggregationError, match=r"\(3, 2\).*\(2, 3\)"):
        agg.add_update({"w": dense(np.ones((3, 2)))})
    with pytest.raises(AggregationError, match="NaN or Inf"):
        agg.add_update({"b": dense([np.nan, 0, 0])})
    with pytest.raises(AggregationError, match="positive"):
        agg.add_update({"b": dense([0, 0, 0])}, weight=0)


# --------------------------------------------------------------------------- memory and purity


def _internal_nbytes(agg):
    return sum(a.nbytes for store in (agg._sums, agg._weights, agg._counts) for a in store.values())


def test_memory_independent_of_number_of_devices():
    rng = np.random.default_rng(2)
    shapes = {"w": (64, 32), "b": (32,)}

    def update():
        idx = np.sort(rng.choice(64 * 32, size=500, replace=False))
        return {"w": sparse((64, 32), idx, rng.normal(size=500)), "b": dense(rng.normal(size=32))}

    agg = StreamingAggregator(shapes)
    agg.add_update(update(), weight=2.0)
    after_one = _internal_nbytes(agg)
    arrays_one = {id(a) for store in (agg._sums, agg._weights, agg._counts) for a in store.values()}
    assert after_one > 0
    for _ in range(199):
        agg.add_update(update(), weight=float(rng.uniform(0.5, 5)))
    assert agg.updates == 200
    assert _internal_nbytes(agg) == after_one
    assert {id(a) for store in (agg._sums, agg._weights, agg._counts) for a in store.values()} == arrays_one
    assert int(agg.coverage("b").min()) == 200


def test_apply_does_not_mutate_input():
    agg = two_device_aggregator(2.0, 1.0)
    state = global_state()
    originals = {k: v.copy() for k, v in state.items()}
    out = agg.apply(state)
    assert_same_result(state, originals)
    for k in state:
        assert not np.shares_memory(out[k], state[k]) or np.array_equal(out[k], originals[k])
    # mutating the result of a covered tensor must not write back into the global state
    out["w"][...] = 123.0
    np.testing.assert_array_equal(state["w"], originals["w"])
    # apply is repeatable: it does not consume the accumulated sums
    assert_same_result(agg.apply(state), agg.apply(global_state()))
