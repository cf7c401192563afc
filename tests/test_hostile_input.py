"""Hostile bytes against the parsers a peer or a file reaches (issue 11): each test is an attack
that once escaped as a crash or was accepted, and is now refused with the parser's own error."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
import typing

import numpy as np
import pytest
import zstandard

from coordinator.config import ConfigError, load_config
from coordinator.service import ServiceSettings
from harness.messages import raw_envelope
from edge_sdk import codec
from edge_sdk.protocol import (AckHeader, ArtifactHeader, Envelope, EnvelopeError,
                               MessageType, RefusalHeader, RegisterHeader, StatusHeader, TaskHeader,
                               Topics, UpdateHeader, decode_envelope, encode_envelope, parse_header,
                               peek_header)
from edge_sdk.protocol.messages import SecAggHeader
from edge_sdk.protocol.topics import check_id
from edge_sdk.runtime import BundleManifest, ManifestError, load_manifest

# The documented limits of every JSON header and manifest (docs/PROTOCOL.md), not imported: a
# change to them is a protocol change this test must notice.
JSON_MAX_DEPTH = 32
JSON_MAX_DIGITS = 20




MANIFEST = {
    "device_id": "pi-7", "round": 3, "model": "fedp3_cnn", "spec": {"layers": []},
    "spec_digest": "abc", "width_ratio": 0.5, "dataset": "fashion-mnist",
    "input_shape": [1, 28, 28], "input_scale": 255.0, "mean": [0.28], "std": [0.35],
    "labels": ["a", "b"], "parameters": 10, "nonzero_parameters": 8, "sparsity": 0.2,
    "macs_per_sample": 100, "flops_per_sample": 200, "exporters": {"torch": "2"},
    "created_at": "2026-01-01T00:00:00Z",
}

# --- item 3: poison headers and manifests raise only the parser's own error ----------------------

POISON_JSON = [
    pytest.param(b"[" * 50000, "nests 50000 levels", id="deep-list"),          # RecursionError before
    pytest.param(b'{"a":' * 10000, "nests 10000 levels", id="deep-object"),
    pytest.param(b'{"device_id": ' + b"9" * 5000 + b"}", "5,000 digits", id="5000-digit-int"),  # ValueError
    pytest.param(b'{"n": -' + b"1" * (JSON_MAX_DIGITS + 1) + b"}", "21 digits", id="21-digit-int"),
    pytest.param(b'{"epsilon": NaN}', "NaN is not a number", id="NaN"),
    pytest.param(b'{"epsilon": Infinity}', "Infinity is not a number", id="Infinity"),
    pytest.param(b'{"epsilon": -Infinity}', "-Infinity is not a number", id="-Infinity"),
    pytest.param(b'{"epsilon": 1e999}', "1e999 overflows", id="1e999"),
    pytest.param(b'{"device_id": "\\ud800"}', "unpaired surrogate", id="lone-surrogate"),
    pytest.param(b'{"device_id": "\xff"}', "not valid UTF-8", id="not-utf8"),
]


@pytest.mark.parametrize("header, reason", POISON_JSON)
def test_poison_headers_are_envelope_errors_with_a_reason(header, reason):
    for parse in (decode_envelope, peek_header):
        with pytest.raises(EnvelopeError, match=reason):
            parse(raw_envelope(MessageType.UPDATE, header))


def test_the_json_limits_are_inclusive():
    nested = b'{"device_id":"d","x":' + b"[" * (JSON_MAX_DEPTH - 1) + b"]" * (JSON_MAX_DEPTH - 1) + b"}"
    assert decode_envelope(raw_envelope(MessageType.UPDATE, nested)).header["device_id"] == "d"
    with pytest.raises(EnvelopeError, match=f"nests {JSON_MAX_DEPTH + 1} levels"):
        decode_envelope(raw_envelope(MessageType.UPDATE, b'{"x":' + b"[" * JSON_MAX_DEPTH + b"]" * JSON_MAX_DEPTH + b"}"))
    digits = b'{"n":' + b"9" * JSON_MAX_DIGITS + b"}"
    assert decode_envelope(raw_envelope(MessageType.UPDATE, digits)).header["n"] == 10**JSON_MAX_DIGITS - 1
    # Brackets inside strings are text, not nesting; emoji escapes are paired surrogates.
    text = b'{"s":"' + b"[" * 100 + b'\\"[", "e":"\\ud83d\\ude00"}'
    assert decode_envelope(raw_envelope(MessageType.UPDATE, text)).header["e"] == "\N{GRINNING FACE}"


@pytest.mark.parametrize("header", [b'"' + b'a\\"' * 21000, b'["' + b'\\"' * 32000, b'"\\' * 32000])
def test_unterminated_strings_of_escaped_quotes_are_refused_in_linear_time(header):
    """The nesting check cuts strings out with a regular expression; one that retried at every
    quote took two minutes on this 64 KiB header (found by the fuzzer's slow-input check)."""
    start = time.perf_counter()
    with pytest.raises(EnvelopeError, match="Unterminated string"):
        decode_envelope(raw_envelope(MessageType.UPDATE, header))
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("header, reason", POISON_JSON)
def test_poison_manifest_files_are_manifest_errors(tmp_path, header, reason):
    path = tmp_path / "manifest.json"
    path.write_bytes(header)
    with pytest.raises(ManifestError, match=reason):
        load_manifest(path)


def test_manifest_files_that_are_too_large_or_unreadable_are_manifest_errors(tmp_path):
    big = tmp_path / "big" / "manifest.json"
    big.parent.mkdir()
    big.write_bytes(b" " * (2 * 1024 * 1024) + json.dumps(MANIFEST).encode())
    with pytest.raises(ManifestError, match="the limit is 1,048,576"):
        load_manifest(big)
    (tmp_path / "dir" / "manifest.json").mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(ManifestError, match="cannot be read"):
        load_manifest(tmp_path / "dir")
    good = tmp_path / "good" / "manifest.json"
    good.parent.mkdir()
    good.write_text(json.dumps(MANIFEST))
    assert load_manifest(good.parent).device_id == "pi-7"


@pytest.mark.parametrize("literal", ["Infinity", "NaN", "1e999"])
def test_a_manifest_with_a_non_finite_number_is_refused(tmp_path, literal):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(MANIFEST).replace('"input_scale": 255.0', f'"input_scale": {literal}'))
    with pytest.raises(ManifestError, match="not a number JSON allows|overflows a float"):
        load_manifest(path)
    with pytest.raises(ValueError, match="input_scale"):  # as an ARTIFACT header carries it
        BundleManifest.model_validate({**MANIFEST, "input_scale": float("inf")})


POISON_TOML = [
    pytest.param(b"a = " + b"[" * 5000, "cannot be parsed", id="deep-array"),   # RecursionError before
    pytest.param(b"a = " + b"{b = " * 3000, "cannot be parsed", id="deep-table"),
    pytest.param(b"seed = " + b"9" * 5000, "cannot be parsed", id="5000-digit-int"),  # ValueError
    pytest.param(b"seed = 1\n\xff\xfe", "not UTF-8", id="not-utf8"),            # UnicodeDecodeError
]


@pytest.mark.parametrize("text, reason", POISON_TOML)
def test_poison_config_files_are_config_errors(tmp_path, text, reason):
    from edge_sdk.agent import load_edge_config
    from edge_sdk.agent.config import EdgeConfigError
    path = tmp_path / "config.toml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=reason):
        load_config(path)
    with pytest.raises(ConfigError, match=reason):
        load_config(path, schema=ServiceSettings)
    with pytest.raises(EdgeConfigError, match=reason):
        load_edge_config(path)


@pytest.mark.parametrize("item", ["seed=" + "[" * 5000, "seed=" + "9" * 5000])
def test_poison_set_overrides_are_config_errors(item):
    with pytest.raises(ConfigError, match="the value cannot be parsed"):
        load_config(None, [item])


@pytest.mark.parametrize("text", [b"[" * 50000, b'{"ram_mb": ' + b"9" * 5000 + b"}"])
def test_poison_profile_files_are_profile_errors(tmp_path, text):
    from device_profiles import ProfileError, load_profile
    path = tmp_path / "profile.json"
    path.write_bytes(text)
    with pytest.raises(ProfileError, match="cannot be parsed as JSON"):
        load_profile(path)


# --- item 2: device ids, task ids and fleet names: one strict character set, at parse time ------

UNSAFE_IDS = ["dev1\n", "/../../../tmp/x", "../x", "a/b", ".hidden", "", "a" * 65, "a b", "+", "#",
              "d\x00", "\u00e9t\u00e9", "dev1\r"]


def test_check_id_is_a_full_match_of_the_one_character_set():
    for good in ("pi-7", "a", "A.b_c-9", "a" * 64, "a.."):
        assert check_id("device id", good) == good
    for bad in UNSAFE_IDS + [5, None]:
        with pytest.raises(ValueError, match="1-64 letters, digits"):
            check_id("device id", bad)
    with pytest.raises(ValueError):
        Topics("lab\n")
    with pytest.raises(ValueError):
        Topics().device_of("fedprune/default/update/dev1\n")


KEY = {"device_id": "pi-7", "round": 1, "task": "t-1"}
VALID_HEADERS = {
    MessageType.REGISTER: {"device_id": "pi-7", "profile": {}, "num_samples": 5},
    MessageType.TASK: {**KEY, "plan": {}, "train": {}, "planned_rounds": 3, "deadline": 1e9},
    MessageType.UPDATE: {**KEY, "num_samples": 5, "payload_sha256": "0" * 64},
    MessageType.ACK: {**KEY, "accepted": True},
    MessageType.REFUSAL: {**KEY, "code": "internal", "message": "m"},
    MessageType.STATUS: {"device_id": "pi-7", "online": True},
    MessageType.ARTIFACT: {"device_id": "pi-7", "round": 0, "task": "t-1", "manifest": {}, "artifact": "a"},
    MessageType.SECAGG: {**KEY, "stage": "masked", "num_samples": 5},
}
SCHEMAS = {MessageType.REGISTER: RegisterHeader, MessageType.TASK: TaskHeader,
           MessageType.UPDATE: UpdateHeader, MessageType.ACK: AckHeader,
           MessageType.REFUSAL: RefusalHeader, MessageType.STATUS: StatusHeader,
           MessageType.ARTIFACT: ArtifactHeader, MessageType.SECAGG: SecAggHeader}
ID_FIELDS = [(kind, field) for kind, header in VALID_HEADERS.items()
             for field in ("device_id", "task") if field in header]


def test_the_valid_headers_used_below_are_valid():
    for kind, header in VALID_HEADERS.items():
        assert parse_header(decode_envelope(encode_envelope(kind, header)))


@pytest.mark.parametrize("kind, field", ID_FIELDS, ids=[f"{k.name}.{f}" for k, f in ID_FIELDS])
def test_every_header_refuses_unsafe_device_and_task_ids(kind, field):
    accepted = []
    for bad in UNSAFE_IDS:
        try:
            parse_header(decode_envelope(encode_envelope(kind, {**VALID_HEADERS[kind], field: bad})))
            accepted.append(bad)
        except EnvelopeError as exc:
            message = str(exc)
            assert f"{field}: " in message and any(
                reason in message for reason in ("is not valid: use 1-64", "at least 1", "at most 64")), exc
    assert not accepted, f"{kind.name} header accepted {field} values {accepted}"


# --- item 6: every float in every header, and every config float, must be finite ----------------

def _float_fields(schema) -> list[str]:
    return [name for name, info in schema.model_fields.items()
            if info.annotation is float or float in typing.get_args(info.annotation)]


FLOAT_FIELDS = [(kind, field) for kind, schema in SCHEMAS.items() for field in _float_fields(schema)]


def test_the_float_fields_are_found():
    assert (MessageType.UPDATE, "epsilon") in FLOAT_FIELDS and (MessageType.TASK, "deadline") in FLOAT_FIELDS


@pytest.mark.parametrize("kind, field", FLOAT_FIELDS, ids=[f"{k.name}.{f}" for k, f in FLOAT_FIELDS])
def test_every_header_float_must_be_finite(kind, field):
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(EnvelopeError, match=field):
            parse_header(Envelope(kind, {**VALID_HEADERS[kind], field: bad}))


@pytest.mark.parametrize("literal", ["Infinity", "NaN", "-Infinity", "1e999"])
def test_an_update_claiming_a_non_finite_epsilon_is_refused_on_the_wire(literal):
    header = json.dumps({**VALID_HEADERS[MessageType.UPDATE], "epsilon": 1.5}).replace("1.5", literal)
    with pytest.raises(EnvelopeError, match="epsilon|not a number|overflows"):
        parse_header(decode_envelope(raw_envelope(MessageType.UPDATE, header.encode())))
    with pytest.raises(EnvelopeError, match="header cannot be sent"):  # and it cannot be sent
        encode_envelope(MessageType.UPDATE, {**VALID_HEADERS[MessageType.UPDATE], "epsilon": float("inf")})


@pytest.mark.parametrize("section, key", [("train", "lr"), ("dp", "delta"), ("aggregator", "clip_radius")])
@pytest.mark.parametrize("literal", ["inf", "-inf", "nan"])
def test_config_files_and_overrides_refuse_non_finite_numbers(tmp_path, section, key, literal):
    path = tmp_path / "run.toml"
    path.write_text(f"[{section}]\n{key} = {literal}\n")
    for schema in (None, ServiceSettings):
        kwargs = {"schema": schema} if schema else {}
        with pytest.raises(ConfigError, match=f"{section}.{key}: Input should be a finite number"):
            load_config(path, **kwargs)
        with pytest.raises(ConfigError, match=f"{section}.{key}: Input should be a finite number"):
            load_config(None, [f"{section}.{key}={literal}"], **kwargs)


def test_service_config_sections_refuse_non_finite_numbers(tmp_path):
    path = tmp_path / "coordinator.toml"
    path.write_text("max_update_norm = inf\n[rounds]\ndeadline_seconds = inf\n")
    with pytest.raises(ConfigError, match=r"\n  max_update_norm: Input should be a finite number "
                                          r"\(got inf\)\n  rounds.deadline_seconds: Input should be "
                                          r"a finite number \(got inf\)"):
        load_config(path, schema=ServiceSettings)


# --- items 8 and 12: update payloads -------------------------------------------------------------

def codec_payload(body: bytes, count: int, dtype: int = 1, declared: int | None = None) -> bytes:
    """An update payload around a raw body, built from the documented format (edge_sdk/codec.py)."""
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(body)
    return struct.pack("<4sBBBBII", b"FPTU", 1, dtype, 0, 0, count,
                       len(body) if declared is None else declared) + frame


def codec_record(name: str, shape: tuple[int, ...], kind: int, nnz: int, index: bytes, values: bytes) -> bytes:
    return (struct.pack("<H", len(name.encode())) + name.encode()
            + struct.pack(f"<B{len(shape)}I", len(shape), *shape)
            + struct.pack("<BII", kind, nnz, len(index)) + index + values)


def every_entry_behind_one_byte_gaps(name: str, shape: tuple[int, ...], dtype: int) -> bytes:
    """The longest valid record of a tensor: all entries stored, as DELTA_VARINT gaps of 1."""
    numel = int(np.prod(shape))
    values = {1: np.ones(numel, "<f4").tobytes(), 2: np.ones(numel, "<f2").tobytes(),
              3: np.packbits(np.ones(numel, bool), bitorder="little").tobytes()}[dtype]
    return codec_record(name, shape, 2, numel, b"\x00" + b"\x01" * (numel - 1), values)


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_an_update_far_larger_than_the_model_is_refused_before_decompressing():
    """The issue's bomb: a small payload whose body inflates to 64 MiB, sent for a 4-element
    model, was decompressed in full (under the default 256 MiB limit) before being refused."""
    size = 64 * 2**20
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=size)
    frame = b"".join(compressor.compress(bytes(2**20)) for _ in range(64)) + compressor.flush()
    bomb = struct.pack("<4sBBBBII", b"FPTU", 1, 1, 0, 0, 1, size) + frame
    assert len(bomb) < 8 * 1024

    refusals = []

    def attempt():
        with pytest.raises(codec.CodecError) as refused:
            codec.decode(bomb, expected_shapes={"w": (4,)})
        refusals.append(str(refused.value))
    assert peak_bytes(attempt) < 2**20
    assert "the payload does not fit the model" in refusals[0]


@pytest.mark.parametrize("dtype", [1, 2, 3])
def test_the_decode_limit_from_expected_shapes_is_the_largest_valid_body(dtype):
    from edge_sdk.codec import decoded_bytes_limit
    shapes = {"conv.weight": (4, 3, 3), "conv.bias": (4,), "scale": ()}
    body = b"".join(every_entry_behind_one_byte_gaps(n, s, dtype) for n, s in shapes.items())
    assert decoded_bytes_limit(shapes, codec.ValueDtype(dtype)) == len(body)
    decoded = codec.decode(codec_payload(body, 3, dtype), expected_shapes=shapes)
    assert decoded["conv.weight"].nnz == 36 and decoded["scale"].nnz == 1
    with pytest.raises(codec.CodecError, match="does not fit the model"):
        codec.decode(codec_payload(body + b"\0", 3, dtype), expected_shapes=shapes)
    # The honest encoder's payloads are always within it (partial updates too).
    rng = np.random.default_rng(dtype)
    tensors = {n: codec.SparseTensor.from_dense(rng.normal(size=s), rng.random(s) < 0.5)
               for n, s in shapes.items() if n != "scale"}
    value_dtype = codec.ValueDtype(dtype)
    if value_dtype is codec.ValueDtype.SIGN1:
        tensors = {n: codec.SparseTensor(t.shape, t.indices, np.sign(t.values) + (t.values == 0))
                   for n, t in tensors.items()}
    assert codec.decode(codec.encode(tensors, value_dtype), expected_shapes=shapes).keys() == tensors.keys()


LIMIT = 16 * 2**20


@pytest.mark.parametrize("kind, dtype, numel", [
    (2, 2, LIMIT // 4),             # 4 Mi one-byte varints: within the dense bound, 15x in temporaries
    (2, 2, (LIMIT - 64) // 15),     # the largest such payload decode accepts
    (2, 1, (LIMIT - 64) // 17),
    (1, 2, (LIMIT - 64) // 15),     # a full bitmap
    (2, 3, LIMIT // 4),             # sign bits
])
def test_decode_without_expected_shapes_stays_near_max_decoded_bytes(kind, dtype, numel):
    index = b"\x00" + b"\x01" * (numel - 1) if kind == 2 else b"\xff" * (numel // 8)
    numel = numel if kind == 2 else numel // 8 * 8
    values = (np.packbits(np.ones(numel, bool)).tobytes() if dtype == 3
              else np.ones(numel, "<f2" if dtype == 2 else "<f4").tobytes())
    payload = codec_payload(codec_record("w", (numel,), kind, numel, index, values), 1, dtype)

    def attempt():
        try:
            assert codec.decode(payload, max_decoded_bytes=LIMIT)["w"].nnz == numel
        except codec.CodecError as exc:
            assert "over max_decoded_bytes" in str(exc)
    assert peak_bytes(attempt) < 1.1 * LIMIT


def test_an_empty_zstd_frame_followed_by_garbage_is_refused():
    empty = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(b"")
    header = struct.pack("<4sBBBBII", b"FPTU", 1, 1, 0, 0, 0, 0)
    assert codec.decode(header + empty) == {}
    with pytest.raises(codec.CodecError, match="7 bytes of trailing data"):
        codec.decode(header + empty + b"garbage")
    with pytest.raises(codec.CodecError, match="trailing data"):
        codec.decode(header + empty + empty)
    with pytest.raises(codec.CodecError, match="truncated"):
        codec.decode(header + empty[:-4])  # the frame without its checksum
