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

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
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


def _read_key(path: str | Path, what: str, key: str) -> bytes:
    """The PEM bytes, or ValueError naming the file and the config key that names it: a
    device folder copied without its key stops with a sentence, not an OSError traceback."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read ({exc.strerror or exc}); fix {key} or "
                         "copy the file from the provisioned folder") from None


def load_private_key(path: str | Path, key: str = "signing_key") -> Ed25519PrivateKey:
    pem = _read_key(path, "the signing key", key)
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{key}: {path} is not a PEM private key without a password") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{key}: {path} is not an Ed25519 private key")
    return loaded


def load_public_key(path: str | Path, key: str = "coordinator_key") -> Ed25519PublicKey:
    pem = _read_key(path, "the coordinator's public key", key)
    try:
        loaded = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{key}: {path} is not a PEM public key") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise ValueError(f"{key}: {path} is not an Ed25519 public key")
    return loaded
