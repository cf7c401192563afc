"""Deterministic client partitions of a labelled dataset, the local train/test split, `ClientData`.

Every server and every device must derive the same shards from (spec, seed[, groups]) alone, so
all randomness comes from np.random.default_rng(seed) and nothing is drawn from global state. The
kinds themselves live in partitioners/ (one file each, registered by name); `partition` validates
the input and dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .datasets import FederatedSource, to_tensor
from .partitioners import NEEDS_FLEET, PartitionInput, PartitionSpec, parse_partition, partitioner_kind

__all__ = [
    "PartitionSpec",
    "needs_groups",
    "parse_partition",
    "partition",
    "train_test_split",
    "ClientData",
    "make_client_data",
    "client_data_for",
]


def needs_groups(spec: str | PartitionSpec) -> bool:
    """Whether the kind needs each client's device tier (`groups`): a simulation then samples its
    fleet before partitioning."""
    ps = parse_partition(spec) if isinstance(spec, str) else spec
    return partitioner_kind(ps.kind).needs_groups


def partition(
    labels: np.ndarray,
    num_clients: int,
    spec: str | PartitionSpec,
    seed: int,
    writers: np.ndarray | None = None,
    num_classes: int | None = None,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split sample indices among clients; returns disjoint, sorted int64 arrays.

    `groups`: each client's device tier (0 = weakest, device_profiles.tiers), which the tier kinds
    need and the others ignore. Same inputs always give identical outputs.
    """
    ps = parse_partition(spec) if isinstance(spec, str) else spec
    kind = partitioner_kind(ps.kind)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    num_clients = int(num_clients)
    if num_clients > len(labels):
        raise ValueError(f"{num_clients} clients requested but only {len(labels)} samples")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    if kind.needs_groups:
        groups = _check_groups(groups, num_clients, ps)
    rng = np.random.default_rng(seed)
    parts = kind.split(PartitionInput(labels, num_clients, num_classes, rng,
                                      None if writers is None else np.asarray(writers),
                                      groups if kind.needs_groups else None), ps)
    if len(parts) != num_clients:
        raise ValueError(f"partition kind {ps.kind!r} returned {len(parts)} shards for "
                         f"{num_clients} clients")
    return [np.sort(np.asarray(p)).astype(np.int64, copy=False) for p in parts]


def _check_groups(groups, num_clients: int, ps: PartitionSpec) -> np.ndarray:
    if groups is None:
        raise ValueError(f"partition {str(ps)!r} {NEEDS_FLEET}")
    groups = np.asarray(groups)
    if groups.shape != (num_clients,) or not np.issubdtype(groups.dtype, np.integer) \
            or (len(groups) and groups.min() < 0):
        raise ValueError(f"partition {str(ps)!r}: groups must be one non-negative tier index per "
                         f"client ({num_clients}), got shape {groups.shape} of {groups.dtype}")
    return groups.astype(np.int64)


def train_test_split(
    indices: np.ndarray, seed: int, device_index: int, train_fraction: float = 0.7
) -> tuple[np.ndarray, np.ndarray]:
    """Local split seeded by (seed, device_index), so a device can derive its own split
    without knowing anyone else's. Both halves are non-empty when n >= 2."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    indices = np.asarray(indices)
    n = len(indices)
    shuffled = np.random.default_rng((seed, device_index)).permutation(indices)
    n_train = int(round(train_fraction * n))
    if n >= 2:
        n_train = min(max(n_train, 1), n - 1)
    return np.sort(shuffled[:n_train]), np.sort(shuffled[n_train:])


# eq=False: tensors make field-wise equality ambiguous.
@dataclass(frozen=True, eq=False)
class ClientData:
    device_index: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def capped(self, limit: int | None) -> ClientData:
        """At most `limit` samples, train and test in the shard's proportion (the simulator's
        `max_client_samples`: quick runs)."""
        if limit is None or len(self.train_y) + len(self.test_y) <= limit:
            return self
        n_train = max(1, round(limit * len(self.train_y) / (len(self.train_y) + len(self.test_y))))
        n_test = max(1, limit - n_train)
        return ClientData(self.device_index, self.train_x[:n_train], self.train_y[:n_train],
                          self.test_x[:n_test], self.test_y[:n_test])

    def with_train_limit(self, limit: int | None) -> ClientData:
        """At most `limit` training samples and half as many test samples (a device's
        `max_samples`: it registers exactly what it trains on, the demo and tests size by it)."""
        if limit is None or len(self.train_y) <= limit:
            return self
        n_test = max(1, limit // 2)
        return ClientData(self.device_index, self.train_x[:limit], self.train_y[:limit],
                          self.test_x[:n_test], self.test_y[:n_test])


def _build_client(source: FederatedSource, device_index: int, idx: np.ndarray, seed: int, train_fraction: float) -> ClientData:
    tr, te = train_test_split(idx, seed, device_index, train_fraction)
    return ClientData(
        device_index=device_index,
        train_x=to_tensor(source.train_x[tr], source.info),
        train_y=torch.from_numpy(source.train_y[tr].astype(np.int64)),
        test_x=to_tensor(source.train_x[te], source.info),
        test_y=torch.from_numpy(source.train_y[te].astype(np.int64)),
    )


def _partition_source(source: FederatedSource, num_clients: int, spec, seed: int,
                      groups: np.ndarray | None = None) -> list[np.ndarray]:
    return partition(
        source.train_y,
        num_clients,
        spec,
        seed,
        writers=source.train_writers,
        num_classes=source.info.num_classes,
        groups=groups,
    )


def make_client_data(
    source: FederatedSource, num_clients: int, spec: str | PartitionSpec, seed: int, train_fraction: float = 0.7,
    groups: np.ndarray | None = None,
) -> list[ClientData]:
    """Partition the source's training set and split each shard locally; the
    official test set stays untouched for global evaluation. `groups`: each client's tier (the
    tier kinds need it)."""
    parts = _partition_source(source, num_clients, spec, seed, groups)
    return [_build_client(source, c, idx, seed, train_fraction) for c, idx in enumerate(parts)]


def client_data_for(
    source: FederatedSource,
    num_clients: int,
    spec: str | PartitionSpec,
    seed: int,
    device_index: int,
    train_fraction: float = 0.7,
) -> ClientData:
    """One client's shard, identical to make_client_data(...)[device_index], without
    materialising everyone else's tensors (a device only needs its own)."""
    if not 0 <= device_index < num_clients:
        raise ValueError(f"device_index {device_index} outside 0..{num_clients - 1}")
    parts = _partition_source(source, num_clients, spec, seed)
    return _build_client(source, device_index, parts[device_index], seed, train_fraction)
