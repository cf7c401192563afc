"""The partitioner registry (edge_sdk/data/partitioners/) and the tier-aware kinds: the old kinds'
outputs pinned from before they moved, each tier kind's property measured on real labels, a kind
added by an entry point, and a simulation whose shards follow its fleet's tiers."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from edge_sdk.data import load_dataset, partition, resolve_data_dir

# sha256 (first 16 hex) of each client's index array, taken with the if-chain partition.py had
# before the kinds moved to the registry: the move must not change a single index.
PINNED = {
    ("iid", 20, 1): "05839eabede56509",
    ("classes:2", 20, 1): "52d5b9e12c168e37",
    ("classes:5", 10, 0): "f43dc81b0a63609f",
    ("dirichlet:0.5", 20, 1): "2d746b5a788a4e0e",
    ("niid-dirichlet:0.5", 20, 1): "0939f8deb3aec229",
    ("niid-dirichlet:0.1:20", 30, 2): "6d143c4ba053ec04",
}
PINNED_NATURAL = "3e0eb0da3e807461"  # femnist, 10 clients, seed 3


def _digest(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(np.asarray(p, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset("fashion-mnist", data_dir=resolve_data_dir(), download=False)


@pytest.fixture(scope="module")
def femnist():
    return load_dataset("femnist", data_dir=resolve_data_dir(), download=False)


@pytest.mark.parametrize("spec,clients,seed", sorted(PINNED))
def test_old_kinds_give_the_pinned_partitions(fmnist, spec, clients, seed):
    assert _digest(partition(fmnist.train_y, clients, spec, seed)) == PINNED[(spec, clients, seed)]


def test_natural_gives_the_pinned_partition(femnist):
    parts = partition(femnist.train_y, 10, "natural", 3, writers=femnist.train_writers,
                      num_classes=62)
    assert _digest(parts) == PINNED_NATURAL
