"""The wire contract: envelope bytes, limits, refusals, header schemas, topics; fuzzed."""

from __future__ import annotations

import json
import struct
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.config import load_config
from coordinator.service import ServiceSettings
from harness.messages import raw_envelope
from edge_sdk.agent import load_edge_config
from edge_sdk.protocol import (HEADER_LIMIT, MAGIC, Envelope, EnvelopeError, MessageType, Topics,
                               decode_envelope, encode_envelope, parse_header, peek_header)

ROOT = Path(__file__).resolve().parent.parent


def test_envelope_bytes_match_the_documented_layout():
    data = encode_envelope(MessageType.UPDATE, {"b": 1, "a": "x"}, b"\x01\x02\x03")
    header = b'{"a":"x","b":1}'
    assert data == MAGIC + bytes([1, 3, 0, 0]) + struct.pack(">II", len(header), 3) + header + b"\x01\x02\x03"
    assert decode_envelope(data) == Envelope(MessageType.UPDATE, {"a": "x", "b": 1}, b"\x01\x02\x03")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: b"MQTT" + d[4:], "not a fedprune message"),
    (lambda d: d[:4] + b"\x02" + d[5:], "envelope version 2"),
    (lambda d: d[:5] + b"\x63" + d[6:], "unknown message type 99"),
    (lambda d: d[:6] + b"\x00\x01" + d[8:], "flags"),
    (lambda d: d[:-1], "truncated or padded"),
    (lambda d: d + b"\0", "truncated or padded"),
    (lambda d: d[:10], "shorter than the 16-byte prefix"),
    (lambda d: d[:8] + struct.pack(">I", HEADER_LIMIT + 1) + d[12:], "header length"),
    (lambda d: d[:12] + struct.pack(">I", 1 << 31) + d[16:], "over the limit"),
])
def test_malformed_envelopes_are_refused_naming_the_field(mutate, message):
    data = encode_envelope(MessageType.ACK, {"device_id": "d"}, b"xyz")
    with pytest.raises(EnvelopeError, match=message):
        decode_envelope(mutate(data))


def test_header_must_be_a_json_object_and_payload_limit_is_the_receivers():
    body = b"[1,2]"
    data = MAGIC + bytes([1, 4, 0, 0]) + struct.pack(">II", len(body), 0) + body
    with pytest.raises(EnvelopeError, match="JSON object"):
        decode_envelope(data)
    big = encode_envelope(MessageType.UPDATE, {"device_id": "d"}, b"\0" * 5000)
    with pytest.raises(EnvelopeError, match="payload length 5,000 is over the limit of 4,096"):
        decode_envelope(big, payload_limit=4096)
    assert peek_header(big) == (MessageType.UPDATE, {"device_id": "d"})  # so the sender can be told


def test_header_schemas_refuse_missing_fields_and_ignore_unknown_ones():
    ok = Envelope(MessageType.ACK, {"device_id": "d", "round": 2, "task": "t", "accepted": True,
                                    "from_a_newer_peer": 1})
    assert parse_header(ok).accepted
    with pytest.raises(EnvelopeError, match="round"):
        parse_header(Envelope(MessageType.UPDATE, {"device_id": "d", "task": "t", "num_samples": 3}))
    with pytest.raises(EnvelopeError, match="expected a TASK message, got ACK"):
        parse_header(ok, MessageType.TASK)


def test_topics_end_in_the_device_id_and_refuse_unsafe_ids():
    topics = Topics("lab-3")
    assert topics.update("pi-7") == "fedprune/lab-3/update/pi-7"
    assert topics.device_of("fedprune/lab-3/task/pi-7") == ("task", "pi-7")
    for bad in ("fedprune/other/task/pi-7", "fedprune/lab-3/task/pi-7/x", "fedprune/lab-3/task/+"):
        with pytest.raises(ValueError):
            topics.device_of(bad)
    with pytest.raises(ValueError, match="MQTT topic level"):
        Topics("a/b")


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_decoder(data):
    try:
        envelope = decode_envelope(data)
    except EnvelopeError:
        return
    try:
        parse_header(envelope)
    except EnvelopeError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(list(MessageType)),
       st.dictionaries(st.text(max_size=8), st.integers(-(10**20 - 1), 10**20 - 1) | st.text(max_size=8),
                       max_size=4),
       st.binary(max_size=64), st.integers(0, 80), st.integers(0, 255))
def test_any_single_byte_corruption_is_refused_cleanly_or_decodes(kind, header, payload, pos, value):
    data = bytearray(encode_envelope(kind, header, payload))
    data[pos % len(data)] = value
    try:
        decode_envelope(bytes(data))
    except EnvelopeError:
        pass


# Hostile JSON text: what the generators above never made, and what crashed decode_envelope
# (issue 11): nesting past the recursion limit, integers of thousands of digits, NaN/Infinity and
# overflowing floats, unpaired surrogate escapes.
HOSTILE_LEAVES = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1e-400", "-0", "0.5"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(['"\\ud800"', '"\\udfff x"', '"\\ud83d\\ude00"', '"a\\"["', '"dev1\\n"']),
)
HOSTILE_JSON = st.recursive(
    HOSTILE_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(inner, max_size=3).map(lambda xs: "{" + ",".join(f'"k{i}":{x}' for i, x in enumerate(xs)) + "}"),
        st.tuples(st.integers(1, 3000), inner, st.booleans()).map(
            lambda t: ("[" * t[0] + t[1] + "]" * t[0]) if t[2] else ('{"a":' * t[0] + t[1] + "}" * t[0])),
    ),
    max_leaves=6,
)
VALID_HEADERS = {
    MessageType.REGISTER: {"device_id": "pi-7", "profile": {}, "num_samples": 5},
    MessageType.TASK: {"device_id": "pi-7", "round": 1, "task": "t", "plan": {}, "train": {},
                       "planned_rounds": 3, "deadline": 1e9},
    MessageType.UPDATE: {"device_id": "pi-7", "round": 1, "task": "t", "num_samples": 5,
                         "payload_sha256": "0" * 64, "epsilon": 0.5},
    MessageType.ACK: {"device_id": "pi-7", "round": 1, "task": "t", "accepted": True},
    MessageType.REFUSAL: {"device_id": "pi-7", "round": 1, "task": "t", "code": "internal", "message": "m"},
    MessageType.STATUS: {"device_id": "pi-7", "online": True},
    MessageType.ARTIFACT: {"device_id": "pi-7", "round": 0, "task": "t", "manifest": {}, "artifact": "a"},
    MessageType.SECAGG: {"device_id": "pi-7", "round": 1, "task": "t", "stage": "masked", "num_samples": 5},
}




def refused_or_parsed(data: bytes) -> None:
    """The whole receive path of a message: only EnvelopeError may come out."""
    try:
        parse_header(decode_envelope(data))
    except EnvelopeError:
        pass
    try:
        peek_header(data)
    except EnvelopeError:
        pass


@settings(max_examples=200, deadline=None)
@given(HOSTILE_JSON)
def test_hostile_json_headers_are_refused_cleanly(fragment):
    refused_or_parsed(raw_envelope(MessageType.UPDATE, fragment.encode()))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(MessageType)), st.data(), HOSTILE_JSON)
def test_any_header_field_replaced_by_hostile_json_is_refused_cleanly(kind, data, fragment):
    valid = VALID_HEADERS[kind]
    field = data.draw(st.sampled_from(sorted(valid) + ["extra"]))
    placeholder = "\u0001PLACEHOLDER\u0001"
    text = json.dumps({**valid, field: placeholder}).replace(json.dumps(placeholder), fragment)
    refused_or_parsed(raw_envelope(kind, text.encode()))


def test_shipped_example_configs_are_valid():
    service = load_config(ROOT / "deploy" / "coordinator.example.toml", schema=ServiceSettings)
    assert service.rounds.total == 20 and service.broker.max_payload_bytes == 64 * 1024 * 1024
    edge = load_edge_config(ROOT / "deploy" / "edge.example.toml")
    assert edge.max_payload_bytes == service.broker.max_payload_bytes
    conf = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    assert f"message_size_limit {service.broker.max_payload_bytes}" in conf
    assert "max_queued_messages 0" in conf
    assert tomllib.loads((ROOT / "deploy" / "edge.example.toml").read_text())["data"]["device_index"] == 17
