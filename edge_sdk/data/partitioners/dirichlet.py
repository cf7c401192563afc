"""`dirichlet:ALPHA`: FedP3's S2, a Dirichlet class prior per client, equal sizes."""

from __future__ import annotations

import numpy as np

from .registry import PartitionInput, PartitionSpec, bad_spec, parse_alpha, partitioner


def _parse(spec: str, args: list[str]) -> PartitionSpec:
    if len(args) != 1:
        raise bad_spec(spec, "'dirichlet' needs exactly one parameter ALPHA")
    return PartitionSpec("dirichlet", alpha=parse_alpha(spec, args[0]))


def draw_by_priors(labels: np.ndarray, priors: list[np.ndarray], size: int, n_classes: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Client i draws `size` samples by priors[i] without replacement. Drawing the counts as a
    multinomial and redrawing the overflow of exhausted classes from the prior renormalised over
    the classes left is equivalent to drawing sample by sample. (tier-dirichlet shares it.)"""
    pools = [rng.permutation(np.flatnonzero(labels == cl)) for cl in range(n_classes)]
    used = np.zeros(n_classes, dtype=np.int64)
    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    out = []
    for prior in priors:
        prior = prior() if callable(prior) else prior
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


@partitioner("dirichlet", parse=_parse,
             summary="per-client class prior, equal sizes, e.g. 'dirichlet:0.5'")
def dirichlet(data: PartitionInput, spec: PartitionSpec) -> list[np.ndarray]:
    """FedP3 S2. Each client draws a class prior p ~ Dir(alpha) and then
    len(labels) // n_clients samples by p without replacement. Each prior is drawn just before
    its client's samples (a callable prior), so the generator's sequence is the one the
    partition has always used."""
    n_classes, rng = data.num_classes, data.rng
    priors = [lambda: rng.dirichlet(np.full(n_classes, spec.alpha))] * data.num_clients
    return draw_by_priors(data.labels, priors, len(data.labels) // data.num_clients, n_classes, rng)
