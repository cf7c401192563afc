"""`iid`: a seeded shuffle cut into equal shards."""

from __future__ import annotations

import numpy as np

from .registry import PartitionInput, PartitionSpec, no_params, partitioner


@partitioner("iid", parse=no_params, summary="shuffled, equal sizes")
def iid(data: PartitionInput, spec: PartitionSpec) -> list[np.ndarray]:
    """Uses every sample; sizes differ by at most one."""
    return list(np.array_split(data.rng.permutation(len(data.labels)), data.num_clients))
