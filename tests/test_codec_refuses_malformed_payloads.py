"""Everything the sparse update codec (edge_sdk/codec.py) must refuse, with a CodecError that says
why: malformed varints, non-finite values and float16 overflow, tensors that do not fit the
expected shapes, bad headers, malformed bodies, length mismatches, corruption and truncation,
decompression bombs (refused before or while decompressing, within about a megabyte of memory),
invalid tensors and encoder arguments; and any bytes at all decode or are refused cleanly, within
the memory bound.

The format itself is pinned by tests/test_payload_spec.py; round trips are in
tests/test_codec_round_trips.py.
"""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk.codec import (
    CodecError,
    SparseTensor,
    ValueDtype,
    _decode_varints,
    decode,
    encode,
)
from harness.codec_payloads import HEADER, body_of, f32, random_sparse, record, wrap


@pytest.fixture
def mixed_payload() -> bytes:
    rng = np.random.default_rng(7)
    return encode(
        {
            "dense": random_sparse(rng, (3, 4), None),
            "bitmap": random_sparse(rng, (40,), 0.5),
            "varint": random_sparse(rng, (500,), 0.02),
            "scalar": random_sparse(rng, (), None),
        }
    )


@pytest.fixture(scope="module")
def mixed_payload_cached() -> bytes:
    rng = np.random.default_rng(11)
    return encode(
        {
            "dense": random_sparse(rng, (3, 4), None),
            "bitmap": random_sparse(rng, (40,), 0.5),
            "varint": random_sparse(rng, (500,), 0.02),
            "scalar": random_sparse(rng, (), None),
        },
        ValueDtype.FLOAT16,
    )


@pytest.mark.parametrize(
    "raw, count, message",
    [
        (b"\x80", 1, "middle of a varint"),
        (b"\x01\x02", 1, "2 varints"),
        (b"\x80\x00", 1, "non-minimal"),
        (b"\xff" * 9 + b"\x01", 1, "longer than 9"),
        (b"", 1, "empty"),
    ],
)
def test_malformed_varints_are_refused(raw, count, message):
    with pytest.raises(CodecError, match=message):
        _decode_varints(raw, count)


# --------------------------------------------------------------------------- value checks


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite_values_naming_the_tensor(bad):
    values = np.array([1.0, bad], np.float32)
    with pytest.raises(CodecError, match="'grad.bias'.*NaN or Inf"):
        encode({"ok": SparseTensor.from_dense(np.ones(3)), "grad.bias": SparseTensor((2,), None, values)})


@pytest.mark.parametrize("dtype, bad", [(1, np.nan), (1, np.inf), (2, np.nan), (2, -np.inf)])
def test_decode_refuses_non_finite_values_naming_the_tensor(dtype, bad):
    wire = "<f4" if dtype == 1 else "<f2"
    values = np.array([1.0, bad, 3.0], dtype=wire).tobytes()
    body = record("fc.weight", (3,), 0, 3, b"", values)
    with pytest.raises(CodecError, match="'fc.weight'.*NaN or Inf"):
        decode(wrap(body, 1, dtype=dtype))


def test_encode_refuses_values_beyond_the_float16_range():
    with pytest.raises(CodecError, match="'big'.*float16 range"):
        encode({"big": SparseTensor.from_dense(np.array([1.0, 70000.0]))}, ValueDtype.FLOAT16)
    # The largest finite half still encodes, as does a value that rounds down to it.
    edge = SparseTensor.from_dense(np.array([65504.0, -65510.0]))
    decoded = decode(encode({"ok": edge}, ValueDtype.FLOAT16))
    np.testing.assert_array_equal(decoded["ok"].values, [65504.0, -65504.0])


# --------------------------------------------------------------------------- expected shapes


def test_tensors_that_do_not_fit_the_expected_shapes_are_refused():
    payload = encode({"conv1.weight": SparseTensor.from_dense(np.zeros((4, 3, 3, 3)))})
    with pytest.raises(CodecError, match=r"'conv1.weight' has shape \(4, 3, 3, 3\), expected \(8, 3, 3, 3\)"):
        decode(payload, expected_shapes={"conv1.weight": (8, 3, 3, 3)})
    with pytest.raises(CodecError, match="'conv1.weight' is not part of the model"):
        decode(payload, expected_shapes={"fc.weight": (100, 4)})
    with pytest.raises(CodecError, match="the payload does not fit the model"):
        decode(payload, expected_shapes={"fc.weight": (10, 4)})  # refused before decompressing
    # Tensors missing from a (partial) update are fine.
    assert list(decode(payload, expected_shapes={"conv1.weight": [4, 3, 3, 3], "fc.weight": (10, 4)})) == [
        "conv1.weight"
    ]


# --------------------------------------------------------------------------- hostile payloads


def test_a_bad_header_is_refused_naming_the_field(mixed_payload):
    with pytest.raises(CodecError, match=r"not a fedprune update payload \(magic b'PK\\x03\\x04'"):
        decode(b"PK\x03\x04" + mixed_payload[4:])
    with pytest.raises(CodecError, match="format version 7 not supported; this build reads 1"):
        decode(mixed_payload[:4] + b"\x07" + mixed_payload[5:])
    with pytest.raises(CodecError, match="value dtype code 9"):
        decode(mixed_payload[:5] + b"\x09" + mixed_payload[6:])
    with pytest.raises(CodecError, match="flags"):
        decode(mixed_payload[:6] + b"\x01" + mixed_payload[7:])
    with pytest.raises(CodecError, match="payload must be bytes"):
        decode("FPTU")  # type: ignore[arg-type]
    # bytearray / memoryview are accepted
    assert list(decode(memoryview(bytearray(mixed_payload)))) == ["dense", "bitmap", "varint", "scalar"]


VALID = record("a", (4,), 0, 4, b"", f32(1, 2, 3, 4))


@pytest.mark.parametrize(
    "body, count, message",
    [
        (VALID + VALID, 2, "'a' appears more than once"),
        (VALID + b"\x00", 1, "1 bytes of trailing garbage"),
        (VALID, 2, "truncated body"),
        (record(b"\xff\xfe", (1,), 0, 1, b"", f32(1)), 1, "UTF-8"),
        (record("a", (4,), 7, 4, b"", f32(1, 2, 3, 4)), 1, "unknown index kind 7"),
        (record("a", (4,), 0, 3, b"", f32(1, 2, 3)), 1, "DENSE index needs nnz == numel"),
        (record("a", (4,), 0, 4, b"\x00", f32(1, 2, 3, 4)), 1, "DENSE index needs"),
        (record("a", (4,), 2, 5, b"\x00\x01\x01\x01\x01", f32(1, 2, 3, 4, 5)), 1, "nnz 5 exceeds numel 4"),
        (record("a", (16,), 1, 2, b"\x21\x00\x00", f32(1, 2)), 1, "BITMAP index must be 2 bytes"),
        (record("a", (16,), 1, 3, b"\x21\x00", f32(1, 2, 3)), 1, "popcount 2 does not match nnz 3"),
        (record("a", (4,), 1, 2, b"\x21", f32(1, 2)), 1, "padding must be 0"),
        (record("a", (10,), 2, 2, b"\x03\x07", f32(1, 2)), 1, "index 10 is out of range for 10"),
        (record("a", (10,), 2, 2, b"\x03\x00", f32(1, 2)), 1, "not strictly increasing"),
        (record("a", (10,), 2, 2, b"\x03", f32(1, 2)), 1, "cannot hold 2 varints"),
        (record("a", (2**20, 2**20), 2, 1, b"\x03", f32(1)), 1, "over max_decoded_bytes"),
        (
            record("a", (2**32 - 1,) * 8, 2, 1, b"\x03", f32(1)),
            1,
            r"declares shape \(4294967295, 4294967295.*over max_decoded_bytes",
        ),
        (
            record("a", (4,), 2, 2, b"\xff" * 8 + b"\x7f" + b"\xff" * 8 + b"\x7f", f32(1, 2)),
            1,
            "index 18446744073709551614 is out of range",
        ),
        (record("a", (4,), 2, 3, (b"\xff" * 8 + b"\x7f") * 3, f32(1, 2, 3)), 1, "indices overflow"),
        (VALID, 10**6, "tensor count 1000000 cannot fit"),
    ],
)
def test_a_malformed_body_is_refused_with_the_reason(body, count, message):
    with pytest.raises(CodecError, match=message):
        decode(wrap(body, count))


def test_a_body_length_mismatch_or_trailing_frame_data_is_refused(mixed_payload):
    body = body_of(mixed_payload)
    with pytest.raises(CodecError, match="differs from declared body length"):
        decode(wrap(body, 4, declared=len(body) + 1))
    with pytest.raises(CodecError, match="differs from declared body length"):
        decode(wrap(body, 4, declared=len(body) - 1))
    with pytest.raises(CodecError, match="trailing data|corrupt"):
        decode(mixed_payload + b"\x00")
    with pytest.raises(CodecError, match="does not declare its content size"):
        decode(wrap(body, 4, write_content_size=False))
    with pytest.raises(CodecError, match="not a valid zstd frame"):
        decode(mixed_payload[:16] + b"garbage!" * 4)


def test_the_checksum_detects_corruption(mixed_payload):
    corrupted = bytearray(mixed_payload)
    corrupted[-1] ^= 0xFF
    with pytest.raises(CodecError):
        decode(bytes(corrupted))


def test_every_truncated_prefix_is_refused(mixed_payload):
    for n in range(len(mixed_payload)):
        with pytest.raises(CodecError):
            decode(mixed_payload[:n])
    body = body_of(mixed_payload)
    for n in range(len(body)):
        with pytest.raises(CodecError):
            decode(wrap(body[:n], 4))


# --------------------------------------------------------------------------- decompression bombs


BOMB_SIZE = 100 * 2**20


@pytest.fixture(scope="module")
def bomb_frames() -> dict[str, bytes]:
    """100 MB of zeros as zstd frames, built in 1 MB chunks to keep the test light."""
    frames = {}
    for label, with_size in [("sized", True), ("unsized", False)]:
        cobj = zstandard.ZstdCompressor(level=1, write_content_size=with_size).compressobj(
            size=BOMB_SIZE if with_size else -1
        )
        chunk = bytes(2**20)
        frames[label] = b"".join(cobj.compress(chunk) for _ in range(100)) + cobj.flush()
    return frames


def peak_allocation(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def expect_refusal(payload: bytes, message: str, **kwargs) -> None:
    def attempt() -> None:
        with pytest.raises(CodecError, match=message):
            decode(payload, **kwargs)

    assert peak_allocation(attempt) < 2**20


def test_a_declared_body_length_over_the_limit_is_refused_before_decompressing():
    payload = HEADER.pack(b"FPTU", 1, 1, 0, 0, 1, 2**32 - 1) + zstandard.compress(b"tiny")
    expect_refusal(payload, "exceeds max_decoded_bytes=268435456; refusing to decompress")


def test_a_real_decompression_bomb_is_refused_within_a_megabyte(bomb_frames):
    sized, unsized = bomb_frames["sized"], bomb_frames["unsized"]
    assert zstandard.frame_content_size(sized) == BOMB_SIZE and len(sized) < 2**16
    honest = HEADER.pack(b"FPTU", 1, 1, 0, 0, 1, BOMB_SIZE) + sized
    expect_refusal(honest, "exceeds max_decoded_bytes", max_decoded_bytes=2**20)
    lying = HEADER.pack(b"FPTU", 1, 1, 0, 0, 1, 1000) + sized
    expect_refusal(lying, "content size 104857600 differs from declared body length 1000")
    unsized_payload = HEADER.pack(b"FPTU", 1, 1, 0, 0, 1, 1000) + unsized
    expect_refusal(unsized_payload, "does not declare its content size")


# --------------------------------------------------------------------------- encode-side validation


def test_invalid_tensors_and_encoder_arguments_are_refused():
    with pytest.raises(CodecError, match="strictly increasing"):
        SparseTensor((10,), np.array([3, 2]), np.ones(2, np.float32))
    with pytest.raises(CodecError, match="out of range"):
        SparseTensor((10,), np.array([10]), np.ones(1, np.float32))
    with pytest.raises(CodecError, match="got 3 values"):
        SparseTensor((2, 2), None, np.ones(3, np.float32))
    with pytest.raises(CodecError, match="mask dtype"):
        SparseTensor.from_dense(np.ones(3), np.ones(3))
    with pytest.raises(CodecError, match="mask shape"):
        SparseTensor.from_dense(np.ones(3), np.ones(4, bool))
    with pytest.raises(CodecError, match="value_dtype"):
        encode({}, value_dtype=5)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="zstd level"):
        encode({}, level=99)
    with pytest.raises(CodecError, match="not a str"):
        encode({1: SparseTensor.from_dense(np.ones(1))})  # type: ignore[dict-item]
    with pytest.raises(CodecError, match="u32"):
        encode({"t": SparseTensor((2**32,), np.array([0]), np.ones(1, np.float32))})


# --------------------------------------------------------------------------- properties


def decodes_or_rejects(payload: bytes) -> None:
    try:
        decode(payload, max_decoded_bytes=2**22)
    except CodecError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"FPTU\x01\x01\x00\x00" + b)))
def test_random_bytes_decode_or_are_refused_cleanly(data):
    decodes_or_rejects(data)


mutations = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)


def mutate(data: bytes, edits, cut: int | None) -> bytes:
    buf = bytearray(data)
    for position, value in edits:
        buf[position % len(buf)] = value
    return bytes(buf if cut is None else buf[: cut % (len(buf) + 1)])


@settings(max_examples=200, deadline=None)
@given(edits=mutations, cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_a_mutated_payload_decodes_or_is_refused_cleanly(mixed_payload_cached, edits, cut):
    decodes_or_rejects(mutate(mixed_payload_cached, edits, cut))


@settings(max_examples=300, deadline=None)
@given(edits=mutations, cut=st.one_of(st.none(), st.integers(0, 10**6)), count=st.integers(0, 6))
def test_a_mutated_body_decodes_or_is_refused_cleanly(mixed_payload_cached, edits, cut, count):
    """Mutate the decompressed body and re-wrap it, so the record parser sees the damage."""
    decodes_or_rejects(wrap(mutate(body_of(mixed_payload_cached), edits, cut), count))


# Hostile records built field by field from the documented format: the extremes of every count
# (u32 max dims, nnz and lengths, 255 dimensions), NaN/Inf value bit patterns, unknown index
# kinds, names that are not UTF-8, runs of varint continuation bytes, empty frames.
HOSTILE_U32 = st.sampled_from([0, 1, 3, 7, 8, 9, 2**16, 2**31, 2**32 - 1])


NON_FINITE = {1: [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff"],
              2: [b"\x00\x7e", b"\x00\x7c", b"\x00\xfc"], 3: [b"\xff"]}


@st.composite
def hostile_records(draw) -> tuple[bytes, int]:
    dtype = draw(st.sampled_from([1, 2, 3]))
    body = b""
    count = draw(st.integers(0, 3))
    for _ in range(count):
        name = draw(st.one_of(st.sampled_from([b"w", b"b", b""]), st.binary(max_size=4)))
        ndim = draw(st.sampled_from([0, 1, 2, 8, 255]))
        dims = [draw(HOSTILE_U32) if draw(st.booleans()) else draw(st.integers(0, 20)) for _ in range(min(ndim, 8))]
        dims += [1] * (ndim - len(dims))
        kind = draw(st.integers(0, 4))
        nnz = draw(st.one_of(HOSTILE_U32, st.integers(0, 40)))
        index = draw(st.one_of(st.binary(max_size=40), st.integers(1, 40).map(lambda n: b"\x80" * n + b"\x01")))
        values = draw(st.one_of(st.binary(max_size=80),
                                st.lists(st.sampled_from(NON_FINITE[dtype] + [b"\x00" * (4 if dtype == 1 else 2)]),
                                         max_size=20).map(b"".join)))
        length = draw(st.one_of(st.just(len(index)), HOSTILE_U32))
        body += (struct.pack("<H", len(name)) + name + struct.pack(f"<B{ndim}I", ndim, *dims)
                 + struct.pack("<BII", kind, nnz, length) + index + values)
    return body, dtype


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_records(), st.integers(0, 4), st.booleans(), st.booleans())
def test_hostile_records_are_refused_within_the_memory_bound(record_and_dtype, count, with_shapes, trail):
    body, dtype = record_and_dtype
    payload = wrap(body, count, dtype) + (b"\x00garbage" if trail else b"")
    limit = 2**20
    expected = {"w": (3, 4), "b": (4,), "": ()} if with_shapes else None

    def attempt() -> None:
        try:
            decode(payload, expected_shapes=expected, max_decoded_bytes=limit)
        except CodecError:
            pass
    assert peak_allocation(attempt) < 1.1 * limit + 2**20
