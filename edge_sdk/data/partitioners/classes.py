"""`classes:K`: FedP3's S1 label skew, K consecutive classes per client."""

from __future__ import annotations

import numpy as np

from .registry import PartitionInput, PartitionSpec, bad_spec, parse_int, partitioner


def _parse(spec: str, args: list[str]) -> PartitionSpec:
    if len(args) != 1:
        raise bad_spec(spec, "'classes' needs exactly one parameter K")
    return PartitionSpec("classes", classes_per_client=parse_int(spec, args[0], "K", 1))


@partitioner("classes", parse=_parse, summary="K classes per client, e.g. 'classes:2'")
def classes(data: PartitionInput, spec: PartitionSpec) -> list[np.ndarray]:
    """FedP3 S1. Client c holds classes c..c+K-1 (mod C), taking the same number s
    of samples from each, so all clients have exactly K*s samples. s is the
    largest even share every held class can afford: min over held classes of
    floor(count / holders). On class-balanced data (Fashion-MNIST) this is
    len(labels) // n_clients up to rounding; on unbalanced data (MNIST) the
    rarest held class sets s and the surplus of other classes goes unused."""
    labels, n_clients, n_classes, rng = data.labels, data.num_clients, data.num_classes, data.rng
    k = spec.classes_per_client
    if k > n_classes:
        raise ValueError(f"classes:{k} asks for more classes per client than the {n_classes} available")
    held = [[(c + j) % n_classes for j in range(k)] for c in range(n_clients)]
    holders: dict[int, list[int]] = {}
    for c, cls in enumerate(held):
        for cl in cls:
            holders.setdefault(cl, []).append(c)
    pools = {cl: rng.permutation(np.flatnonzero(labels == cl)) for cl in sorted(holders)}
    share = min(len(pools[cl]) // len(hs) for cl, hs in holders.items())
    if share == 0:
        empty = [cl for cl, hs in holders.items() if len(pools[cl]) < len(hs)]
        raise ValueError(
            f"classes:{k} with {n_clients} clients: class(es) {empty} have fewer samples "
            f"than clients holding them; use fewer clients"
        )
    chunks: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for cl, hs in holders.items():
        for rank, c in enumerate(hs):
            chunks[c].append(pools[cl][rank * share : (rank + 1) * share])
    return [np.concatenate(ch) for ch in chunks]
