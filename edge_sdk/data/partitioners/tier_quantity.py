"""`tier-quantity:R`: quantity skew by tier, label-iid: a tier-t client's shard is proportional to R**t.

With R > 1 weak devices hold less data than strong ones (cheap sensors and gateways log less
than flagship phones); an aggregation weighting by sample counts then
hears weak devices less even when they are selected. Every sample is used.
"""

from __future__ import annotations

import numpy as np

from .registry import PartitionInput, PartitionSpec, check_nonempty, one_param, partitioner, tiers_of


@partitioner("tier-quantity", parse=one_param("ratio", "R", low=0.0), needs_groups=True,
             summary="label-iid, a tier-t client holds a share proportional to R**t, "
                     "e.g. 'tier-quantity:2'")
def tier_quantity(data: PartitionInput, spec: PartitionSpec) -> list[np.ndarray]:
    groups = tiers_of(data, "tier-quantity")
    weights = spec.param("ratio") ** groups.astype(np.float64)
    exact = len(data.labels) * weights / weights.sum()
    sizes = np.floor(exact).astype(np.int64)
    # Largest remainders (ties to the lower client index) take the samples flooring left over.
    left = len(data.labels) - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:left]] += 1
    if sizes.min() == 0:
        raise ValueError(f"tier-quantity:{spec.param('ratio'):g}: {len(data.labels)} samples give "
                         f"client(s) {np.flatnonzero(sizes == 0)[:10].tolist()} none; use a ratio "
                         f"nearer 1 or fewer clients")
    order = data.rng.permutation(len(data.labels))
    return check_nonempty(np.split(order, np.cumsum(sizes)[:-1]), "tier-quantity")
