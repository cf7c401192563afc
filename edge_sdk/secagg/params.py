"""A round's public parameters: who takes part (in Shamir order), the threshold, the neighbour
graph, the modulus, the release rule and every support's digest; and the session id they hash to.

**Threshold and dropout tolerance.** Each device shares its two secrets among its closed
neighbourhood (itself and its `degree` neighbours; everyone when the graph is complete), t of
k + 1 shares reconstruct. The round completes while every device whose secrets are needed keeps
at least t of its closed neighbourhood until the unmasking step: with the complete graph, n - t
devices may drop. t must exceed half the closed neighbourhood, so the self-mask seed and the
mask key of one device can never both be reconstructed, however the server splits the survivors
(each survivor reveals one of the two per neighbour). The default t is the larger of a majority
and two thirds of k + 1.

**Graph.** SecAgg+'s (Bell et al., CCS 2020) Harary graph: the devices permuted by a stream
seeded with the public round seed, each joined to the degree / 2 nearest on either side of the
ring; the complete graph when degree >= n - 1. Everybody derives the same graph from the seed.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..protocol.topics import check_id
from .errors import SecAggError
from .prg import keystream_words

VERSION = 1
MAX_DEVICES = 65535  # u16 indices; Shamir's x is index + 1
MAX_DIM = 2**28  # coordinates in the global flat vector: 1 GiB of uint32 at most
MIN_BITS, MAX_BITS = 8, 32
DIGEST_BYTES = 32
SEED_BYTES = 32


def default_degree(n: int) -> int:
    """2 ceil(2 log2 n) (SecAgg+'s O(log n)), the complete graph up to 19 devices. A heuristic,
    not Bell et al.'s tuned constants: pass `degree` to choose."""
    degree = 2 * math.ceil(2 * math.log2(max(n, 2)))
    return n - 1 if degree >= n - 1 else degree


def default_threshold(closed_size: int) -> int:
    return max(closed_size // 2 + 1, math.ceil(2 * closed_size / 3))


@dataclass(frozen=True)
class RoundParams:
    round_seed: bytes
    participants: tuple[str, ...]
    dim: int
    bits: int
    threshold: int
    degree: int
    min_holders: int
    support_digests: tuple[bytes, ...] = field(repr=False)

    def __post_init__(self) -> None:
        n = len(self.participants)
        if len(self.round_seed) != SEED_BYTES:
            raise SecAggError(f"round seed must be {SEED_BYTES} bytes")
        if not 2 <= n <= MAX_DEVICES:
            raise SecAggError(f"secure aggregation needs 2..{MAX_DEVICES} devices, got {n}")
        for device in self.participants:
            try:
                check_id("device id", device)
            except ValueError as exc:
                raise SecAggError(str(exc)) from None
        if list(self.participants) != sorted(set(self.participants)):
            raise SecAggError("participants must be sorted and distinct")
        if not 1 <= self.dim <= MAX_DIM:
            raise SecAggError(f"dim must lie in 1..{MAX_DIM}, got {self.dim}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise SecAggError(f"bits must lie in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        if not (self.degree == n - 1 or (self.degree % 2 == 0 and 2 <= self.degree < n - 1)):
            raise SecAggError(f"degree must be n - 1 = {n - 1} (complete) or even in 2..{n - 2}, "
                              f"got {self.degree}")
        closed = self.degree + 1
        if not closed // 2 < self.threshold <= closed:
            raise SecAggError(f"threshold must exceed half of a closed neighbourhood of {closed} "
                              f"and be at most {closed}, got {self.threshold}")
        if not 1 <= self.min_holders <= n:
            raise SecAggError(f"min_holders must lie in 1..{n}, got {self.min_holders}")
        if len(self.support_digests) != n or any(len(d) != DIGEST_BYTES for d in self.support_digests):
            raise SecAggError("one 32-byte support digest per participant")

    @property
    def n(self) -> int:
        return len(self.participants)

    @property
    def modulus_mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def word_bytes(self) -> int:
        """Bytes per masked value on the wire."""
        return 1 if self.bits <= 8 else 2 if self.bits <= 16 else 4

    def index(self, device_id: str) -> int:
        try:
            return self.participants.index(device_id)
        except ValueError:
            raise SecAggError(f"device {device_id!r} does not take part in this round") from None

    def to_bytes(self) -> bytes:
        """The canonical encoding (SETUP carries it; the session id hashes it)."""
        head = struct.pack(">BBHHHHQ", VERSION, self.bits, self.n, self.threshold, self.degree,
                           self.min_holders, self.dim) + self.round_seed
        rows = b"".join(bytes([len(d)]) + d.encode() + digest
                        for d, digest in zip(self.participants, self.support_digests))
        return head + rows

    @cached_property
    def session_id(self) -> bytes:
        """Every encrypted share and every message is bound to it: a server that shows two devices
        different parameters (supports, threshold, members) makes their shares fail to decrypt."""
        return hashlib.sha256(b"fedprune-secagg/1 session\x00" + self.to_bytes()).digest()

    @cached_property
    def neighbours(self) -> tuple[frozenset[int], ...]:
        """Per device index, its neighbours' indices (not itself)."""
        n = self.n
        if self.degree == n - 1:
            return tuple(frozenset(set(range(n)) - {i}) for i in range(n))
        ring = _permutation(self.round_seed, n)
        position = np.empty(n, np.int64)
        position[ring] = np.arange(n)
        half = self.degree // 2
        return tuple(frozenset(int(ring[(position[i] + step) % n])
                               for step in range(-half, half + 1) if step)
                     for i in range(n))

    def closed(self, i: int) -> frozenset[int]:
        return self.neighbours[i] | {i}


def _permutation(round_seed: bytes, n: int) -> np.ndarray:
    """Fisher-Yates driven by the round seed's stream, each draw exact by rejection."""
    seed = hashlib.sha256(b"fedprune-secagg/1 graph\x00" + round_seed).digest()
    words = iter(keystream_words(seed, 4 * n + 64).tolist())
    order = list(range(n))
    for top in range(n - 1, 0, -1):
        span = top + 1
        limit = 2**32 - (2**32 % span)
        while True:
            word = next(words, None)
            if word is None:  # astronomically unlikely: refill from a derived seed
                seed = hashlib.sha256(seed).digest()
                words = iter(keystream_words(seed, 4 * n + 64).tolist())
                continue
            if word < limit:
                break
        j = word % span
        order[top], order[j] = order[j], order[top]
    return np.array(order, np.int64)


def decode_params(data: bytes, offset: int, what: str) -> tuple[RoundParams, int]:
    """RoundParams from `data` at `offset`, and the offset after them."""
    fixed = struct.calcsize(">BBHHHHQ")
    if len(data) < offset + fixed + SEED_BYTES:
        raise SecAggError(f"{what}: truncated round parameters")
    version, bits, n, threshold, degree, min_holders, dim = struct.unpack_from(">BBHHHHQ", data, offset)
    if version != VERSION:
        raise SecAggError(f"{what}: parameters of version {version}, this library speaks {VERSION}")
    offset += fixed
    seed = data[offset:offset + SEED_BYTES]
    offset += SEED_BYTES
    ids, digests = [], []
    for _ in range(n):
        if offset >= len(data):
            raise SecAggError(f"{what}: truncated participant list")
        length = data[offset]
        end = offset + 1 + length + DIGEST_BYTES
        if length == 0 or end > len(data):
            raise SecAggError(f"{what}: truncated or empty participant id")
        try:
            ids.append(data[offset + 1:offset + 1 + length].decode("ascii"))
        except UnicodeDecodeError:
            raise SecAggError(f"{what}: a participant id is not ASCII") from None
        digests.append(data[end - DIGEST_BYTES:end])
        offset = end
    params = RoundParams(seed, tuple(ids), dim, bits, threshold, degree, min_holders, tuple(digests))
    return params, offset
