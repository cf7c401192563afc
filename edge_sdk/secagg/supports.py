"""Supports: the public set of global flat coordinates a device holds (its width prefix, rolling
window, uploaded layers), as a sorted int64 array; their wire form and digest; intersections.

A pairwise mask covers only the coordinates both devices hold, so both must agree on each
other's support exactly: the digest of every support is part of the round's parameters (and so of
the session id every encrypted share is bound to), and a support that arrives on the wire is
checked against it.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from .errors import SecAggError

RANGES, BITMAP = 0, 1  # wire kinds


def check_support(support, dim: int, what: str) -> np.ndarray:
    """`support` as a sorted, duplicate-free int64 array of coordinates in [0, dim)."""
    array = np.asarray(support)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise SecAggError(f"{what}: a support is a 1-d integer array, got {array.dtype} {array.shape}")
    array = array.astype(np.int64, copy=False)
    if array.size and (array[0] < 0 or array[-1] >= dim):
        raise SecAggError(f"{what}: coordinates must lie in [0, {dim})")
    if array.size > 1 and not np.all(array[1:] > array[:-1]):
        raise SecAggError(f"{what}: coordinates must be strictly increasing")
    return array


def to_ranges(support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the maximal runs of consecutive coordinates."""
    if support.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.flatnonzero(np.diff(support) != 1) + 1
    starts = support[np.concatenate(([0], breaks))]
    ends = support[np.concatenate((breaks - 1, [support.size - 1]))] + 1
    return starts, ends - starts


def from_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    if starts.size == 0:
        return np.zeros(0, np.int64)
    total = int(lengths.sum())
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(total, dtype=np.int64) + offsets


def digest(support: np.ndarray, dim: int) -> bytes:
    """SHA-256 over the canonical run form, so two equal supports have one digest whatever wire
    kind carried them."""
    starts, lengths = to_ranges(support)
    h = hashlib.sha256(b"fedprune-secagg/1 support\x00" + struct.pack(">QQ", dim, starts.size))
    h.update(starts.astype("<u4").tobytes())
    h.update(lengths.astype("<u4").tobytes())
    return h.digest()


def encode(support: np.ndarray, dim: int) -> bytes:
    """The smaller of RANGES (u32 count, then u32 starts, then u32 lengths, little-endian) and
    BITMAP (ceil(dim / 8) bytes, coordinate c in bit c % 8 of byte c // 8)."""
    starts, lengths = to_ranges(support)
    if 4 + 8 * starts.size <= (dim + 7) // 8:
        return (bytes([RANGES]) + struct.pack("<I", starts.size) + starts.astype("<u4").tobytes()
                + lengths.astype("<u4").tobytes())
    mask = np.zeros(dim, dtype=bool)
    mask[support] = True
    return bytes([BITMAP]) + np.packbits(mask, bitorder="little").tobytes()


def decode(data: bytes, dim: int, what: str) -> np.ndarray:
    """The support `encode` wrote; anything else (runs out of order, overlapping or touching,
    past `dim`, padding bits set, bytes left over) is refused."""
    if not data:
        raise SecAggError(f"{what}: empty support")
    kind, body = data[0], data[1:]
    if kind == RANGES:
        return _decode_ranges(body, dim, what)
    if kind == BITMAP:
        return _decode_bitmap(body, dim, what)
    raise SecAggError(f"{what}: unknown support kind {kind}")


def _decode_ranges(body: bytes, dim: int, what: str) -> np.ndarray:
    if len(body) < 4:
        raise SecAggError(f"{what}: truncated run count")
    (count,) = struct.unpack_from("<I", body)
    if len(body) != 4 + 8 * count:
        raise SecAggError(f"{what}: {count} runs take {4 + 8 * count} bytes, got {len(body)}")
    starts = np.frombuffer(body, "<u4", count, 4).astype(np.int64)
    lengths = np.frombuffer(body, "<u4", count, 4 + 4 * count).astype(np.int64)
    ends = starts + lengths
    if count and (lengths.min() < 1 or ends[-1] > dim or np.any(starts[1:] <= ends[:-1])):
        raise SecAggError(f"{what}: runs must be non-empty, increasing, separated and end "
                          f"within {dim}")
    return from_ranges(starts, lengths)


def _decode_bitmap(body: bytes, dim: int, what: str) -> np.ndarray:
    if len(body) != (dim + 7) // 8:
        raise SecAggError(f"{what}: a bitmap of {dim} coordinates is {(dim + 7) // 8} bytes, "
                          f"got {len(body)}")
    bits = np.unpackbits(np.frombuffer(body, np.uint8), bitorder="little")
    if bits[dim:].any():
        raise SecAggError(f"{what}: bitmap padding bits set")
    return np.flatnonzero(bits[:dim]).astype(np.int64)


def common_positions(own: np.ndarray, other: np.ndarray) -> np.ndarray | None:
    """Positions in `own` of the coordinates `other` also holds, in order; None when that is all
    of `own` (the caller adds without indexing)."""
    if own.size == other.size and np.array_equal(own, other):
        return None
    if other.size == 0 or own.size == 0:
        return np.zeros(0, np.int64)
    found = np.searchsorted(other, own)
    found[found == other.size] = 0
    positions = np.flatnonzero(other[found] == own)
    return None if positions.size == own.size else positions
