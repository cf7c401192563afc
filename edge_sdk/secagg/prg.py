"""The pseudo-random generator every mask is expanded from: a ChaCha20 keystream read as
little-endian uint32 words.

A cipher's keystream, not numpy's generators: a mask must be unpredictable to whoever does not
hold its seed, and both ends of a pair (and the server, after unmasking) must expand the same
seed to the same words on any platform.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
_NONCE = bytes(16)  # every seed is used for one stream only, so a fixed nonce is safe


def keystream_words(seed: bytes, count: int) -> np.ndarray:
    """`count` uint32 words of the seed's stream (a new array the caller may modify)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed is {SEED_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * count))
    return np.frombuffer(bytearray(stream), dtype="<u4").astype(np.uint32, copy=False)
