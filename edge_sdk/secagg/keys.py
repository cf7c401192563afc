"""Keys and what is derived from them: a device's two X25519 key pairs (one to encrypt shares, one
to agree pairwise mask seeds), the self-mask seed's commitment, and the sealing of shares.

Everything derived is bound to the round's session id (HKDF salt, AEAD associated data), so
nothing from one round or one parameter set is accepted in another.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


@dataclass(frozen=True)
class PublicKeys:
    """What a device advertises: its share-encryption key, its mask key, and a commitment to its
    self-mask seed (so a reconstructed seed can be checked)."""
    c_pk: bytes
    s_pk: bytes
    b_commit: bytes


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def commitment(seed: bytes, session_id: bytes, index: int) -> bytes:
    """Hiding (the seed is 32 random bytes) and binding: the server checks a reconstructed
    self-mask seed against it."""
    return hashlib.sha256(b"fedprune-secagg/1 self-mask commitment\x00" + session_id
                          + struct.pack(">H", index) + seed).digest()


def check_public(raw: bytes, what: str) -> None:
    """Refuses a public key no device could agree with (a low-order point): the server checks
    at ADVERTISE, so one device's bad key does not make all its neighbours abort later."""
    _agree(X25519PrivateKey.generate(), raw, what)


def _agree(private: X25519PrivateKey, peer_public: bytes, what: str) -> bytes:
    """The X25519 shared secret; a key that is not a point, or a low-order point (an all-zero
    secret), is refused: a device never uses a key it cannot verify."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise SecAggError(f"{what}: not a usable X25519 public key") from None
    if shared == bytes(KEY_BYTES):
        raise SecAggError(f"{what}: a low-order X25519 public key")
    return shared


def _derive(shared: bytes, session_id: bytes, label: bytes, a: int, b: int) -> bytes:
    low, high = sorted((a, b))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session_id,
                info=b"fedprune-secagg/1 " + label + struct.pack(">HH", low, high)).derive(shared)


def share_key(private: X25519PrivateKey, peer_public: bytes, session_id: bytes, a: int, b: int,
              what: str) -> bytes:
    """The AEAD key for shares between devices a and b (the same both ways)."""
    return _derive(_agree(private, peer_public, what), session_id, b"share key", a, b)


def mask_seed(private: X25519PrivateKey, peer_public: bytes, session_id: bytes, a: int, b: int,
              what: str) -> bytes:
    """The PRG seed of the pairwise mask between devices a and b."""
    return _derive(_agree(private, peer_public, what), session_id, b"pair mask", a, b)


def self_mask_seed(seed: bytes, session_id: bytes, index: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session_id,
                info=b"fedprune-secagg/1 self mask" + struct.pack(">H", index)).derive(seed)


def _aad(session_id: bytes, sender: int, recipient: int) -> bytes:
    return b"fedprune-secagg/1 shares\x00" + session_id + struct.pack(">HH", sender, recipient)


def seal(key: bytes, plaintext: bytes, session_id: bytes, sender: int, recipient: int) -> bytes:
    """nonce || ChaCha20-Poly1305 ciphertext; the session and both indices are authenticated, so
    the server can neither read nor redirect a share."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, _aad(session_id, sender, recipient))


def open_sealed(key: bytes, sealed: bytes, session_id: bytes, sender: int, recipient: int,
                what: str) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                             _aad(session_id, sender, recipient))
    except InvalidTag:
        raise SecAggError(f"{what}: the shares do not authenticate (tampered, misrouted, or "
                          "sealed under other round parameters)") from None
