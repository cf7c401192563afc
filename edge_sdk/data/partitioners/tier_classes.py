"""`tier-classes:S`: label skew by device tier, so each tier holds classes the others hold little of.

The classes (in a seeded order) are cut into disjoint blocks, one per tier present in the fleet.
Every client gets the same number of samples: a share 1-S from its own tier's block and S spread
evenly over the other tiers' blocks. Leaving a weak tier out of training then loses classes the
rest of the fleet barely sees: the case inclusive-FL methods claim to fix. With one tier present
there is one block (all classes) and the kind is an equal-size label-iid split.
"""

from __future__ import annotations

import numpy as np

from .registry import PartitionInput, PartitionSpec, check_nonempty, one_param, partitioner, tiers_of


def _plan(size: int, share: float, counts: dict[int, int]) -> tuple[int, int]:
    """(own, other) samples per client, `other` being what each other block gives."""
    others = len(counts) - 1
    own = size if others == 0 else int(round((1 - share) * size))
    return own, (size - own) // others if others else 0


@partitioner("tier-classes", parse=one_param("share", "S", low=0.0, high=1.0, low_open=False),
             needs_groups=True,
             summary="label skew by tier: a share 1-S from the tier's own classes, S from the "
                     "other tiers', e.g. 'tier-classes:0.1'")
def tier_classes(data: PartitionInput, spec: PartitionSpec) -> list[np.ndarray]:
    groups = tiers_of(data, "tier-classes")
    share = spec.param("share")
    present = sorted(int(t) for t in np.unique(groups))
    if len(present) > data.num_classes:
        raise ValueError(f"tier-classes: {len(present)} tiers but only {data.num_classes} classes "
                         f"to give each tier a block of its own")
    order = data.rng.permutation(data.num_classes)
    blocks = dict(zip(present, np.array_split(order, len(present))))
    pools = {t: data.rng.permutation(np.flatnonzero(np.isin(data.labels, cls)))
             for t, cls in blocks.items()}
    counts = {t: int(np.sum(groups == t)) for t in present}

    def fits(size: int) -> bool:
        own, other = _plan(size, share, counts)
        return all(own * counts[t] + other * (data.num_clients - counts[t]) <= len(pools[t])
                   for t in present)

    size = len(data.labels) // data.num_clients
    while size > 0 and not fits(size):  # the largest equal size every block can supply
        size -= 1
    if size == 0:
        raise ValueError(f"tier-classes:{share:g}: a tier's classes have too few samples for "
                         f"{data.num_clients} clients; use fewer clients")
    own, other = _plan(size, share, counts)
    taken = dict.fromkeys(present, 0)
    parts = []
    for tier in (int(t) for t in groups):
        pieces = []
        for block in present:
            n = own if block == tier else other
            pieces.append(pools[block][taken[block]:taken[block] + n])
            taken[block] += n
        parts.append(np.concatenate(pieces))
    return check_nonempty(parts, "tier-classes")
