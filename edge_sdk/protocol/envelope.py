"""The binary envelope every fedprune MQTT message travels in: a 16-byte prefix (magic, version,
message type, flags, header and payload lengths), a JSON header, the payload. The layout is
specified in docs/PROTOCOL.md, section "Envelope, version 1", and only there;
tests/test_payload_spec.py checks its tables against the constants below.

Lengths are checked against the buffer and the limits before anything is parsed or allocated,
and the message must end exactly where the lengths say: a truncated, padded or oversized message
is refused with an `EnvelopeError` that says which field is wrong. The header is parsed by the
bounded JSON loader (`edge_sdk.validation.load_json`: at most 32 levels of nesting, integers of at
most 20 digits, no NaN/Infinity/overflowing floats), so no sequence of bytes raises anything else.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

from ..validation import load_json

MAGIC = b"FPRN"
VERSION = 1
_PREFIX = struct.Struct(">4sBBHII")
PREFIX_BYTES = _PREFIX.size  # 16
HEADER_LIMIT = 64 * 1024
DEFAULT_PAYLOAD_LIMIT = 64 * 1024 * 1024


class EnvelopeError(ValueError):
    """A message that is not a valid fedprune envelope; the text names the field."""


class MessageType(enum.IntEnum):
    REGISTER = 1   # device -> coordinator: profile and data size
    TASK = 2       # coordinator -> device: plan, training settings, download payload
    UPDATE = 3     # device -> coordinator: the sparse update
    ACK = 4        # coordinator -> device: update accepted (or refused, with the reason)
    REFUSAL = 5    # device -> coordinator: the device will not run a task, and why
    STATUS = 6     # device -> coordinator (retained; last will): online / offline
    ARTIFACT = 7   # coordinator -> device: an exported model for local inference
    SECAGG = 8     # both ways: one secure-aggregation stage (edge_sdk/secagg's bytes as payload)


@dataclass(frozen=True)
class Envelope:
    type: MessageType
    header: dict[str, Any]
    payload: bytes = b""


def _header_bytes(header: dict[str, Any]) -> bytes:
    try:
        return json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(f"header cannot be sent: {exc}") from None


def _load_header(head: bytes) -> dict[str, Any]:
    header = load_json(head, "header", EnvelopeError, HEADER_LIMIT)
    if not isinstance(header, dict):
        raise EnvelopeError(f"header must be a JSON object, got {type(header).__name__}")
    return header


def envelope_size(header: dict[str, Any], payload_bytes: int) -> int:
    """Bytes `encode_envelope` would produce, without building the message."""
    return PREFIX_BYTES + len(_header_bytes(header)) + payload_bytes


def encode_envelope(kind: MessageType, header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = _header_bytes(header)
    _load_header(head)  # what the receiver would refuse (too big or deep, huge ints) fails here
    return _PREFIX.pack(MAGIC, VERSION, int(kind), 0, len(head), len(payload)) + head + payload


def decode_envelope(data: bytes, payload_limit: int = DEFAULT_PAYLOAD_LIMIT) -> Envelope:
    kind, header, head_len, payload_len = _prefix_and_header(data, payload_limit)
    if len(data) != PREFIX_BYTES + head_len + payload_len:
        raise EnvelopeError(f"message is {len(data):,} bytes but its lengths say "
                            f"{PREFIX_BYTES + head_len + payload_len:,}: truncated or padded")
    return Envelope(kind, header, bytes(data[PREFIX_BYTES + head_len:]))


def peek_header(data: bytes) -> tuple[MessageType, dict[str, Any]]:
    """Type and header of a message whose payload may be refused, so the sender can be told why."""
    kind, header, _, _ = _prefix_and_header(data, payload_limit=1 << 32)
    return kind, header


def _prefix_and_header(data: bytes, payload_limit: int) -> tuple[MessageType, dict[str, Any], int, int]:
    if len(data) < PREFIX_BYTES:
        raise EnvelopeError(f"message is {len(data)} bytes, shorter than the {PREFIX_BYTES}-byte prefix")
    magic, version, kind, flags, head_len, payload_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise EnvelopeError(f"magic is {magic!r}, expected {MAGIC!r}: not a fedprune message")
    if version != VERSION:
        raise EnvelopeError(f"envelope version {version}; this side speaks version {VERSION}")
    try:
        kind = MessageType(kind)
    except ValueError:
        raise EnvelopeError(f"unknown message type {kind}") from None
    if flags:
        raise EnvelopeError(f"flags are {flags:#06x}; version {VERSION} defines none")
    if head_len > HEADER_LIMIT:
        raise EnvelopeError(f"header length {head_len:,} is over the limit of {HEADER_LIMIT:,}")
    if payload_len > payload_limit:
        raise EnvelopeError(f"payload length {payload_len:,} is over the limit of {payload_limit:,}")
    if len(data) < PREFIX_BYTES + head_len:
        raise EnvelopeError(f"message is {len(data):,} bytes, too short for its "
                            f"{head_len:,}-byte header: truncated")
    header = _load_header(bytes(data[PREFIX_BYTES:PREFIX_BYTES + head_len]))
    return kind, header, head_len, payload_len
