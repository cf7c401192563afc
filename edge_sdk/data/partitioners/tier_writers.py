"""`tier-writers`: whole writers per client, writers grouped into tiers by their share of digits.

Why digits: digits and letters are different tasks for the model, and a writer's share of
digit samples is the one label-level property FEMNIST's writers differ by (their handwriting
aside), so ordering writers by it and giving the lowest-share writers to the weakest tier, the
next to the next tier, makes each tier's labels differ while no writer is ever split (as in
`natural`). The skew is mild on FEMNIST: writers filled the same NIST forms, and in LEAF's
31-writer sample the shares run 0.66 to 1.0 (median 0.71); 3 tiers of 3/4/3 clients there hold
0.69, 0.72 and 0.79 digits. For a strong tier skew use tier-classes. On data that is not
FEMNIST's 62 classes (a CSV's user column), the property is a writer's share of the lower half
of the classes.

Each tier gets a run of writers in that order, as many as its clients plus its proportional
share of the rest; inside a tier the writers are shuffled (seeded) and dealt out whole.
"""

from __future__ import annotations

import numpy as np

from .natural import writers_of
from .registry import PartitionInput, PartitionSpec, check_nonempty, no_params, partitioner, tiers_of

FEMNIST_CLASSES = 62
FEMNIST_DIGITS = 10  # labels 0-9 are digits, 10-61 letters


@partitioner("tier-writers", parse=no_params, needs_groups=True, needs_writers=True,
             summary="whole writers per client, tiers by the writers' share of digits (FEMNIST)")
def tier_writers(data: PartitionInput, spec: PartitionSpec) -> list[np.ndarray]:
    groups = tiers_of(data, "tier-writers")
    writers = writers_of(data, "tier-writers")
    unique = np.unique(writers)
    if data.num_clients > len(unique):
        raise ValueError(f"tier-writers partition: {data.num_clients} clients but only "
                         f"{len(unique)} writers")
    cut = FEMNIST_DIGITS if data.num_classes == FEMNIST_CLASSES else data.num_classes // 2
    position = np.searchsorted(unique, writers)
    low = np.bincount(position, weights=(data.labels < cut).astype(np.float64), minlength=len(unique))
    shares = low / np.bincount(position, minlength=len(unique))
    ordered = unique[np.lexsort((unique, shares))]  # by share, ties by writer id
    present = sorted(int(t) for t in np.unique(groups))
    counts = np.array([np.sum(groups == t) for t in present])
    extra = len(unique) - data.num_clients
    exact = extra * counts / counts.sum()
    given = np.floor(exact).astype(np.int64)
    given[np.argsort(-(exact - given), kind="stable")[:extra - int(given.sum())]] += 1
    bounds = np.cumsum(counts + given)[:-1]
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * data.num_clients
    for tier, run in zip(present, np.split(ordered, bounds)):
        clients = np.flatnonzero(groups == tier)
        for client, held in zip(clients, np.array_split(data.rng.permutation(run), len(clients))):
            parts[client] = np.flatnonzero(np.isin(writers, held))
    return check_nonempty(parts, "tier-writers")
