"""Hostile bytes against the parsers a peer or a file reaches (issue 11): each test is an attack
that once escaped as a crash or was accepted, and is now refused with the parser's own error."""

from __future__ import annotations

import json
import struct

import pytest

from edge_sdk.protocol import MAGIC, EnvelopeError, MessageType, decode_envelope, peek_header
from edge_sdk.runtime import BundleManifest, ManifestError, load_manifest

# The documented limits of every JSON header and manifest (docs/PROTOCOL.md), not imported: a
# change to them is a protocol change this test must notice.
JSON_MAX_DEPTH = 32
JSON_MAX_DIGITS = 20


def raw_envelope(header: bytes, kind: MessageType = MessageType.UPDATE, payload: bytes = b"") -> bytes:
    """An envelope around header bytes as given: what a hostile broker client can publish."""
    return MAGIC + bytes([1, kind, 0, 0]) + struct.pack(">II", len(header), len(payload)) + header + payload


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
    pytest.param(b'{"device": ' + b"9" * 5000 + b"}", "5,000 digits", id="5000-digit-int"),  # ValueError
    pytest.param(b'{"n": -' + b"1" * (JSON_MAX_DIGITS + 1) + b"}", "21 digits", id="21-digit-int"),
    pytest.param(b'{"epsilon": NaN}', "NaN is not a number", id="NaN"),
    pytest.param(b'{"epsilon": Infinity}', "Infinity is not a number", id="Infinity"),
    pytest.param(b'{"epsilon": -Infinity}', "-Infinity is not a number", id="-Infinity"),
    pytest.param(b'{"epsilon": 1e999}', "1e999 overflows", id="1e999"),
    pytest.param(b'{"device": "\\ud800"}', "unpaired surrogate", id="lone-surrogate"),
    pytest.param(b'{"device": "\xff"}', "not valid UTF-8", id="not-utf8"),
]


@pytest.mark.parametrize("header, reason", POISON_JSON)
def test_poison_headers_are_envelope_errors_with_a_reason(header, reason):
    for parse in (decode_envelope, peek_header):
        with pytest.raises(EnvelopeError, match=reason):
            parse(raw_envelope(header))


def test_the_json_limits_are_inclusive():
    nested = b'{"device":"d","x":' + b"[" * (JSON_MAX_DEPTH - 1) + b"]" * (JSON_MAX_DEPTH - 1) + b"}"
    assert decode_envelope(raw_envelope(nested)).header["device"] == "d"
    with pytest.raises(EnvelopeError, match=f"nests {JSON_MAX_DEPTH + 1} levels"):
        decode_envelope(raw_envelope(b'{"x":' + b"[" * JSON_MAX_DEPTH + b"]" * JSON_MAX_DEPTH + b"}"))
    digits = b'{"n":' + b"9" * JSON_MAX_DIGITS + b"}"
    assert decode_envelope(raw_envelope(digits)).header["n"] == 10**JSON_MAX_DIGITS - 1
    # Brackets inside strings are text, not nesting; emoji escapes are paired surrogates.
    text = b'{"s":"' + b"[" * 100 + b'\\"[", "e":"\\ud83d\\ude00"}'
    assert decode_envelope(raw_envelope(text)).header["e"] == "\N{GRINNING FACE}"


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
