"""Hand-built wire messages for the hostile-input tests: what any broker client can publish."""

from __future__ import annotations

import struct

from edge_sdk.protocol import MAGIC, VERSION, MessageType


def raw_envelope(kind: MessageType, header: bytes, payload: bytes = b"") -> bytes:
    """An envelope around header bytes exactly as given (a peer need not send valid JSON)."""
    return struct.pack(">4sBBHII", MAGIC, VERSION, int(kind), 0, len(header), len(payload)) + header + payload
