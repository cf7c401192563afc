"""Tasks and artifacts signed by the coordinator (Ed25519), verified by devices.

The signature covers the canonical JSON of the header without its `signature` field and the
sha256 of the payload, so neither the plan nor the download can be changed in transit or forged
by another client of the broker. Keys are PEM files from `fedprune coordinator provision`: the
coordinator holds the private key, every device the public one.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .envelope import EnvelopeError


def _message(header: dict[str, Any], payload: bytes) -> bytes:
    body = {k: v for k, v in header.items() if k != "signature"}
    return (json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
            + hashlib.sha256(payload).digest())


def sign(header: dict[str, Any], payload: bytes, key: Ed25519PrivateKey) -> dict[str, Any]:
    signature = key.sign(_message(header, payload))
    return {**header, "signature": base64.b64encode(signature).decode()}


def verify(header: dict[str, Any], payload: bytes, key: Ed25519PublicKey) -> None:
    """Raises EnvelopeError unless the header carries a valid coordinator signature."""
    encoded = header.get("signature")
    if not isinstance(encoded, str):
        raise EnvelopeError("message is not signed; this device only accepts signed tasks")
    try:
        key.verify(base64.b64decode(encoded, validate=True), _message(header, payload))
    except (InvalidSignature, ValueError):
        raise EnvelopeError("signature does not verify with the coordinator's key: forged or altered") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key
