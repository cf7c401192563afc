"""The sparse update wire format (edge_sdk/codec.py) gives back what was encoded: every index kind
(dense, bitmap, delta varints) and value dtype (fp32, fp16, sign bits with receiver-known
indices), empty masks, zero-size tensors and scalars, in the order encoded; the encoder picks the
smaller index kind; varints are LEB128 as the known vectors say.

The format itself is pinned by tests/test_payload_spec.py, which builds payloads byte by byte from
docs/PROTOCOL.md; what the decoder must refuse is in tests/test_codec_refuses_malformed_payloads.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk.codec import (
    CodecError,
    IndexKind,
    SparseTensor,
    ValueDtype,
    _decode_varints,
    _encode_varints,
    decode,
    encode,
    encoded_size_breakdown,
)
from harness.codec_payloads import body_of, f32, random_sparse, record


FLOAT_DTYPES = [ValueDtype.FLOAT32, ValueDtype.FLOAT16]


def leb128(n: int) -> bytes:
    """Reference (loop-based) LEB128 used to cross-check the vectorised codec."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def assert_same(decoded: SparseTensor, original: SparseTensor, fp16: bool = False) -> None:
    assert decoded.shape == original.shape
    assert decoded.values.dtype == np.float32
    expected_values = original.values.astype(np.float16).astype(np.float32) if fp16 else original.values
    np.testing.assert_array_equal(decoded.values, expected_values)
    if decoded.indices is None or original.indices is None:
        np.testing.assert_array_equal(presence(decoded), presence(original))
    else:
        np.testing.assert_array_equal(decoded.indices, original.indices)


def presence(t: SparseTensor) -> np.ndarray:
    mask = np.zeros(t.numel, bool)
    mask[slice(None) if t.indices is None else t.indices] = True
    return mask


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.mark.parametrize("value_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "shape, density, kind",
    [
        ((32, 16), None, IndexKind.DENSE),
        ((32, 16), 0.5, IndexKind.BITMAP),
        ((200, 50), 0.01, IndexKind.DELTA_VARINT),
        ((), None, IndexKind.DENSE),
        ((2, 3, 4, 5), 0.5, IndexKind.BITMAP),
        ((8, 8, 16, 16), 0.01, IndexKind.DELTA_VARINT),
    ],
)
def test_every_index_kind_and_value_dtype_round_trips(rng, shape, density, kind, value_dtype):
    tensor = random_sparse(rng, shape, density)
    payload = encode({"t": tensor}, value_dtype=value_dtype)
    decoded = decode(payload, expected_shapes={"t": shape})
    assert list(decoded) == ["t"]
    assert_same(decoded["t"], tensor, fp16=value_dtype is ValueDtype.FLOAT16)
    assert encoded_size_breakdown(payload)["tensors"]["t"]["index_kind"] is kind
    if value_dtype is ValueDtype.FLOAT16:
        np.testing.assert_allclose(decoded["t"].values, tensor.values, rtol=2**-10, atol=2**-24)


def test_an_empty_mask_and_a_zero_size_tensor_round_trip(rng):
    empty = SparseTensor.from_dense(rng.normal(size=(10, 10)), np.zeros((10, 10), bool))
    zero_size = SparseTensor.from_dense(np.zeros((0, 5)))
    decoded = decode(encode({"empty": empty, "zero": zero_size}))
    assert decoded["empty"].nnz == 0
    np.testing.assert_array_equal(decoded["empty"].to_dense(fill=-1.0), np.full((10, 10), -1.0, np.float32))
    assert decoded["zero"].shape == (0, 5) and decoded["zero"].nnz == 0


def test_a_scalar_round_trips_and_densifies(rng):
    decoded = decode(encode({"s": SparseTensor.from_dense(np.float32(2.5))}))["s"]
    assert decoded.shape == () and decoded.numel == 1 and decoded.to_dense() == np.float32(2.5)


def test_a_full_mask_is_sent_dense(rng):
    array = rng.normal(size=(4, 4))
    payload = encode({"t": SparseTensor.from_dense(array, np.ones((4, 4), bool))})
    assert encoded_size_breakdown(payload)["tensors"]["t"]["index_kind"] is IndexKind.DENSE
    np.testing.assert_array_equal(decode(payload)["t"].to_dense(), array.astype(np.float32))


def test_tensors_come_back_in_the_encoded_order_and_an_empty_mapping_round_trips():
    tensors = {name: SparseTensor.from_dense(np.ones(2)) for name in ["z", "a", "m"]}
    assert list(decode(encode(tensors))) == ["z", "a", "m"]
    assert decode(encode({})) == {}


@pytest.mark.parametrize("density", [0.002, 0.05, 0.1, 0.125, 0.2, 0.5, 0.9])
def test_the_encoder_chooses_the_smaller_index_kind(rng, density):
    tensor = random_sparse(rng, (4000,), density)
    gaps = np.diff(tensor.indices, prepend=0)
    varint_size = sum(len(leb128(int(g))) for g in gaps)
    bitmap_size = math.ceil(4000 / 8)
    info = encoded_size_breakdown(encode({"t": tensor}))["tensors"]["t"]
    assert info["index_bytes"] == min(varint_size, bitmap_size)
    assert info["index_kind"] is (IndexKind.BITMAP if bitmap_size <= varint_size else IndexKind.DELTA_VARINT)
    assert info["nnz"] == tensor.nnz and info["value_bytes"] == 4 * tensor.nnz


def test_a_tenth_dense_fp16_update_is_under_a_quarter_of_dense_fp32():
    rng = np.random.default_rng(0)
    array = rng.normal(size=1_000_000).astype(np.float32)
    payload = encode({"w": SparseTensor.from_dense(array, rng.random(1_000_000) < 0.1)}, ValueDtype.FLOAT16)
    assert len(payload) < 0.25 * 4_000_000


# --------------------------------------------------------------------------- varints


KNOWN_VARINTS = [
    (0, b"\x00"),
    (1, b"\x01"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (300, b"\xac\x02"),
    (16384, b"\x80\x80\x01"),
    (2**63 - 1, b"\xff" * 8 + b"\x7f"),
]


def test_varints_are_the_known_leb128_vectors():
    values = np.array([v for v, _ in KNOWN_VARINTS], dtype=np.uint64)
    encoded = b"".join(e for _, e in KNOWN_VARINTS)
    assert _encode_varints(values) == encoded
    np.testing.assert_array_equal(_decode_varints(encoded, len(values)), values)
    for value, expected in KNOWN_VARINTS:
        assert leb128(value) == expected


def test_index_gaps_are_written_as_the_known_varint_vectors():
    gaps = [0, 1, 127, 128, 300, 16384]
    indices = np.cumsum(gaps)
    tensor = SparseTensor((1_000_000,), indices, np.ones(len(gaps), np.float32))
    index = b"".join(e for _, e in KNOWN_VARINTS[:6])
    expected = record("v", (1_000_000,), 2, 6, index, f32(*[1.0] * 6))
    payload = encode({"v": tensor})
    assert body_of(payload) == expected
    np.testing.assert_array_equal(decode(payload)["v"].indices, indices)


# --------------------------------------------------------------------------- properties


shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes,
    density=st.one_of(st.none(), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**32 - 1),
    value_dtype=st.sampled_from(FLOAT_DTYPES),
    level=st.sampled_from([-5, 1, 3, 19]),
)
def test_any_tensors_round_trip(shape, density, seed, value_dtype, level):
    rng = np.random.default_rng(seed)
    tensors = {
        "t": random_sparse(rng, shape, density),
        "u": random_sparse(rng, (int(rng.integers(1, 3000)),), 0.03),
    }
    payload = encode(tensors, value_dtype=value_dtype, level=level)
    decoded = decode(payload, expected_shapes={k: t.shape for k, t in tensors.items()})
    for name, original in tensors.items():
        assert_same(decoded[name], original, fp16=value_dtype is ValueDtype.FLOAT16)


# --- sign masks and receiver-known indices (HideNseek's uplink) ----------------------------------


def test_sign1_with_known_indices_costs_one_bit_per_kept_entry():
    rng = np.random.default_rng(0)
    kept = np.flatnonzero(rng.random(8000) < 0.2)
    signs = np.where(rng.random(len(kept)) < 0.5, -1.0, 1.0).astype(np.float32)
    tensor = SparseTensor((80, 100), kept, signs)
    payload = encode({"w": tensor}, ValueDtype.SIGN1, known_indices={"w"})
    body = -(-len(kept) // 8)
    assert len(payload) <= 16 + body + 64  # header + bits + record and zstd framing
    back = decode(payload, known_indices={"w": kept})["w"]
    assert np.array_equal(back.indices, kept) and np.array_equal(back.values, signs)
    with pytest.raises(CodecError, match="KNOWN"):
        decode(payload)
    with pytest.raises(CodecError, match="known indices"):
        decode(payload, known_indices={"w": kept[:-1]})
    with pytest.raises(CodecError, match="only -1 and \\+1"):
        encode({"w": SparseTensor((3,), None, np.array([1, 0.5, -1], np.float32))}, ValueDtype.SIGN1)
