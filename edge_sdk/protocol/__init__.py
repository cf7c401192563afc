"""The wire contract between coordinator and devices (docs/PROTOCOL.md): topics, envelope, headers.

It lives on the SDK side because both ends must agree on it byte for byte; the coordinator
imports it from here.
"""

from .envelope import (HEADER_LIMIT, MAGIC, PREFIX_BYTES, VERSION, Envelope, EnvelopeError,
                       MessageType, decode_envelope, encode_envelope, envelope_size,
                       peek_header)
from .messages import (AckHeader, ArtifactHeader, RefusalCode, RefusalHeader, RegisterHeader,
                       StatusHeader, TaskHeader, UpdateHeader, encode_message,
                       message_type, parse_header)
from .topics import Topics

__all__ = ["HEADER_LIMIT", "MAGIC", "PREFIX_BYTES", "VERSION", "AckHeader", "ArtifactHeader",
           "Envelope", "EnvelopeError", "MessageType", "RefusalCode", "RefusalHeader",
           "RegisterHeader", "StatusHeader", "TaskHeader", "Topics", "UpdateHeader",
           "decode_envelope", "encode_envelope", "encode_message", "envelope_size", "message_type",
           "parse_header", "peek_header"]
