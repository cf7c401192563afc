"""Randomness for rounding and noise that no one but the device can reproduce.

The coordinator sees every seed it hands out, so rounding and noise never use one: each
`OsRandom` keys a ChaCha20 stream with 32 fresh bytes of `os.urandom` (a cryptographic stream,
so its outputs reveal nothing about later ones), and draws exact uniform integers from it by
rejection (no modulo bias: the discrete Gaussian sampler needs exact Bernoulli(n/d) draws).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_TWO64_MINUS_1 = np.uint64(2**64 - 1)
MAX_BOUND = 2**63  # uniform draws below at most this


class OsRandom:
    def __init__(self) -> None:
        self._stream = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)),
                              mode=None).encryptor()

    def words(self, count: int) -> np.ndarray:
        """`count` uniform uint64 words (read-only)."""
        return np.frombuffer(self._stream.update(bytes(8 * count)), dtype="<u8")

    def below(self, bound, count: int) -> np.ndarray:
        """`count` exact uniform integers in [0, bound) as int64; `bound` is one int or an array of
        `count` ints, each in [1, 2**63]. A word w is kept when w >= 2**64 mod bound, so the kept
        range is a whole number of copies of [0, bound)."""
        if np.ndim(bound) == 0:
            return self._below_one(int(bound), count)
        bounds = np.asarray(bound, dtype=np.uint64)
        if count and (bounds.min() < 1 or bounds.max() > MAX_BOUND):
            raise ValueError(f"uniform bounds must lie in [1, 2**63], got {bounds.min()}..{bounds.max()}")
        low = (_TWO64_MINUS_1 % bounds + np.uint64(1)) % bounds  # 2**64 mod bound
        out = np.empty(count, dtype=np.int64)
        pending = np.arange(count)
        while pending.size:
            drawn = self.words(pending.size)
            kept = drawn >= low[pending]
            chosen = pending[kept]
            out[chosen] = (drawn[kept] % bounds[chosen]).astype(np.int64)
            pending = pending[~kept]
        return out

    def _below_one(self, bound: int, count: int) -> np.ndarray:
        if not 1 <= bound <= MAX_BOUND:
            raise ValueError(f"uniform bound must lie in [1, 2**63], got {bound}")
        if bound & (bound - 1) == 0:
            return (self.words(count) & np.uint64(bound - 1)).astype(np.int64)
        low = np.uint64(2**64 % bound)
        drawn = self.words(count)
        out = (drawn % np.uint64(bound)).astype(np.int64)
        redo = np.flatnonzero(drawn < low)
        if redo.size:
            out[redo] = self._below_one(bound, redo.size)
        return out

    def unit(self, count: int) -> np.ndarray:
        """`count` uniform floats in [0, 1), each a multiple of 2**-53 (exact comparisons with a
        float probability)."""
        return (self.words(count) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def bits(self, count: int) -> np.ndarray:
        """`count` fair coin flips."""
        raw = np.frombuffer(self._stream.update(bytes((count + 7) // 8)), np.uint8)
        return np.unpackbits(raw, count=count).astype(bool)
