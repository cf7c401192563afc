"""The bytes of every secure-aggregation message (docs/PROTOCOL.md, "Secure aggregation"), and
their strict parser: fixed layouts, counts bounded by the bytes present, indices strictly
increasing, nothing left over; no pickle, no JSON. Whatever the bytes, a parser raises only
SecAggError, naming the message and the field.

Integers are big-endian, as in the envelope; the masked vector is little-endian words, as in the
tensor payload.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np

from . import shamir, supports
from .errors import SecAggError
from .keys import KEY_BYTES, NONCE_BYTES, TAG_BYTES, PublicKeys
from .params import RoundParams, decode_params

MAGIC = b"FPSA"
VERSION = 1
PREFIX = struct.Struct(">4sBBH")  # magic, version, kind, flags
SESSION_BYTES = 32
SHARE_PLAINTEXT = struct.Struct(f">HH{shamir.SHARE_BYTES}s{shamir.SHARE_BYTES}s")
SEALED_BYTES = NONCE_BYTES + SHARE_PLAINTEXT.size + TAG_BYTES  # 12 + 70 + 16 = 98
SELF_SHARE, KEY_SHARE = 1, 2  # what an UNMASK entry reveals


class Kind(enum.IntEnum):
    SETUP = 1           # server -> device: round parameters, its own and its neighbours' supports
    ADVERTISE = 2       # device -> server: public keys and self-mask commitment
    KEYS = 3            # server -> device: its neighbours' advertised keys (and its own, echoed)
    SHARES = 4          # device -> server: sealed shares, one per neighbour
    FORWARD = 5         # server -> device: the sealed shares its neighbours sent it
    MASKED = 6          # device -> server: the masked input over its support
    UNMASK_REQUEST = 7  # server -> device: which neighbours survived and which dropped
    UNMASK = 8          # device -> server: their self-mask or mask-key shares


@dataclass(frozen=True)
class Setup:
    params: RoundParams
    recipient: int
    supports: dict[int, tuple[np.ndarray, np.ndarray]]  # runs (starts, lengths)


@dataclass(frozen=True)
class Advertise:
    session: bytes
    sender: int
    keys: PublicKeys


@dataclass(frozen=True)
class Keys:
    session: bytes
    recipient: int
    entries: dict[int, PublicKeys]


@dataclass(frozen=True)
class Sealed:
    """SHARES (`device` = sender, `sealed` by recipient) or FORWARD (`device` = recipient,
    `sealed` by sender)."""
    session: bytes
    device: int
    sealed: dict[int, bytes]


@dataclass(frozen=True)
class Masked:
    session: bytes
    sender: int
    values: np.ndarray  # uint32


@dataclass(frozen=True)
class UnmaskRequest:
    session: bytes
    recipient: int
    survivors_total: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class Unmask:
    session: bytes
    sender: int
    self_shares: dict[int, int]
    key_shares: dict[int, int]


class _Reader:
    def __init__(self, data: bytes, kind: Kind):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SecAggError(f"{kind.name}: a message is bytes, got {type(data).__name__}")
        self.data, self.kind, self.offset = bytes(data), kind, 0
        magic, version, got, flags = self.unpack(PREFIX, "prefix")
        if magic != MAGIC:
            raise SecAggError(f"{kind.name}: not a secure-aggregation message (magic {magic!r})")
        if version != VERSION:
            raise SecAggError(f"{kind.name}: version {version}, this library speaks {VERSION}")
        if got != kind:
            name = Kind(got).name if got in Kind._value2member_map_ else f"unknown kind {got}"
            raise SecAggError(f"{kind.name} expected, got {name}")
        if flags:
            raise SecAggError(f"{kind.name}: flags must be 0, got {flags}")

    def take(self, size: int, field: str) -> bytes:
        if size < 0 or self.offset + size > len(self.data):
            raise SecAggError(f"{self.kind.name}: truncated at {field} ({size} bytes needed at "
                              f"offset {self.offset}, {len(self.data) - self.offset} left)")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, layout: struct.Struct, field: str) -> tuple:
        return layout.unpack(self.take(layout.size, field))

    def u16(self, field: str) -> int:
        return self.unpack(_U16, field)[0]

    def u32(self, field: str) -> int:
        return self.unpack(_U32, field)[0]

    def indices(self, field: str) -> list[int]:
        count = self.u16(f"{field} count")
        values = [self.u16(field) for _ in range(count)]
        self.increasing(values, field)
        return values

    def increasing(self, values: list[int], field: str) -> None:
        if any(b <= a for a, b in zip(values, values[1:])):
            raise SecAggError(f"{self.kind.name}: {field} must be strictly increasing")

    def end(self) -> None:
        if self.offset != len(self.data):
            raise SecAggError(f"{self.kind.name}: {len(self.data) - self.offset} bytes after the end")


_U16, _U32 = struct.Struct(">H"), struct.Struct(">I")


def _prefix(kind: Kind) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, kind, 0)


def _keys_bytes(keys: PublicKeys) -> bytes:
    return keys.c_pk + keys.s_pk + keys.b_commit


def _read_keys(reader: _Reader, field: str) -> PublicKeys:
    raw = reader.take(3 * KEY_BYTES, field)
    return PublicKeys(raw[:32], raw[32:64], raw[64:])


# --- SETUP -------------------------------------------------------------------------------------

def encode_setup(params: RoundParams, recipient: int,
                 attached: dict[int, tuple[np.ndarray, np.ndarray]]) -> bytes:
    body = [_prefix(Kind.SETUP), params.to_bytes(), struct.pack(">HH", recipient, len(attached))]
    for index in sorted(attached):
        blob = supports.encode(*attached[index], params.dim)
        body.append(struct.pack(">HI", index, len(blob)) + blob)
    return b"".join(body)


def decode_setup(data: bytes) -> Setup:
    reader = _Reader(data, Kind.SETUP)
    params, reader.offset = decode_params(reader.data, reader.offset, "SETUP")
    recipient = reader.u16("recipient")
    count = reader.u16("support count")
    attached, order = {}, []
    for _ in range(count):
        index = reader.u16("support index")
        blob = reader.take(reader.u32("support length"), "support")
        if index >= params.n:
            raise SecAggError(f"SETUP: a support for device index {index} of {params.n}")
        runs = supports.decode(blob, params.dim, f"SETUP: support of device {index}")
        if supports.digest_runs(*runs, params.dim) != params.support_digests[index]:
            raise SecAggError(f"SETUP: the support of device {index} does not match its digest")
        attached[index] = runs
        order.append(index)
    reader.increasing(order, "support indices")
    reader.end()
    if recipient >= params.n:
        raise SecAggError(f"SETUP: recipient index {recipient} of {params.n}")
    return Setup(params, recipient, attached)


# --- ADVERTISE, KEYS -----------------------------------------------------------------------------

def encode_advertise(session: bytes, sender: int, keys: PublicKeys) -> bytes:
    return _prefix(Kind.ADVERTISE) + session + struct.pack(">H", sender) + _keys_bytes(keys)


def decode_advertise(data: bytes) -> Advertise:
    reader = _Reader(data, Kind.ADVERTISE)
    session = reader.take(SESSION_BYTES, "session id")
    sender = reader.u16("sender")
    keys = _read_keys(reader, "public keys")
    reader.end()
    return Advertise(session, sender, keys)


def encode_keys(session: bytes, recipient: int, entries: dict[int, PublicKeys]) -> bytes:
    body = [_prefix(Kind.KEYS), session, struct.pack(">HH", recipient, len(entries))]
    body += [struct.pack(">H", i) + _keys_bytes(entries[i]) for i in sorted(entries)]
    return b"".join(body)


def decode_keys(data: bytes) -> Keys:
    reader = _Reader(data, Kind.KEYS)
    session = reader.take(SESSION_BYTES, "session id")
    recipient = reader.u16("recipient")
    entries, order = {}, []
    for _ in range(reader.u16("entry count")):
        index = reader.u16("entry index")
        entries[index] = _read_keys(reader, f"keys of device {index}")
        order.append(index)
    reader.increasing(order, "entry indices")
    reader.end()
    return Keys(session, recipient, entries)


# --- SHARES, FORWARD -------------------------------------------------------------------------

def encode_sealed(kind: Kind, session: bytes, device: int, sealed: dict[int, bytes]) -> bytes:
    body = [_prefix(kind), session, struct.pack(">HH", device, len(sealed))]
    for other in sorted(sealed):
        if len(sealed[other]) != SEALED_BYTES:
            raise ValueError(f"sealed shares are {SEALED_BYTES} bytes")
        body.append(struct.pack(">H", other) + sealed[other])
    return b"".join(body)


def decode_sealed(data: bytes, kind: Kind) -> Sealed:
    reader = _Reader(data, kind)
    session = reader.take(SESSION_BYTES, "session id")
    device = reader.u16("device")
    sealed, order = {}, []
    for _ in range(reader.u16("entry count")):
        other = reader.u16("peer index")
        sealed[other] = reader.take(SEALED_BYTES, f"sealed shares for {other}")
        order.append(other)
    reader.increasing(order, "peer indices")
    reader.end()
    return Sealed(session, device, sealed)


# --- MASKED ------------------------------------------------------------------------------------

def encode_masked(session: bytes, sender: int, values: np.ndarray, word_bytes: int) -> bytes:
    words = values.astype(f"<u{word_bytes}", copy=False)
    return (_prefix(Kind.MASKED) + session + struct.pack(">HBI", sender, word_bytes, words.size)
            + words.tobytes())


def decode_masked(data: bytes) -> Masked:
    reader = _Reader(data, Kind.MASKED)
    session = reader.take(SESSION_BYTES, "session id")
    sender = reader.u16("sender")
    word_bytes = reader.take(1, "word size")[0]
    if word_bytes not in (1, 2, 4):
        raise SecAggError(f"MASKED: word size {word_bytes}, not 1, 2 or 4")
    count = reader.u32("value count")
    raw = reader.take(count * word_bytes, "values")
    reader.end()
    values = np.frombuffer(raw, dtype=f"<u{word_bytes}").astype(np.uint32)
    return Masked(session, sender, values)


# --- UNMASK_REQUEST, UNMASK ------------------------------------------------------------------

def encode_unmask_request(session: bytes, recipient: int, survivors_total: int,
                          survivors: list[int], dropped: list[int]) -> bytes:
    body = [_prefix(Kind.UNMASK_REQUEST), session, struct.pack(">HH", recipient, survivors_total)]
    for group in (survivors, dropped):
        body.append(struct.pack(">H", len(group)) + b"".join(struct.pack(">H", i) for i in sorted(group)))
    return b"".join(body)


def decode_unmask_request(data: bytes) -> UnmaskRequest:
    reader = _Reader(data, Kind.UNMASK_REQUEST)
    session = reader.take(SESSION_BYTES, "session id")
    recipient = reader.u16("recipient")
    total = reader.u16("survivor total")
    survivors = reader.indices("survivors")
    dropped = reader.indices("dropped")
    reader.end()
    return UnmaskRequest(session, recipient, total, tuple(survivors), tuple(dropped))


def encode_unmask(session: bytes, sender: int, self_shares: dict[int, int],
                  key_shares: dict[int, int]) -> bytes:
    entries = sorted([(j, SELF_SHARE, v) for j, v in self_shares.items()]
                     + [(j, KEY_SHARE, v) for j, v in key_shares.items()])
    body = [_prefix(Kind.UNMASK), session, struct.pack(">HH", sender, len(entries))]
    body += [struct.pack(">HB", j, what) + shamir.share_bytes(v) for j, what, v in entries]
    return b"".join(body)


def decode_unmask(data: bytes) -> Unmask:
    reader = _Reader(data, Kind.UNMASK)
    session = reader.take(SESSION_BYTES, "session id")
    sender = reader.u16("sender")
    self_shares, key_shares, order = {}, {}, []
    for _ in range(reader.u16("entry count")):
        owner = reader.u16("owner index")
        what = reader.take(1, "share kind")[0]
        value = shamir.share_value(reader.take(shamir.SHARE_BYTES, "share"),
                                   f"UNMASK: share of device {owner}")
        if what == SELF_SHARE:
            self_shares[owner] = value
        elif what == KEY_SHARE:
            key_shares[owner] = value
        else:
            raise SecAggError(f"UNMASK: share kind {what}, not {SELF_SHARE} or {KEY_SHARE}")
        order.append(owner)
    reader.increasing(order, "owner indices")  # one entry per owner: never both secrets
    reader.end()
    return Unmask(session, sender, self_shares, key_shares)


# --- the sealed plaintext ----------------------------------------------------------------------

def share_plaintext(sender: int, recipient: int, self_share: int, key_share: int) -> bytes:
    return SHARE_PLAINTEXT.pack(sender, recipient, shamir.share_bytes(self_share),
                                shamir.share_bytes(key_share))


def parse_share_plaintext(data: bytes, sender: int, recipient: int) -> tuple[int, int]:
    """(self-mask share, mask-key share) from a decrypted plaintext that names this pair."""
    what = f"shares from device {sender}"
    if len(data) != SHARE_PLAINTEXT.size:
        raise SecAggError(f"{what}: plaintext of {len(data)} bytes, {SHARE_PLAINTEXT.size} expected")
    got_sender, got_recipient, self_share, key_share = SHARE_PLAINTEXT.unpack(data)
    if (got_sender, got_recipient) != (sender, recipient):
        raise SecAggError(f"{what}: sealed for {got_sender} -> {got_recipient}")
    return shamir.share_value(self_share, what), shamir.share_value(key_share, what)
