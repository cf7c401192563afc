"""A device's side of SecAgg+ (Bonawitz et al., CCS 2017; Bell et al., CCS 2020): one object per
round, fed the server's messages as bytes, answering with bytes.

    client = SecAggClient(setup, device_id, support)
    server <- client.advertise()
    server <- client.share_keys(keys)
    server <- client.mask_input(forward, values)      # values: quantize.quantize(...)
    server <- client.unmask(unmask_request)

Each call refuses (SecAggError) what it cannot verify: parameters that do not match its own
support, keys that are not usable X25519 points or that do not echo its own, shares that do not
authenticate, an unmasking request that asks for both secrets of one device, names a survivor set
below the threshold, or comes twice. The threshold t and the neighbourhood come from the round's
parameters (params.py): the device's secrets are recoverable while t of its closed neighbourhood
survive; it never reveals a neighbour's self-mask seed share and mask-key share both.
"""

from __future__ import annotations

import os

import numpy as np

from . import keys as keylib
from . import masks, messages, shamir, supports
from .errors import SecAggError
from .messages import Kind
from .params import RoundParams


class SecAggClient:
    def __init__(self, setup: bytes, device_id: str, support) -> None:
        parsed = messages.decode_setup(setup)
        self.params: RoundParams = parsed.params
        self.index = parsed.recipient
        if self.params.participants[self.index] != device_id:
            raise SecAggError(f"SETUP is addressed to {self.params.participants[self.index]!r}, "
                              f"not {device_id!r}")
        self.support = supports.check_support(support, self.params.dim, "own support")
        if supports.digest(self.support, self.params.dim) != self.params.support_digests[self.index]:
            raise SecAggError("SETUP names a support for this device other than its own")
        expected = self.params.closed(self.index)
        if set(parsed.supports) != expected:
            raise SecAggError(f"SETUP carries supports of {sorted(parsed.supports)}, expected this "
                              f"device and its neighbours {sorted(expected)}")
        self._runs = parsed.supports
        self.session = self.params.session_id
        self._c_key = keylib.new_private_key()
        self._s_key = keylib.new_private_key()
        self._seed = os.urandom(shamir.SECRET_BYTES)
        self._own = keylib.PublicKeys(keylib.public_bytes(self._c_key), keylib.public_bytes(self._s_key),
                                      keylib.commitment(self._seed, self.session, self.index))
        self._stage = Kind.ADVERTISE
        self._peers: dict[int, keylib.PublicKeys] = {}
        self._shares: dict[int, tuple[int, int]] = {}

    def advertise(self) -> bytes:
        self._expect(Kind.ADVERTISE)
        self._stage = Kind.KEYS
        return messages.encode_advertise(self.session, self.index, self._own)

    def share_keys(self, keys: bytes) -> bytes:
        """Checks the advertised keys of its neighbours and sends each its sealed shares."""
        self._expect(Kind.KEYS)
        parsed = messages.decode_keys(keys)
        self._check_addressed(parsed.session, parsed.recipient, "KEYS")
        entries = parsed.entries
        if entries.get(self.index) != self._own:
            raise SecAggError("KEYS does not echo this device's own advertised keys unchanged")
        if not set(entries) <= self.params.closed(self.index):
            raise SecAggError(f"KEYS names devices {sorted(set(entries) - self.params.closed(self.index))} "
                              "that are not this device's neighbours")
        self._check_threshold(len(entries), "devices of its neighbourhood advertised keys")
        published = [k.c_pk for k in entries.values()] + [k.s_pk for k in entries.values()]
        if len(set(published)) != len(published):
            raise SecAggError("KEYS repeats a public key")
        xs = [j + 1 for j in sorted(entries)]
        self_shares = shamir.split(self._seed, self.params.threshold, xs)
        key_shares = shamir.split(keylib.private_bytes(self._s_key), self.params.threshold, xs)
        sealed = {}
        for j, peer in entries.items():
            if j == self.index:
                continue
            key = keylib.share_key(self._c_key, peer.c_pk, self.session, self.index, j,
                                   f"KEYS: device {j}'s share key")
            keylib.mask_seed(self._s_key, peer.s_pk, self.session, self.index, j,
                             f"KEYS: device {j}'s mask key")  # refuse an unusable key now
            plaintext = messages.share_plaintext(self.index, j, self_shares[j + 1], key_shares[j + 1])
            sealed[j] = keylib.seal(key, plaintext, self.session, self.index, j)
        self._peers = {j: k for j, k in entries.items() if j != self.index}
        self._shares = {self.index: (self_shares[self.index + 1], key_shares[self.index + 1])}
        self._stage = Kind.FORWARD
        return messages.encode_sealed(Kind.SHARES, self.session, self.index, sealed)

    def mask_input(self, forward: bytes, values) -> bytes:
        """Opens the shares its neighbours sent, then masks `values` (integers mod 2**bits, one
        per coordinate of its support) with its self mask and one pairwise mask per neighbour
        that sent shares."""
        self._expect(Kind.FORWARD)
        parsed = messages.decode_sealed(forward, Kind.FORWARD)
        self._check_addressed(parsed.session, parsed.device, "FORWARD")
        unknown = set(parsed.sealed) - set(self._peers)
        if unknown:
            raise SecAggError(f"FORWARD carries shares from {sorted(unknown)}, which this device "
                              "has no keys of")
        opened = {self.index: self._shares[self.index]}
        for j, sealed in parsed.sealed.items():
            key = keylib.share_key(self._c_key, self._peers[j].c_pk, self.session, self.index, j,
                                   f"device {j}'s share key")
            plaintext = keylib.open_sealed(key, sealed, self.session, j, self.index,
                                           f"FORWARD: shares from device {j}")
            opened[j] = messages.parse_share_plaintext(plaintext, j, self.index)
        self._check_threshold(len(opened), "devices of its neighbourhood sent shares")
        masked = self._checked_values(values).copy()
        masks.apply(masked, None, keylib.self_mask_seed(self._seed, self.session, self.index), 1)
        for j in sorted(parsed.sealed):
            seed = keylib.mask_seed(self._s_key, self._peers[j].s_pk, self.session, self.index, j,
                                    f"device {j}'s mask key")
            positions = self._common_positions(j)
            masks.apply(masked, positions, seed, masks.pair_sign(self.index, j))
        masked &= np.uint32(self.params.modulus_mask)
        self._shares = opened
        self._stage = Kind.UNMASK_REQUEST
        return messages.encode_masked(self.session, self.index, masked, self.params.word_bytes)

    def unmask(self, request: bytes) -> bytes:
        """For each neighbour that survived, its self-mask share; for each that dropped after
        sharing, its mask-key share; never both, and only once."""
        self._expect(Kind.UNMASK_REQUEST)
        parsed = messages.decode_unmask_request(request)
        self._check_addressed(parsed.session, parsed.recipient, "UNMASK_REQUEST")
        survivors, dropped = set(parsed.survivors), set(parsed.dropped)
        if self.index not in survivors:
            raise SecAggError("UNMASK_REQUEST does not count this device among the survivors")
        if survivors & dropped:
            raise SecAggError(f"UNMASK_REQUEST counts {sorted(survivors & dropped)} as both "
                              "survived and dropped")
        if survivors | dropped != set(self._shares):
            raise SecAggError(f"UNMASK_REQUEST names {sorted(survivors | dropped)}, this device "
                              f"exchanged shares with {sorted(self._shares)}")
        if not max(self.params.threshold, len(survivors)) <= parsed.survivors_total <= self.params.n:
            raise SecAggError(f"UNMASK_REQUEST: {parsed.survivors_total} survivors, the threshold "
                              f"is {self.params.threshold}; refusing to help unmask")
        answer = messages.encode_unmask(self.session, self.index,
                                        {j: self._shares[j][0] for j in survivors},
                                        {j: self._shares[j][1] for j in dropped})
        self._shares.clear()
        self._seed = b""
        self._stage = None
        return answer

    def _expect(self, stage: Kind) -> None:
        """Refuses a step out of order; a step moves the stage on only once it has succeeded, so a
        refused message leaves the device ready for the genuine one."""
        if self._stage != stage:
            raise SecAggError(f"{stage.name} step out of order (this device is at {self._stage.name})"
                              if self._stage else f"{stage.name}: this device's round is over")

    def _common_positions(self, j: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Where in its own support the pair (self, j) is masked, as runs of positions; None:
        everywhere (the same support, known from the digests)."""
        digests = self.params.support_digests
        if digests[j] == digests[self.index]:
            return None
        positions, _, lengths = supports.common_runs(self._runs[self.index], self._runs[j])
        return positions, lengths

    def _check_addressed(self, session: bytes, recipient: int, what: str) -> None:
        if session != self.session:
            raise SecAggError(f"{what} belongs to another session")
        if recipient != self.index:
            raise SecAggError(f"{what} is addressed to device index {recipient}, not {self.index}")

    def _check_threshold(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise SecAggError(f"{count} {what}, the threshold is {self.params.threshold}")

    def _checked_values(self, values) -> np.ndarray:
        array = np.asarray(values)
        if array.shape != self.support.shape:
            raise SecAggError(f"values of shape {array.shape}, the support has {self.support.size} "
                              "coordinates")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise SecAggError(f"values must be integers mod 2**{self.params.bits}, got {array.dtype}")
        if array.size and (array.min() < 0 or int(array.max()) > self.params.modulus_mask):
            raise SecAggError(f"values must lie in [0, 2**{self.params.bits})")
        return array.astype(np.uint32, copy=False)
