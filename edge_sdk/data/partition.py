"""Deterministic client partitions of a labelled dataset.

Every server and every device must derive the same shards from (spec, seed)
alone, so all randomness comes from np.random.default_rng(seed) and nothing is
drawn from global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .datasets import FederatedSource, to_tensor

__all__ = [
    "PartitionSpec",
    "parse_partition",
    "partition",
    "train_test_split",
    "ClientData",
    "make_client_data",
    "client_data_for",
]

_NIID_MAX_TRIES = 1000
_NIID_DEFAULT_MIN = 10

_ACCEPTED = (
    "accepted partition specs: 'iid'; 'classes:K' (K classes per client, e.g. 'classes:2'); "
    "'dirichlet:ALPHA' (per-client class prior, equal sizes, e.g. 'dirichlet:0.5'); "
    "'niid-dirichlet:ALPHA' or 'niid-dirichlet:ALPHA:MIN' (per-class split over clients, "
    "e.g. 'niid-dirichlet:0.5' or 'niid-dirichlet:0.1:20'); 'natural' (by writer)"
)


@dataclass(frozen=True)
class PartitionSpec:
    kind: str  # "iid" | "classes" | "dirichlet" | "niid-dirichlet" | "natural"
    classes_per_client: int | None = None
    alpha: float | None = None
    min_size: int | None = None

    def __str__(self) -> str:
        if self.kind == "classes":
            return f"classes:{self.classes_per_client}"
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "niid-dirichlet":
            return f"niid-dirichlet:{self.alpha:g}:{self.min_size}"
        return self.kind


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"bad partition spec {spec!r}: {why}; {_ACCEPTED}")


def _parse_int(spec: str, text: str, what: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _bad(spec, f"{what} must be an integer, got {text!r}") from None
    if value < minimum:
        raise _bad(spec, f"{what} must be >= {minimum}, got {value}")
    return value


def _parse_alpha(spec: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(spec, f"ALPHA must be a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise _bad(spec, f"ALPHA must be a positive finite number, got {text!r}")
    return value


def parse_partition(spec: str) -> PartitionSpec:
    if not isinstance(spec, str):
        raise _bad(repr(spec), "spec must be a string")
    parts = spec.strip().lower().split(":")
    kind, args = parts[0], parts[1:]
    if kind in ("iid", "natural"):
        if args:
            raise _bad(spec, f"'{kind}' takes no parameters")
        return PartitionSpec(kind)
    if kind == "classes":
        if len(args) != 1:
            raise _bad(spec, "'classes' needs exactly one parameter K")
        return PartitionSpec(kind, classes_per_client=_parse_int(spec, args[0], "K", 1))
    if kind == "dirichlet":
        if len(args) != 1:
            raise _bad(spec, "'dirichlet' needs exactly one parameter ALPHA")
        return PartitionSpec(kind, alpha=_parse_alpha(spec, args[0]))
    if kind == "niid-dirichlet":
        if len(args) not in (1, 2):
            raise _bad(spec, "'niid-dirichlet' needs ALPHA and optionally MIN")
        min_size = _parse_int(spec, args[1], "MIN", 0) if len(args) == 2 else _NIID_DEFAULT_MIN
        return PartitionSpec(kind, alpha=_parse_alpha(spec, args[0]), min_size=min_size)
    raise _bad(spec, f"unknown kind {kind!r}")


# --- partition strategies -------------------------------------------------------------


def _iid(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uses every sample; sizes differ by at most one."""
    return list(np.array_split(rng.permutation(len(labels)), n_clients))


def _classes(labels, n_clients, k, n_classes, rng) -> list[np.ndarray]:
    """FedP3 S1. Client c holds classes c..c+K-1 (mod C), taking the same number s
    of samples from each, so all clients have exactly K*s samples. s is the
    largest even share every held class can afford: min over held classes of
    floor(count / holders). On class-balanced data (Fashion-MNIST) this is
    len(labels) // n_clients up to rounding; on unbalanced data (MNIST) the
    rarest held class sets s and the surplus of other classes goes unused."""
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


def _dirichlet(labels, n_clients, alpha, n_classes, rng) -> list[np.ndarray]:
    """FedP3 S2. Each client draws a class prior p ~ Dir(alpha) and then
    len(labels) // n_clients samples by p without replacement. Drawing the counts
    as a multinomial and redrawing the overflow of exhausted classes from p
    renormalised over the classes left is equivalent to drawing sample by sample."""
    size = len(labels) // n_clients
    pools = [rng.permutation(np.flatnonzero(labels == cl)) for cl in range(n_classes)]
    used = np.zeros(n_classes, dtype=np.int64)
    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    out = []
    for _ in range(n_clients):
        prior = rng.dirichlet(np.full(n_classes, alpha))
        counts = np.zeros(n_classes, dtype=np.int64)
        need = size
        while need > 0:
            avail = remaining > 0
            p = np.where(avail, prior, 0.0)
            total = p.sum()
            if not np.isfinite(total) or total <= 0:
                # The whole prior sits on exhausted classes (possible for tiny
                # alpha); fall back to uniform over what is left.
                p = avail.astype(np.float64)
                total = p.sum()
            draw = np.minimum(rng.multinomial(need, p / total), remaining)
            counts += draw
            remaining -= draw
            need -= int(draw.sum())
        out.append(
            np.concatenate([pools[cl][used[cl] : used[cl] + counts[cl]] for cl in range(n_classes)])
        )
        used += counts
    return out


def _niid_dirichlet(labels, n_clients, alpha, min_size, n_classes, rng) -> list[np.ndarray]:
    """NIID-Bench label skew: per class, proportions over clients ~ Dir(alpha);
    a client already holding its fair share n/N gets none of later classes (keeps
    sizes from running away). Redrawn until every client has >= min_size."""
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


def _natural(n_clients, writers, rng) -> list[np.ndarray]:
    """Clients take whole writers in a seeded order; with fewer clients than
    writers each client holds several writers (sizes follow the writers', so they
    are unequal by design), and no writer is ever split."""
    unique = np.unique(writers)
    if n_clients > len(unique):
        raise ValueError(f"natural partition: {n_clients} clients but only {len(unique)} writers")
    order = rng.permutation(unique)
    groups = np.array_split(order, n_clients)
    return [np.flatnonzero(np.isin(writers, g)) for g in groups]


def partition(
    labels: np.ndarray,
    num_clients: int,
    spec: str | PartitionSpec,
    seed: int,
    writers: np.ndarray | None = None,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Split sample indices among clients; returns disjoint, sorted int64 arrays.

    Same inputs always give identical outputs.
    """
    ps = parse_partition(spec) if isinstance(spec, str) else spec
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
    rng = np.random.default_rng(seed)

    if ps.kind == "iid":
        parts = _iid(labels, num_clients, rng)
    elif ps.kind == "classes":
        parts = _classes(labels, num_clients, ps.classes_per_client, num_classes, rng)
    elif ps.kind == "dirichlet":
        parts = _dirichlet(labels, num_clients, ps.alpha, num_classes, rng)
    elif ps.kind == "niid-dirichlet":
        parts = _niid_dirichlet(labels, num_clients, ps.alpha, ps.min_size, num_classes, rng)
    elif ps.kind == "natural":
        if writers is None:
            raise ValueError("natural partition needs per-sample writer ids (e.g. FEMNIST)")
        writers = np.asarray(writers)
        if writers.shape != labels.shape:
            raise ValueError(f"writers shape {writers.shape} does not match labels shape {labels.shape}")
        parts = _natural(num_clients, writers, rng)
    else:
        raise ValueError(f"unknown partition kind {ps.kind!r}; {_ACCEPTED}")
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


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


def _partition_source(source: FederatedSource, num_clients: int, spec, seed: int) -> list[np.ndarray]:
    return partition(
        source.train_y,
        num_clients,
        spec,
        seed,
        writers=source.train_writers,
        num_classes=source.info.num_classes,
    )


def make_client_data(
    source: FederatedSource, num_clients: int, spec: str | PartitionSpec, seed: int, train_fraction: float = 0.7
) -> list[ClientData]:
    """Partition the source's training set and split each shard locally; the
    official test set stays untouched for global evaluation."""
    parts = _partition_source(source, num_clients, spec, seed)
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
