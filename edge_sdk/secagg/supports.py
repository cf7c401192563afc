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
    return digest_runs(*to_ranges(support), dim)


def digest_runs(starts: np.ndarray, lengths: np.ndarray, dim: int) -> bytes:
    h = hashlib.sha256(b"fedprune-secagg/1 support\x00" + struct.pack(">QQ", dim, starts.size))
    h.update(starts.astype("<u4").tobytes())
    h.update(lengths.astype("<u4").tobytes())
    return h.digest()


def encode(starts: np.ndarray, lengths: np.ndarray, dim: int) -> bytes:
    """The runs' support as the smaller of RANGES (u32 count, then u32 starts, then u32 lengths,
    little-endian) and BITMAP (ceil(dim / 8) bytes, coordinate c in bit c % 8 of byte c // 8)."""
    if 4 + 8 * starts.size <= (dim + 7) // 8:
        return (bytes([RANGES]) + struct.pack("<I", starts.size) + starts.astype("<u4").tobytes()
                + lengths.astype("<u4").tobytes())
    mask = np.zeros(dim, dtype=bool)
    mask[from_ranges(starts, lengths)] = True
    return bytes([BITMAP]) + np.packbits(mask, bitorder="little").tobytes()


def coordinates(starts: np.ndarray, lengths: np.ndarray) -> slice | np.ndarray:
    """The runs' coordinates for indexing a global vector: a slice when they are one run (no
    array of millions of indices for the common whole-tensor support)."""
    if starts.size == 1:
        return slice(int(starts[0]), int(starts[0] + lengths[0]))
    return from_ranges(starts, lengths)


def decode(data: bytes, dim: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The runs (starts, lengths) of the support `encode` wrote; anything else (runs out of
    order, overlapping or touching, past `dim`, padding bits set, bytes left over) is refused.
    Runs, not coordinates: a device expands a neighbour's support only when it differs from its
    own."""
    if not data:
        raise SecAggError(f"{what}: empty support")
    kind, body = data[0], data[1:]
    if kind == RANGES:
        return _decode_ranges(body, dim, what)
    if kind == BITMAP:
        return _decode_bitmap(body, dim, what)
    raise SecAggError(f"{what}: unknown support kind {kind}")


def _decode_ranges(body: bytes, dim: int, what: str) -> tuple[np.ndarray, np.ndarray]:
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
    return starts, lengths


def _decode_bitmap(body: bytes, dim: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    if len(body) != (dim + 7) // 8:
        raise SecAggError(f"{what}: a bitmap of {dim} coordinates is {(dim + 7) // 8} bytes, "
                          f"got {len(body)}")
    bits = np.unpackbits(np.frombuffer(body, np.uint8), bitorder="little")
    if bits[dim:].any():
        raise SecAggError(f"{what}: bitmap padding bits set")
    return to_ranges(np.flatnonzero(bits[:dim]).astype(np.int64))


MAX_LOOPED_RUNS = 200_000  # beyond this many runs, intersect expanded arrays instead


def common_runs(own: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The coordinates both supports hold, as pieces contiguous both in `own`'s order and
    globally: (positions in `own` where each piece starts, its global start, its length), in
    increasing order. Width prefixes and windows are a few thousand runs, intersected run by
    run; a scattered (bitmap) support through arrays."""
    (s1, l1), (s2, l2) = own, other
    if s1.size + s2.size > MAX_LOOPED_RUNS:
        return _common_pieces_by_array(own, other)
    offsets = np.concatenate(([0], np.cumsum(l1)[:-1])).tolist()
    starts1, ends1 = s1.tolist(), (s1 + l1).tolist()
    starts2, ends2 = s2.tolist(), (s2 + l2).tolist()
    positions, starts, lengths = [], [], []
    i = j = 0
    while i < len(starts1) and j < len(starts2):
        low, high = max(starts1[i], starts2[j]), min(ends1[i], ends2[j])
        if low < high:
            positions.append(offsets[i] + low - starts1[i])
            starts.append(low)
            lengths.append(high - low)
        if ends1[i] <= ends2[j]:
            i += 1
        else:
            j += 1
    return (np.array(positions, np.int64), np.array(starts, np.int64), np.array(lengths, np.int64))


def _common_pieces_by_array(own, other):
    mine, theirs = from_ranges(*own), from_ranges(*other)
    found = np.searchsorted(theirs, mine)
    found[found == theirs.size] = 0
    positions = np.flatnonzero(theirs[found] == mine) if theirs.size else np.zeros(0, np.int64)
    coordinates = mine[positions]
    breaks = np.flatnonzero((np.diff(positions) != 1) | (np.diff(coordinates) != 1)) + 1
    first = np.concatenate(([0], breaks)) if positions.size else np.zeros(0, np.int64)
    last = np.concatenate((breaks, [positions.size])) if positions.size else np.zeros(0, np.int64)
    return positions[first], coordinates[first], last - first


def add_at_runs(target: np.ndarray, starts: np.ndarray, lengths: np.ndarray, values: np.ndarray) -> None:
    """target[runs] += values (the runs' coordinates in order), in place: a slice a run when runs
    are long (no index array of millions), one fancy-indexed add when they are short."""
    if starts.size * 64 <= values.size:
        offset = 0
        for start, length in zip(starts.tolist(), lengths.tolist()):
            target[start:start + length] += values[offset:offset + length]
            offset += length
    elif values.size:
        target[from_ranges(starts, lengths)] += values
