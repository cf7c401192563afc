"""`natural`: whole writers per client (FEMNIST's writers, a CSV's user column)."""

from __future__ import annotations

import numpy as np

from .registry import PartitionInput, PartitionSpec, no_params, partitioner


def writers_of(data: PartitionInput, kind: str) -> np.ndarray:
    if data.writers is None:
        raise ValueError(f"{kind} partition needs per-sample writer ids (e.g. FEMNIST)")
    writers = np.asarray(data.writers)
    if writers.shape != data.labels.shape:
        raise ValueError(f"writers shape {writers.shape} does not match labels shape "
                         f"{data.labels.shape}")
    return writers


@partitioner("natural", parse=no_params, needs_writers=True, summary="by writer")
def natural(data: PartitionInput, spec: PartitionSpec) -> list[np.ndarray]:
    """Clients take whole writers in a seeded order; with fewer clients than
    writers each client holds several writers (sizes follow the writers', so they
    are unequal by design), and no writer is ever split."""
    writers = writers_of(data, "natural")
    unique = np.unique(writers)
    if data.num_clients > len(unique):
        raise ValueError(f"natural partition: {data.num_clients} clients but only {len(unique)} writers")
    order = data.rng.permutation(unique)
    groups = np.array_split(order, data.num_clients)
    return [np.flatnonzero(np.isin(writers, g)) for g in groups]
