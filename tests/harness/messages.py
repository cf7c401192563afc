"""Hand-built wire messages: what any broker client (or an attacker holding a device's
credentials) can publish."""

from __future__ import annotations

import hashlib
import struct

from edge_sdk.protocol import MAGIC, VERSION, MessageType, encode_envelope


def raw_envelope(kind: MessageType, header: bytes, payload: bytes = b"") -> bytes:
    """An envelope around header bytes exactly as given (a peer need not send valid JSON)."""
    return struct.pack(">4sBBHII", MAGIC, VERSION, int(kind), 0, len(header), len(payload)) + header + payload


def update_message(header: dict, payload: bytes, **changes) -> bytes:
    """An UPDATE with `header` (and `changes`) whose payload_sha256 matches `payload`, as a
    device (or an attacker holding its credentials) would build it."""
    return encode_envelope(MessageType.UPDATE, {**header, **changes,
                                                "payload_sha256": hashlib.sha256(payload).hexdigest()},
                           payload)
