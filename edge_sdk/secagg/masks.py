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
from .supports import add_at_runs


def pair_sign(me: int, other: int) -> int:
    return 1 if me < other else -1


def apply(target: np.ndarray, runs: tuple[np.ndarray, np.ndarray] | None, seed: bytes,
          sign: int) -> None:
    """Adds sign * PRG(seed) to `target` in place, word k of the stream at the k-th coordinate of
    `runs` (starts, lengths); `runs` None means all of `target` in order."""
    count = target.size if runs is None else int(runs[1].sum())
    if count == 0:
        return
    stream = keystream_words(seed, count)
    if sign < 0:
        np.negative(stream, out=stream)  # mod 2**32
    if runs is None:
        target += stream
    else:
        add_at_runs(target, runs[0], runs[1], stream)
