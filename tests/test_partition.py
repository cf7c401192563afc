"""Client partitions on the real Fashion-MNIST and FEMNIST training labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_sdk.data import (
    PartitionSpec,
    client_data_for,
    make_client_data,
    parse_partition,
    partition,
    train_test_split,
)

SPECS = ["iid", "classes:2", "dirichlet:0.5", "niid-dirichlet:0.5"]


def _max_class_share(labels, parts, num_classes=10):
    return float(np.mean([np.bincount(labels[p], minlength=num_classes).max() / len(p) for p in parts]))


@pytest.mark.parametrize("spec", SPECS)
def test_deterministic_and_seed_dependent(fmnist, spec):
    a = partition(fmnist.train_y, 20, spec, seed=1)
    b = partition(fmnist.train_y, 20, spec, seed=1)
    c = partition(fmnist.train_y, 20, spec, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("spec", SPECS)
def test_disjoint_sorted_in_range(fmnist, spec):
    parts = partition(fmnist.train_y, 30, spec, seed=0)
    assert len(parts) == 30
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert joined.min() >= 0 and joined.max() < len(fmnist.train_y)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def test_iid_uses_everything(fmnist):
    parts = partition(fmnist.train_y, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 60000 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("num_clients", [10, 100])
def test_classes_k(fmnist, num_clients):
    parts = partition(fmnist.train_y, num_clients, "classes:5", seed=3)
    for c, p in enumerate(parts):
        counts = np.bincount(fmnist.train_y[p], minlength=10)
        expected = {(c + j) % 10 for j in range(5)}
        assert set(np.flatnonzero(counts)) == expected
        held = counts[sorted(expected)]
        assert held.max() - held.min() <= 1
    sizes = {len(p) for p in parts}
    assert max(sizes) - min(sizes) <= 5
    assert min(sizes) >= 60000 // num_clients - 5


def test_classes_too_many(fmnist):
    with pytest.raises(ValueError, match="more classes"):
        partition(fmnist.train_y, 10, "classes:11", seed=0)


def test_dirichlet_equal_sizes_and_skew(fmnist):
    parts = partition(fmnist.train_y, 50, "dirichlet:0.5", seed=0)
    assert {len(p) for p in parts} == {60000 // 50}
    iid = partition(fmnist.train_y, 50, "iid", seed=0)
    skewed, flat = _max_class_share(fmnist.train_y, parts), _max_class_share(fmnist.train_y, iid)
    assert skewed > flat + 0.2, (skewed, flat)


def test_dirichlet_exhausts_classes_gracefully(fmnist):
    # With tiny alpha many clients want the same class; it runs out and the rest is renormalised.
    parts = partition(fmnist.train_y, 10, "dirichlet:0.01", seed=0)
    assert {len(p) for p in parts} == {6000}
    assert len(np.unique(np.concatenate(parts))) == 60000


def test_niid_dirichlet_min_size(fmnist):
    parts = partition(fmnist.train_y, 100, "niid-dirichlet:0.1:25", seed=0)
    assert min(len(p) for p in parts) >= 25
    assert sum(len(p) for p in parts) == 60000
    iid = partition(fmnist.train_y, 100, "iid", seed=0)
    assert _max_class_share(fmnist.train_y, parts) > _max_class_share(fmnist.train_y, iid) + 0.2


def test_niid_dirichlet_impossible_min(fmnist):
    with pytest.raises(ValueError, match="exceeds"):
        partition(fmnist.train_y, 100, "niid-dirichlet:0.5:601", seed=0)
    with pytest.raises(ValueError, match="1000 draws"):
        partition(fmnist.train_y[:200], 10, "niid-dirichlet:0.01:20", seed=0)


def test_natural_keeps_writers_whole(femnist):
    writers = femnist.train_writers
    for n in (31, 10):
        parts = partition(femnist.train_y, n, "natural", seed=0, writers=writers, num_classes=62)
        assert len(parts) == n and sum(len(p) for p in parts) == len(writers)
        owner = {}
        for c, p in enumerate(parts):
            for w in np.unique(writers[p]):
                assert w not in owner
                owner[w] = c
            # whole writer: every sample of each writer held here is here
            for w in np.unique(writers[p]):
                assert np.array_equal(np.flatnonzero(writers == w), p[writers[p] == w])
        assert len(owner) == 31
    with pytest.raises(ValueError, match="writers"):
        partition(femnist.train_y, 32, "natural", seed=0, writers=writers)


def test_natural_requires_writers(fmnist):
    with pytest.raises(ValueError, match="writer"):
        partition(fmnist.train_y, 10, "natural", seed=0)


def test_too_many_clients(fmnist):
    with pytest.raises(ValueError, match="clients"):
        partition(fmnist.train_y[:5], 6, "iid", seed=0)


def test_train_test_split_sizes():
    idx = np.arange(100, 200)
    tr, te = train_test_split(idx, seed=0, device_index=3)
    assert len(tr) == 70 and len(te) == 30
    assert set(tr) | set(te) == set(idx) and not set(tr) & set(te)
    tr2, te2 = train_test_split(idx, seed=0, device_index=3)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    tr3, _ = train_test_split(idx, seed=0, device_index=4)
    assert not np.array_equal(tr, tr3)
    for n in (2, 3, 4):
        a, b = train_test_split(np.arange(n), seed=0, device_index=0)
        assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) == n


def test_client_data(fmnist):
    clients = make_client_data(fmnist, 20, "dirichlet:0.5", seed=7)
    assert len(clients) == 20
    total = sum(len(c.train_y) + len(c.test_y) for c in clients)
    assert total == 20 * (60000 // 20)
    c5 = clients[5]
    assert c5.device_index == 5 and len(c5.train_y) == 2100 and len(c5.test_y) == 900
    assert c5.train_x.dtype == torch.float32 and c5.train_x.shape == (2100, 1, 28, 28)
    assert c5.train_y.dtype == torch.int64
    one = client_data_for(fmnist, 20, "dirichlet:0.5", seed=7, device_index=5)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(one, field), getattr(c5, field))


def test_client_data_natural(femnist):
    clients = make_client_data(femnist, 31, "natural", seed=0)
    assert sum(len(c.train_y) + len(c.test_y) for c in clients) == len(femnist.train_y)
    one = client_data_for(femnist, 31, "natural", seed=0, device_index=30)
    assert torch.equal(one.test_x, clients[30].test_x)


def test_parse_partition():
    assert parse_partition("iid") == PartitionSpec("iid")
    assert parse_partition(" Classes:3 ") == PartitionSpec("classes", classes_per_client=3)
    assert parse_partition("dirichlet:0.3").alpha == 0.3
    assert parse_partition("niid-dirichlet:0.5").min_size == 10
    assert parse_partition("niid-dirichlet:0.5:20") == PartitionSpec("niid-dirichlet", alpha=0.5, min_size=20)
    assert str(parse_partition("niid-dirichlet:0.5:20")) == "niid-dirichlet:0.5:20"


@pytest.mark.parametrize(
    "bad",
    ["", "foo", "iid:3", "classes", "classes:0", "classes:x", "dirichlet:-1", "dirichlet:nan",
     "dirichlet", "niid-dirichlet:0.5:3:4", "niid-dirichlet:0.5:-1", "natural:2"],
)
def test_bad_specs(bad):
    with pytest.raises(ValueError) as err:
        parse_partition(bad)
    msg = str(err.value)
    assert "classes:2" in msg and "dirichlet:0.5" in msg and "niid-dirichlet" in msg and "natural" in msg
