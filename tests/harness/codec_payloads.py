"""Tensor payloads built straight from the documented format (docs/PROTOCOL.md), for the codec
tests: a header around any body, records field by field, and random sparse tensors."""

from __future__ import annotations

import struct

import numpy as np
import zstandard

from edge_sdk.codec import SparseTensor

HEADER = struct.Struct("<4sBBBBII")


def wrap(body: bytes, count: int, dtype: int = 1, declared: int | None = None, **zstd_kwargs) -> bytes:
    """Payload from a raw body, built straight from the documented format."""
    declared = len(body) if declared is None else declared
    frame = zstandard.ZstdCompressor(level=3, **zstd_kwargs).compress(body)
    return HEADER.pack(b"FPTU", 1, dtype, 0, 0, count, declared) + frame


def record(name: str | bytes, shape, kind: int, nnz: int, index: bytes, values: bytes) -> bytes:
    raw = name if isinstance(name, bytes) else name.encode()
    return (
        struct.pack("<H", len(raw))
        + raw
        + struct.pack(f"<B{len(shape)}I", len(shape), *shape)
        + struct.pack("<BII", kind, nnz, len(index))
        + index
        + values
    )


def f32(*xs: float) -> bytes:
    return np.array(xs, dtype="<f4").tobytes()


def body_of(payload: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(payload[16:])


def random_sparse(rng: np.random.Generator, shape, density: float | None) -> SparseTensor:
    array = rng.normal(scale=3.0, size=shape).astype(np.float32)
    if density is None:
        return SparseTensor.from_dense(array)
    return SparseTensor.from_dense(array, rng.random(shape) < density)
