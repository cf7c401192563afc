"""`niid-dirichlet:ALPHA[:MIN]`: NIID-Bench's label skew, Dirichlet over clients per class."""

from __future__ import annotations

import numpy as np

from .registry import PartitionInput, PartitionSpec, bad_spec, parse_alpha, parse_int, partitioner

_NIID_MAX_TRIES = 1000
_NIID_DEFAULT_MIN = 10


def _parse(spec: str, args: list[str]) -> PartitionSpec:
    if len(args) not in (1, 2):
        raise bad_spec(spec, "'niid-dirichlet' needs ALPHA and optionally MIN")
    min_size = parse_int(spec, args[1], "MIN", 0) if len(args) == 2 else _NIID_DEFAULT_MIN
    return PartitionSpec("niid-dirichlet", alpha=parse_alpha(spec, args[0]), min_size=min_size)


@partitioner("niid-dirichlet", parse=_parse,
             summary="'niid-dirichlet:ALPHA' or 'niid-dirichlet:ALPHA:MIN', per-class split over "
                     "clients, e.g. 'niid-dirichlet:0.5' or 'niid-dirichlet:0.1:20'")
def niid_dirichlet(data: PartitionInput, spec: PartitionSpec) -> list[np.ndarray]:
    """NIID-Bench label skew: per class, proportions over clients ~ Dir(alpha);
    a client already holding its fair share n/N gets none of later classes (keeps
    sizes from running away). Redrawn until every client has >= min_size."""
    labels, n_clients, n_classes, rng = data.labels, data.num_clients, data.num_classes, data.rng
    alpha, min_size = spec.alpha, spec.min_size
    n = len(labels)
    if n_clients * min_size > n:
        raise ValueError(
            f"niid-dirichlet: {n_clients} clients x MIN {min_size} exceeds the {n} samples available"
        )
    class_idx = [np.flatnonzero(labels == cl) for cl in range(n_classes)]
    for _ in range(_NIID_MAX_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        sizes = np.zeros(n_clients, dtype=np.int64)
        for idx in class_idx:
            if len(idx) == 0:
                continue
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(n_clients, alpha))
            masked = np.where(sizes < n / n_clients, props, 0.0)
            if masked.sum() > 0:
                props = masked
            props = props / props.sum()
            cuts = np.floor(np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for c, piece in enumerate(np.split(idx, cuts)):
                buckets[c].append(piece)
                sizes[c] += len(piece)
        if sizes.min() >= min_size:
            return [np.concatenate(b) if b else np.empty(0, dtype=np.int64) for b in buckets]
    raise ValueError(
        f"niid-dirichlet:{alpha:g}:{min_size}: could not give all {n_clients} clients at least "
        f"{min_size} samples in {_NIID_MAX_TRIES} draws; use a larger ALPHA, a smaller MIN, "
        f"or fewer clients"
    )
