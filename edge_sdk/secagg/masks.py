"""Adding and removing masks on uint32 vectors (arithmetic mod 2**32; the result is reduced mod
2**bits, which divides it, only on the wire).

Device i adds PRG(self seed) over its whole support and, for each neighbour j it exchanged
shares with, +PRG(s_ij) if i < j else -PRG(s_ij) over the coordinates both hold. Summed over
the survivors, pairwise masks cancel; the server removes the self masks and the masks shared
with dropped devices once it has reconstructed their seeds.
"""

from __future__ import annotations

import numpy as np

from .prg import keystream_words


def pair_sign(me: int, other: int) -> int:
    return 1 if me < other else -1


def apply(target: np.ndarray, positions: np.ndarray | None, seed: bytes, sign: int) -> None:
    """target[positions] += sign * PRG(seed), in place; `positions` None means all of `target`.
    Positions are distinct, so fancy-indexed in-place arithmetic is exact."""
    count = target.size if positions is None else positions.size
    if count == 0:
        return
    stream = keystream_words(seed, count)
    if positions is None:
        if sign > 0:
            target += stream
        else:
            target -= stream
    elif sign > 0:
        target[positions] += stream
    else:
        target[positions] -= stream
