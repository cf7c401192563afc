"""Sparse tensor-update codec: the wire format between edge devices and the server.

Edge devices upload pruned model updates and the server sends pruned models
down, both over slow, metered and sometimes hostile links. The format is
hand-written (rather than pickle/torch.save) so that it is compact, stable
across library versions, and safe to parse from untrusted peers.

The format is specified in docs/PROTOCOL.md, section "Tensor payload, format
version 1" (header, records, value dtypes, index kinds, limits, rejections),
and only there; tests/test_payload_spec.py builds payloads byte by byte from
that section and checks its tables against the constants below. What the code
adds to the spec is how: a sparse tensor's index costs whichever of a bitmap
(n/8 bytes) and delta varints (about one byte per kept entry while gaps stay
under 128) is smaller, so the encoder computes both; KNOWN and SIGN1 let a mask
both sides hold cost one bit per kept weight; and every size a payload
declares is checked against the receiver's bound before anything is
decompressed or allocated, then decoded in fixed-size chunks, so whatever the
bytes, `decode` raises only CodecError and its memory stays near
``max_decoded_bytes``.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

__all__ = [
    "CodecError",
    "IndexKind",
    "SparseTensor",
    "ValueDtype",
    "decode",
    "decoded_bytes_limit",
    "encode",
    "encoded_size_breakdown",
]

MAGIC = b"FPTU"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sBBBBII")
# name length + ndim + index kind + nnz + index-bytes length: the smallest record.
_MIN_RECORD_BYTES = 2 + 1 + 1 + 4 + 4
_U16_MAX = 2**16 - 1
_U32_MAX = 2**32 - 1
_MAX_VARINT_BYTES = 9  # 63 bits, enough for any int64 index
_ZSTD_MIN_LEVEL = -(2**17)
# LEB128 length n is needed once a value reaches 2**(7*(n-1)).
_VARINT_THRESHOLDS = np.array([1 << (7 * k) for k in range(1, _MAX_VARINT_BYTES)], dtype=np.uint64)
# Table popcount rather than np.bitwise_count, which needs numpy >= 2.
_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)
# Index bytes decoded per step: the scratch arrays of index decoding stay near 1 MiB, however
# large the tensor (decoding a whole index at once took ~12x the payload in temporaries).
_INDEX_CHUNK = 1 << 14


class CodecError(ValueError):
    """Raised for every payload or tensor the codec refuses, encode or decode."""


class ValueDtype(enum.IntEnum):
    FLOAT32 = 1
    FLOAT16 = 2
    SIGN1 = 3  # values are -1 or +1, one bit each (HideNseek's sign masks)

    @classmethod
    def from_name(cls, name: str) -> ValueDtype:
        """The config spelling ("fp32" / "fp16" / "sign1") used by plans and run configurations."""
        try:
            return {"fp32": cls.FLOAT32, "fp16": cls.FLOAT16, "sign1": cls.SIGN1}[name]
        except KeyError:
            raise CodecError(f"value dtype {name!r} not supported; use fp32, fp16 or sign1") from None


class IndexKind(enum.IntEnum):
    DENSE = 0
    BITMAP = 1
    DELTA_VARINT = 2
    KNOWN = 3  # no index bytes: the receiver already holds this tensor's index set


def _value_bytes(value_dtype: ValueDtype, nnz: int) -> int:
    return -(-nnz // 8) if value_dtype is ValueDtype.SIGN1 else nnz * _WIRE_DTYPES[value_dtype].itemsize


_WIRE_DTYPES = {
    ValueDtype.FLOAT32: np.dtype("<f4"),
    ValueDtype.FLOAT16: np.dtype("<f2"),
}


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """A tensor of which only the entries at ``indices`` are meaningful.

    Inputs are normalised and validated on construction so that encode can
    trust them and decode can reuse the same checks. Equality is identity,
    since element-wise array comparison has no single truth value.
    """

    shape: tuple[int, ...]
    indices: np.ndarray | None
    values: np.ndarray

    def __post_init__(self) -> None:
        shape = _normalise_shape(self.shape)
        numel = math.prod(shape)
        if numel > np.iinfo(np.int64).max:
            raise CodecError(f"shape {shape} has {numel} elements, more than int64 indices can address")
        values = _normalise_values(self.values)
        indices = None if self.indices is None else _normalise_indices(self.indices, numel)
        expected = numel if indices is None else len(indices)
        if len(values) != expected:
            what = "numel of the dense shape" if indices is None else "the number of indices"
            raise CodecError(
                f"got {len(values)} values but {what} is {expected}; pass one value per stored entry"
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "values", values)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return len(self.values)

    def to_dense(self, fill: float = 0.0) -> np.ndarray:
        """Materialise as a new float32 array; ``fill`` stands in for absent entries."""
        if self.indices is None:
            return self.values.reshape(self.shape).copy()
        out = np.full(self.numel, fill, dtype=np.float32)
        out[self.indices] = self.values
        return out.reshape(self.shape)

    @staticmethod
    def from_dense(array: Any, mask: np.ndarray | None = None) -> SparseTensor:
        """Keep the entries of ``array`` where ``mask`` is True (all of them if mask is None)."""
        arr = np.asarray(array)
        if arr.dtype.kind not in "fiu":
            raise CodecError(f"array dtype {arr.dtype} is not real numeric; convert it to float32")
        flat = arr.astype(np.float32).ravel()
        if mask is None:
            return SparseTensor(arr.shape, None, flat)
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise CodecError(f"mask dtype is {mask.dtype}, expected bool; pass mask.astype(bool)")
        if mask.shape != arr.shape:
            raise CodecError(f"mask shape {mask.shape} does not match array shape {arr.shape}")
        indices = np.flatnonzero(mask.ravel()).astype(np.int64)
        return SparseTensor(arr.shape, indices, flat[indices])


def _normalise_shape(shape: Any) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"shape {shape!r} is not a sequence of integers") from exc
    if any(d < 0 for d in dims):
        raise CodecError(f"shape {dims} has a negative dimension")
    return dims


def _normalise_values(values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise CodecError(f"values dtype {arr.dtype} is not real numeric; convert them to float32")
    if arr.ndim != 1:
        raise CodecError(f"values must be 1-D (flat), got shape {arr.shape}; pass values.ravel()")
    return arr.astype(np.float32, copy=False)


def _normalise_indices(indices: Any, numel: int) -> np.ndarray:
    arr = np.asarray(indices)
    if arr.ndim != 1:
        raise CodecError(f"indices must be 1-D flat positions, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise CodecError(f"indices dtype {arr.dtype} is not integer; pass int64 flat indices")
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise CodecError(f"index {int(arr.max())} is out of range for {numel} elements")
    arr = arr.astype(np.int64, copy=False)
    if arr[0] < 0 or arr[-1] >= numel:
        bad = int(arr[0]) if arr[0] < 0 else int(arr[-1])
        raise CodecError(f"index {bad} is out of range for {numel} elements")
    if arr.size > 1 and not np.all(arr[1:] > arr[:-1]):
        raise CodecError("indices must be sorted and unique (strictly increasing); use np.unique")
    return arr


# --------------------------------------------------------------------------- varints


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    return np.searchsorted(_VARINT_THRESHOLDS, values, side="right") + 1


def _encode_varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128, one pass per byte position rather than per element."""
    values = np.asarray(values, dtype=np.uint64)
    if values.size == 0:
        return b""
    lengths = _varint_lengths(values)
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for k in range(int(lengths.max())):
        sel = lengths > k
        group = (values[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (lengths[sel] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + k] = (group | more).astype(np.uint8)
    return out.tobytes()


def _decode_varints(raw: bytes | memoryview, count: int) -> np.ndarray:
    """Inverse of _encode_varints; rejects truncated, overlong and non-minimal varints.

    Decoded a chunk of whole varints at a time, so the only large allocation is the result.
    """
    data = np.frombuffer(raw, dtype=np.uint8)
    if data.size == 0:
        if count:
            raise CodecError(f"expected {count} varints but the index bytes are empty")
        return np.zeros(0, dtype=np.uint64)
    if data[-1] & 0x80:
        raise CodecError("index bytes end in the middle of a varint (continuation bit set on last byte)")
    held = sum(int(np.count_nonzero(data[i:i + _INDEX_CHUNK] < 0x80))
               for i in range(0, data.size, _INDEX_CHUNK))
    if held != count:
        raise CodecError(f"index bytes hold {held} varints but nnz is {count}")
    out = np.empty(count, dtype=np.uint64)
    done = pos = 0
    while pos < data.size:
        chunk = data[pos:pos + _INDEX_CHUNK]
        ends = np.flatnonzero(chunk < 0x80)
        if ends.size == 0:  # _INDEX_CHUNK continuation bytes in a row
            raise CodecError(f"varint longer than {_MAX_VARINT_BYTES} bytes (values must fit in 63 bits)")
        out[done:done + ends.size] = _decode_whole_varints(chunk, ends)
        done += ends.size
        pos += int(ends[-1]) + 1
    return out


def _decode_whole_varints(chunk: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The varints of `chunk` that end at `ends` (positions of bytes without continuation bit)."""
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > _MAX_VARINT_BYTES:
        raise CodecError(f"varint longer than {_MAX_VARINT_BYTES} bytes (values must fit in 63 bits)")
    if np.any((lengths > 1) & (chunk[ends] == 0)):
        raise CodecError("non-minimal varint (trailing zero group); encoders must use the shortest form")
    values = np.zeros(ends.size, dtype=np.uint64)
    for k in range(int(lengths.max())):
        sel = lengths > k
        group = (chunk[starts[sel] + k] & 0x7F).astype(np.uint64)
        values[sel] |= group << np.uint64(7 * k)
    return values


# --------------------------------------------------------------------------- indices


def _choose_index_encoding(tensor: SparseTensor) -> tuple[IndexKind, bytes]:
    if tensor.indices is None or tensor.nnz == tensor.numel:
        return IndexKind.DENSE, b""
    gaps = np.diff(tensor.indices, prepend=0).astype(np.uint64)
    varint_size = int(_varint_lengths(gaps).sum())
    bitmap_size = -(-tensor.numel // 8)
    if bitmap_size <= varint_size:
        mask = np.zeros(tensor.numel, dtype=bool)
        mask[tensor.indices] = True
        return IndexKind.BITMAP, np.packbits(mask, bitorder="little").tobytes()
    return IndexKind.DELTA_VARINT, _encode_varints(gaps)


def _decode_bitmap(raw: memoryview, nnz: int, numel: int) -> np.ndarray:
    """Set positions of the bitmap, unpacked a chunk at a time (not one byte per element)."""
    packed = np.frombuffer(raw, dtype=np.uint8)
    tail_bits = numel % 8
    if tail_bits and packed[-1] >> tail_bits:
        raise CodecError("bitmap has bits set past the end of the tensor (padding must be 0)")
    chunks = range(0, packed.size, _INDEX_CHUNK)
    popcount = sum(int(_POPCOUNT[packed[i:i + _INDEX_CHUNK]].sum(dtype=np.int64)) for i in chunks)
    if popcount != nnz:
        raise CodecError(f"bitmap popcount {popcount} does not match nnz {nnz}")
    out = np.empty(nnz, dtype=np.int64)
    done = 0
    for i in chunks:
        found = np.flatnonzero(np.unpackbits(packed[i:i + _INDEX_CHUNK], bitorder="little"))
        np.add(found, 8 * i, out=out[done:done + found.size])
        done += found.size
    return out


def _decode_delta_varint(raw: memoryview, nnz: int, numel: int) -> np.ndarray:
    positions = _decode_varints(raw, nnz)  # the gaps, summed in place below
    if nnz > 1 and positions[1:].min() == 0:
        raise CodecError("indices are not strictly increasing (a gap of 0 after the first index)")
    np.cumsum(positions, out=positions)
    # Each gap is < 2**63, so a uint64 wrap-around shows up as a decrease.
    if nnz > 1 and not np.all(positions[1:] > positions[:-1]):
        raise CodecError(f"indices overflow; they must stay below numel {numel}")
    if nnz and int(positions[-1]) >= numel:
        raise CodecError(f"index {int(positions[-1])} is out of range for {numel} elements")
    return positions.view(np.int64)  # all below numel <= int64 max


def _check_index_length(kind: IndexKind, nnz: int, numel: int, length: int) -> None:
    if nnz > numel:
        raise CodecError(f"nnz {nnz} exceeds numel {numel}")
    if kind is IndexKind.DENSE:
        if nnz != numel or length:
            raise CodecError(
                f"DENSE index needs nnz == numel ({numel}) and no index bytes, got nnz {nnz}, {length} bytes"
            )
    elif kind is IndexKind.BITMAP:
        if length != -(-numel // 8):
            raise CodecError(
                f"BITMAP index must be {-(-numel // 8)} bytes for {numel} elements, got {length}"
            )
    elif kind is IndexKind.KNOWN:
        if length:
            raise CodecError(f"KNOWN index carries no index bytes, got {length}")
    elif not nnz <= length <= _MAX_VARINT_BYTES * nnz:
        raise CodecError(f"DELTA_VARINT index of {length} bytes cannot hold {nnz} varints")


# --------------------------------------------------------------------------- encode


def encode(
    tensors: Mapping[str, SparseTensor],
    value_dtype: ValueDtype = ValueDtype.FLOAT32,
    level: int = 3,
    known_indices: Collection[str] = (),
) -> bytes:
    """Serialise ``tensors`` (in mapping order) into one payload.

    Tensors named in ``known_indices`` are sent without their index set (IndexKind.KNOWN): the
    receiver must pass the same indices to `decode`. That is how a fixed mask both sides hold
    (HideNseek's pruning mask) costs nothing per round.
    """
    try:
        value_dtype = ValueDtype(value_dtype)
    except ValueError as exc:
        names = [d.name for d in ValueDtype]
        raise CodecError(f"value_dtype {value_dtype!r} unknown; use one of {names}") from exc
    max_level = zstandard.MAX_COMPRESSION_LEVEL
    if isinstance(level, bool) or not isinstance(level, int) or not _ZSTD_MIN_LEVEL <= level <= max_level:
        raise CodecError(f"zstd level {level!r} invalid; use an int in [{_ZSTD_MIN_LEVEL}, {max_level}]")
    if len(tensors) > _U32_MAX:
        raise CodecError(f"{len(tensors)} tensors exceed the u32 tensor count; split the update")

    parts: list[bytes] = []
    body_length = 0
    for name, tensor in tensors.items():
        record = _encode_record(name, tensor, value_dtype, name in known_indices)
        body_length += sum(len(p) for p in record)
        parts.extend(record)
    if body_length > _U32_MAX:
        raise CodecError(f"body of {body_length} bytes exceeds the u32 length field; split the update")

    body = b"".join(parts)
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
    frame = compressor.compress(body)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, value_dtype, 0, 0, len(tensors), body_length)
    return header + frame


def _encode_record(name: str, tensor: SparseTensor, value_dtype: ValueDtype,
                   known: bool = False) -> list[bytes]:
    if not isinstance(name, str):
        raise CodecError(f"tensor name {name!r} is not a str")
    try:
        name_bytes = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CodecError(f"tensor name {name!r} is not valid UTF-8 text") from exc
    if len(name_bytes) > _U16_MAX:
        raise CodecError(
            f"tensor name {name[:40]!r}... is {len(name_bytes)} UTF-8 bytes; the limit is {_U16_MAX}"
        )
    if not isinstance(tensor, SparseTensor):
        raise CodecError(f"tensor {name!r} is a {type(tensor).__name__}, expected SparseTensor")
    if len(tensor.shape) > 255:
        raise CodecError(f"tensor {name!r} has {len(tensor.shape)} dims; the format allows at most 255")
    if any(d > _U32_MAX for d in tensor.shape):
        raise CodecError(f"tensor {name!r} shape {tensor.shape} has a dimension above u32 range")
    if tensor.nnz > _U32_MAX:
        raise CodecError(f"tensor {name!r} stores {tensor.nnz} values, above the u32 nnz field; split it")
    if not np.all(np.isfinite(tensor.values)):
        raise CodecError(f"tensor {name!r} contains NaN or Inf values; fix the update before sending it")

    wire_values = _to_wire_values(name, tensor.values, value_dtype)
    kind, index_bytes = (IndexKind.KNOWN, b"") if known else _choose_index_encoding(tensor)
    if len(index_bytes) > _U32_MAX:
        raise CodecError(f"tensor {name!r} index needs {len(index_bytes)} bytes, above u32 range; split it")
    ndim = len(tensor.shape)
    return [
        struct.pack("<H", len(name_bytes)),
        name_bytes,
        struct.pack(f"<B{ndim}I", ndim, *tensor.shape),
        struct.pack("<BII", kind, tensor.nnz, len(index_bytes)),
        index_bytes,
        wire_values,
    ]


def _to_wire_values(name: str, values: np.ndarray, value_dtype: ValueDtype) -> bytes:
    if value_dtype is ValueDtype.SIGN1:
        if not np.all(np.abs(values) == 1):
            raise CodecError(f"tensor {name!r}: SIGN1 carries only -1 and +1 values")
        return np.packbits(values > 0, bitorder="little").tobytes()
    with np.errstate(over="ignore"):
        wire = values.astype(_WIRE_DTYPES[value_dtype])
    if value_dtype is ValueDtype.FLOAT16 and not np.all(np.isfinite(wire)):
        worst = float(np.abs(values).max())
        raise CodecError(
            f"tensor {name!r} has values up to {worst:g}, beyond float16 range (max 65504); "
            "scale the update or send it as FLOAT32"
        )
    return wire.tobytes()


# --------------------------------------------------------------------------- decode


class _Reader:
    """Bounds-checked cursor, so truncation surfaces as CodecError and never as struct/Index errors."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.remaining:
            raise CodecError(
                f"truncated body: {what} needs {n} bytes at offset {self.pos} "
                f"but only {self.remaining} remain"
            )
        chunk = self._data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "little")


@dataclass(frozen=True)
class _Record:
    name: str
    shape: tuple[int, ...]
    kind: IndexKind
    nnz: int
    index_bytes: memoryview
    value_bytes: memoryview
    record_bytes: int


def _read_header(payload: bytes) -> tuple[ValueDtype, int, int]:
    if len(payload) < HEADER.size:
        raise CodecError(
            f"payload is {len(payload)} bytes, shorter than the {HEADER.size}-byte header; it was truncated"
        )
    magic, version, dtype, flags, reserved, count, body_length = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError(f"not a fedprune update payload (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CodecError(f"format version {version} not supported; this build reads {FORMAT_VERSION}")
    if dtype not in ValueDtype._value2member_map_:
        raise CodecError(f"value dtype code {dtype} unknown; this build reads {[int(d) for d in ValueDtype]}")
    if flags or reserved:
        raise CodecError(f"flags 0x{flags:02x} / reserved 0x{reserved:02x} must be 0 in format version 1")
    if count > body_length // _MIN_RECORD_BYTES:
        raise CodecError(f"tensor count {count} cannot fit in a {body_length}-byte body")
    return ValueDtype(dtype), count, body_length


def value_dtype_of(payload: bytes) -> ValueDtype:
    """The value type a payload declares in its header (CodecError when it has none)."""
    return _read_header(payload)[0]


def _decompress_body(frame: memoryview, body_length: int) -> bytes:
    try:
        content_size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CodecError(f"body is not a valid zstd frame ({exc})") from exc
    if content_size < 0:
        raise CodecError("zstd frame does not declare its content size; the encoder must write it")
    if content_size != body_length:
        raise CodecError(
            f"zstd frame content size {content_size} differs from declared body length {body_length}"
        )
    try:
        if body_length == 0:  # decompress() returns b"" for it unread, whatever follows
            body = _decompress_empty_frame(frame)
        else:
            body = zstandard.ZstdDecompressor().decompress(
                frame, max_output_size=body_length, allow_extra_data=False
            )
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt or trailing data in zstd body ({exc})") from exc
    if len(body) != body_length:
        raise CodecError(f"body decompressed to {len(body)} bytes, header declared {body_length}")
    return body


def _decompress_empty_frame(frame: memoryview) -> bytes:
    """An empty frame, read to its end, so that any byte after it is refused like after others."""
    reader = zstandard.ZstdDecompressor().decompressobj()
    body = reader.decompress(frame)
    if not reader.eof:
        raise CodecError("zstd frame is truncated")
    if reader.unused_data:
        raise CodecError(f"{len(reader.unused_data)} bytes of trailing data after the zstd frame")
    return body


def decoded_bytes_limit(expected_shapes: Mapping[str, tuple[int, ...]], value_dtype: ValueDtype) -> int:
    """The largest decompressed body a payload of these tensors can have at `value_dtype`.

    Every tensor present once, with every entry stored behind the largest index a valid
    payload allows: DELTA_VARINT of 1-byte gaps, one byte per element (a varint of gap g takes
    at most max(g, 1) bytes and the gaps sum to less than numel, so no valid index is longer;
    BITMAP and DENSE are shorter), plus the record's name, dims and counts. A receiver that
    knows the model refuses any longer body before decompressing it.
    """
    value_dtype = ValueDtype(value_dtype)
    total = 0
    for name, shape in expected_shapes.items():
        dims = _normalise_shape(shape)
        numel = math.prod(dims)
        framing = _MIN_RECORD_BYTES + len(name.encode("utf-8", "surrogatepass")) + 4 * len(dims)
        total += framing + numel + _value_bytes(value_dtype, numel)
    return total


def _check_body_length(body_length: int, count: int, value_dtype: ValueDtype,
                       expected: Mapping[str, tuple[int, ...]] | None, max_decoded_bytes: int) -> None:
    """Refuse, before decompressing, a body longer than the limit or than the model allows."""
    if expected is not None:
        if count > len(expected):
            raise CodecError(f"payload declares {count} tensors; the model has {len(expected)}")
        model = decoded_bytes_limit(expected, value_dtype)
        if body_length > model and model < max_decoded_bytes:
            raise CodecError(
                f"declared body length {body_length} bytes exceeds the {model} bytes the expected "
                f"tensors can take at {value_dtype.name}; refusing to decompress (the payload does "
                "not fit the model: sender and receiver disagree on it)"
            )
    if body_length > max_decoded_bytes:
        raise CodecError(
            f"declared body length {body_length} bytes exceeds max_decoded_bytes={max_decoded_bytes}; "
            "refusing to decompress (raise max_decoded_bytes if the update is legitimately this large)"
        )


def _decoded_array_bytes(kind: IndexKind, nnz: int) -> int:
    """Bytes of the arrays `_materialise` builds: float32 values, int64 indices if sent."""
    return nnz * (12 if kind in (IndexKind.BITMAP, IndexKind.DELTA_VARINT) else 4)


def decoding_memory_limit(expected_shapes: Mapping[str, tuple[int, ...]], value_dtype: ValueDtype) -> int:
    """The most memory decoding a valid payload of exactly these tensors holds: its largest body
    (`decoded_bytes_limit`) and every array decoding builds. A receiver that passes it as
    `max_decoded_bytes` allocates nothing a larger payload declares, whatever the model's size."""
    arrays = sum(_decoded_array_bytes(IndexKind.DELTA_VARINT, math.prod(_normalise_shape(shape)))
                 for shape in expected_shapes.values())
    return decoded_bytes_limit(expected_shapes, value_dtype) + arrays


def _parse(
    payload: bytes,
    expected_shapes: Mapping[str, tuple[int, ...]] | None,
    max_decoded_bytes: int,
) -> tuple[ValueDtype, int, list[_Record]]:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    if isinstance(max_decoded_bytes, bool) or not isinstance(max_decoded_bytes, int) or max_decoded_bytes < 0:
        raise CodecError(f"max_decoded_bytes must be a non-negative int, got {max_decoded_bytes!r}")
    payload = bytes(payload)
    expected = None
    if expected_shapes is not None:
        expected = {name: _normalise_shape(shape) for name, shape in expected_shapes.items()}

    value_dtype, count, body_length = _read_header(payload)
    _check_body_length(body_length, count, value_dtype, expected, max_decoded_bytes)
    body = _decompress_body(memoryview(payload)[HEADER.size :], body_length)

    reader = _Reader(body)
    records: list[_Record] = []
    seen: set[str] = set()
    dense_footprint = 0
    held = body_length  # bytes decoding holds at its peak: the body and every decoded array
    for position in range(count):
        start = reader.pos
        where = f"record {position}"
        name_raw = reader.take(reader.uint(2, f"{where} name length"), f"{where} name")
        try:
            name = bytes(name_raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError(f"{where}: tensor name is not valid UTF-8") from exc
        where = f"tensor {name!r}"
        if name in seen:
            raise CodecError(f"{where} appears more than once in the payload")
        seen.add(name)

        ndim = reader.uint(1, f"{where} ndim")
        dims = reader.take(4 * ndim, f"{where} dims")
        shape = tuple(int(d) for d in np.frombuffer(dims, dtype="<u4"))
        if expected is not None:
            if name not in expected:
                raise CodecError(f"{where} is not part of the model; expected one of {sorted(expected)[:10]}")
            if shape != expected[name]:
                raise CodecError(f"{where} has shape {shape}, expected {expected[name]}")
        numel = math.prod(shape)  # exact Python int: no overflow
        dense_footprint += 4 * numel
        if dense_footprint > max_decoded_bytes:
            raise CodecError(
                f"{where} declares shape {shape} ({numel} elements); the payload's float32 dense size "
                f"would reach {dense_footprint} bytes, over max_decoded_bytes={max_decoded_bytes}"
            )

        kind_code = reader.uint(1, f"{where} index kind")
        if kind_code not in IndexKind._value2member_map_:
            raise CodecError(f"{where} has unknown index kind {kind_code}")
        kind = IndexKind(kind_code)
        nnz = reader.uint(4, f"{where} nnz")
        index_length = reader.uint(4, f"{where} index-bytes length")
        try:
            _check_index_length(kind, nnz, numel, index_length)
        except CodecError as exc:
            raise CodecError(f"{where}: {exc}") from None
        held += _decoded_array_bytes(kind, nnz)
        if held > max_decoded_bytes:
            raise CodecError(
                f"{where} stores {nnz} values; decoding the payload would hold {held} bytes "
                f"(body and arrays), over max_decoded_bytes={max_decoded_bytes}"
            )
        index_bytes = reader.take(index_length, f"{where} index bytes")
        value_bytes = reader.take(_value_bytes(value_dtype, nnz), f"{where} values")
        records.append(_Record(name, shape, kind, nnz, index_bytes, value_bytes, reader.pos - start))

    if reader.remaining:
        raise CodecError(f"{reader.remaining} bytes of trailing garbage after the last of {count} records")
    return value_dtype, len(payload), records


def _materialise(record: _Record, value_dtype: ValueDtype,
                 known_indices: Mapping[str, np.ndarray] | None = None) -> SparseTensor:
    where = f"tensor {record.name!r}"
    numel = math.prod(record.shape)
    try:
        if record.kind is IndexKind.DENSE:
            indices = None
        elif record.kind is IndexKind.KNOWN:
            if known_indices is None or record.name not in known_indices:
                raise CodecError("is sent without indices (KNOWN); pass its index set to decode")
            indices = _normalise_indices(known_indices[record.name], numel)
            if len(indices) != record.nnz:
                raise CodecError(f"carries {record.nnz} values for {len(indices)} known indices")
        elif record.kind is IndexKind.BITMAP:
            indices = _decode_bitmap(record.index_bytes, record.nnz, numel)
        else:
            indices = _decode_delta_varint(record.index_bytes, record.nnz, numel)
    except CodecError as exc:
        raise CodecError(f"{where}: {exc}") from None
    if value_dtype is ValueDtype.SIGN1:
        packed = np.frombuffer(record.value_bytes, dtype=np.uint8)
        if record.nnz % 8 and packed[-1] >> (record.nnz % 8):
            raise CodecError(f"{where}: sign bits set past the last value (padding must be 0)")
        signs = np.unpackbits(packed, count=record.nnz, bitorder="little").astype(np.float32)
        signs *= 2
        signs -= 1  # bits 0/1 -> values -1/+1, without a float64 temporary
        return SparseTensor(record.shape, indices, signs)
    values = np.frombuffer(record.value_bytes, dtype=_WIRE_DTYPES[value_dtype]).astype(np.float32)
    # min and max propagate NaN and reach +-Inf: the finiteness check without a boolean array.
    if values.size and not (np.isfinite(values.min()) and np.isfinite(values.max())):
        raise CodecError(f"{where} contains NaN or Inf values; the sender produced a corrupt update")
    return SparseTensor(record.shape, indices, values)


def decode(
    payload: bytes,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_decoded_bytes: int = 256 * 2**20,
    known_indices: Mapping[str, np.ndarray] | None = None,
) -> dict[str, SparseTensor]:
    """Parse an untrusted payload; any malformed input raises CodecError.

    ``expected_shapes`` (if given) must contain every tensor in the payload
    with a matching shape; tensors absent from the payload are allowed, since
    partial updates are normal. It also caps the body at `decoded_bytes_limit` of
    those shapes (when below ``max_decoded_bytes``), so the limit fits the model.
    """
    value_dtype, _, records = _parse(payload, expected_shapes, max_decoded_bytes)
    return {r.name: _materialise(r, value_dtype, known_indices) for r in records}


def encoded_size_breakdown(payload: bytes, max_decoded_bytes: int = 256 * 2**20) -> dict:
    """Where a payload's bytes go, for docs and benchmarks; validates like decode."""
    value_dtype, payload_bytes, records = _parse(payload, None, max_decoded_bytes)
    for record in records:
        _materialise(record, value_dtype)
    return {
        "value_dtype": value_dtype,
        "payload_bytes": payload_bytes,
        "header_bytes": HEADER.size,
        "compressed_body_bytes": payload_bytes - HEADER.size,
        "body_bytes": sum(r.record_bytes for r in records),
        "tensors": {
            r.name: {
                "shape": r.shape,
                "numel": math.prod(r.shape),
                "nnz": r.nnz,
                "index_kind": r.kind,
                "index_bytes": len(r.index_bytes),
                "value_bytes": len(r.value_bytes),
                "record_bytes": r.record_bytes,
            }
            for r in records
        },
    }
