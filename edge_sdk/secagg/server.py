"""The server's side of SecAgg+: it relays keys and sealed shares, sums masked inputs as they
arrive, and removes the masks from the sum once enough survivors answer. It learns the sum of the
survivors' inputs per coordinate and nothing of any one input.

    server = SecAggServer(supports, dim, bits=32, min_holders=2)
    device <- server.setup_message(device_id)
    server.receive_advertise(bytes) ...     ; device <- server.keys_messages()[device_id]
    server.receive_shares(bytes) ...        ; device <- server.forward_messages()[device_id]
    server.receive_masked_input(bytes) ...  ; device <- server.unmask_requests()[device_id]
    server.receive_unmask(bytes) ...        ; result = server.result()

Each `*_messages`/`unmask_requests`/`result` call closes a step: who has not answered by then has
dropped. Dropout tolerance: a device whose closed neighbourhood keeps fewer than t members at a
step is dropped with it (its secrets could not be rebuilt); unmasking is refused (SecAggError
naming the counts) when fewer than t devices sent masked inputs or answered the unmasking
request, or when a needed secret has fewer than t shares. A device that drops after its masked
input is still in the sum (its self mask is rebuilt from its neighbours' shares); one that drops
before is not (the masks it shared are rebuilt from its mask key and removed).

Masked inputs are added into one running sum when they arrive, never kept one by one; a
coordinate held by fewer than `min_holders` survivors is zeroed in that sum before any mask is
removed, so it is never unmasked and never released (`released` is False there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import keys as keylib
from . import masks, messages, shamir, supports
from .errors import SecAggError
from .messages import Kind
from .params import RoundParams, default_degree, default_threshold


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked sum per global coordinate (integers mod 2**bits; 0 where not released), how
    many summed devices held each coordinate, and where the sum is released (holders >=
    min_holders)."""
    sum: np.ndarray
    holders: np.ndarray
    released: np.ndarray
    bits: int
    survivors: tuple[str, ...]  # inputs in the sum
    dropped: tuple[str, ...]    # shared keys, sent no masked input: not in the sum

    @property
    def min_released_holders(self) -> int:
        """The fewest devices behind a released coordinate: each adds its share of noise, so the
        privacy of a round is accounted with this count (accounting.py), not the number selected."""
        held = self.holders[self.released]
        return int(held.min()) if held.size else 0


class SecAggServer:
    def __init__(self, device_supports: Mapping[str, object], dim: int, *, bits: int = 32,
                 threshold: int | None = None, degree: int | None = None, min_holders: int = 1,
                 round_seed: bytes | None = None) -> None:
        ids = tuple(sorted(device_supports))
        arrays = [supports.check_support(device_supports[d], dim, f"support of {d}") for d in ids]
        degree = default_degree(len(ids)) if degree is None else degree
        threshold = default_threshold(degree + 1) if threshold is None else threshold
        self.params = RoundParams(round_seed or os.urandom(32), ids, dim, bits, threshold, degree,
                                  min_holders, tuple(supports.digest(s, dim) for s in arrays))
        self._runs = [supports.to_ranges(s) for s in arrays]  # kept as runs: a few bytes a device
        self._sizes = [s.size for s in arrays]
        self.session = self.params.session_id
        self._stage = Kind.ADVERTISE
        self._advertised: dict[int, keylib.PublicKeys] = {}
        self._sealed: dict[int, dict[int, bytes]] = {}
        self._u1: set[int] = set()
        self._u2: set[int] = set()
        self._u3: set[int] = set()
        self._answers: dict[int, messages.Unmask] = {}
        self._sum = np.zeros(dim, np.uint32)
        self._holders: np.ndarray | None = None

    def setup_message(self, device_id: str) -> bytes:
        i = self.params.index(device_id)
        return messages.encode_setup(self.params, i, {j: self._runs[j] for j in self.params.closed(i)})

    # --- step 0: keys ------------------------------------------------------------------------

    def receive_advertise(self, message: bytes) -> str:
        self._expect(Kind.ADVERTISE)
        parsed = messages.decode_advertise(message)
        sender = self._sender(parsed.session, parsed.sender, self._advertised, "ADVERTISE")
        published = {k for keys in self._advertised.values() for k in (keys.c_pk, keys.s_pk)}
        if {parsed.keys.c_pk, parsed.keys.s_pk} & published or parsed.keys.c_pk == parsed.keys.s_pk:
            raise SecAggError(f"ADVERTISE from {self._name(sender)} repeats a public key")
        for raw in (parsed.keys.c_pk, parsed.keys.s_pk):
            keylib.check_public(raw, f"ADVERTISE from {self._name(sender)}")
        self._advertised[sender] = parsed.keys
        return self._name(sender)

    def keys_messages(self) -> dict[str, bytes]:
        """Closes step 0: each device that advertised, and keeps t of its neighbourhood, gets its
        neighbours' keys."""
        self._close(Kind.ADVERTISE, Kind.SHARES)
        self._u1 = self._keep_recoverable(set(self._advertised), "advertised keys")
        return {self._name(i): messages.encode_keys(
                    self.session, i, {j: self._advertised[j] for j in self.params.closed(i) & self._u1})
                for i in sorted(self._u1)}

    # --- step 1: shares ----------------------------------------------------------------------

    def receive_shares(self, message: bytes) -> str:
        self._expect(Kind.SHARES)
        parsed = messages.decode_sealed(message, Kind.SHARES)
        sender = self._sender(parsed.session, parsed.device, self._sealed, "SHARES", self._u1)
        expected = (self.params.neighbours[sender] & self._u1)
        if set(parsed.sealed) != expected:
            raise SecAggError(f"SHARES from {self._name(sender)} are for {sorted(parsed.sealed)}, "
                              f"its neighbours with keys are {sorted(expected)}")
        self._sealed[sender] = parsed.sealed
        return self._name(sender)

    def forward_messages(self) -> dict[str, bytes]:
        """Closes step 1: each device that sent shares, and keeps t of its neighbourhood, gets the
        shares its neighbours sealed for it."""
        self._close(Kind.SHARES, Kind.MASKED)
        self._u2 = self._keep_recoverable(set(self._sealed), "sent shares")
        return {self._name(i): messages.encode_sealed(
                    Kind.FORWARD, self.session, i,
                    {j: self._sealed[j][i] for j in self.params.neighbours[i] & self._u2})
                for i in sorted(self._u2)}

    # --- step 2: masked inputs ---------------------------------------------------------------

    def receive_masked_input(self, message: bytes) -> str:
        """Adds the masked input into the running sum at once; it is not kept."""
        self._expect(Kind.MASKED)
        parsed = messages.decode_masked(message)
        sender = self._sender(parsed.session, parsed.sender, self._u3, "MASKED", self._u2)
        if parsed.values.size != self._sizes[sender]:
            raise SecAggError(f"MASKED from {self._name(sender)} has {parsed.values.size} values, "
                              f"its support {self._sizes[sender]}")
        if parsed.values.size and int(parsed.values.max()) > self.params.modulus_mask:
            raise SecAggError(f"MASKED from {self._name(sender)}: values of more than "
                              f"{self.params.bits} bits")
        supports.add_at_runs(self._sum, *self._runs[sender], parsed.values)
        self._u3.add(sender)
        return self._name(sender)

    def unmask_requests(self) -> dict[str, bytes]:
        """Closes step 2. Withheld coordinates (fewer than min_holders survivors hold them) are
        zeroed before anything is unmasked."""
        self._close(Kind.MASKED, Kind.UNMASK)
        self._refuse_below_threshold(len(self._u3), "devices sent masked inputs")
        holders = np.zeros(self.params.dim, np.int32)
        for i in self._u3:
            holders[supports.coordinates(*self._runs[i])] += 1
        self._holders = holders
        self._sum[holders < self.params.min_holders] = 0
        dropped = self._u2 - self._u3
        return {self._name(i): messages.encode_unmask_request(
                    self.session, i, len(self._u3), sorted(self.params.closed(i) & self._u3),
                    sorted(self.params.closed(i) & dropped))
                for i in sorted(self._u3)}

    # --- step 3: unmasking -------------------------------------------------------------------

    def receive_unmask(self, message: bytes) -> str:
        self._expect(Kind.UNMASK)
        parsed = messages.decode_unmask(message)
        sender = self._sender(parsed.session, parsed.sender, self._answers, "UNMASK", self._u3)
        closed = self.params.closed(sender)
        if (set(parsed.self_shares) != closed & self._u3
                or set(parsed.key_shares) != closed & (self._u2 - self._u3)):
            raise SecAggError(f"UNMASK from {self._name(sender)} answers for other devices than "
                              "it was asked about")
        self._answers[sender] = parsed
        return self._name(sender)

    def result(self) -> SecAggResult:
        """Closes step 3: rebuilds each survivor's self-mask seed and each dropped device's mask
        key from t shares, checks them against what the devices committed to, and removes their
        masks."""
        self._close(Kind.UNMASK, None)
        self._refuse_below_threshold(len(self._answers), "devices answered the unmasking request")
        total = self._sum
        for j in sorted(self._u3):
            seed = self._rebuild(j, "self_shares", "self-mask seed")
            if keylib.commitment(seed, self.session, j) != self._advertised[j].b_commit:
                raise SecAggError(f"the rebuilt self-mask seed of {self._name(j)} does not match its "
                                  "commitment")
            masks.apply(total, self._runs[j], keylib.self_mask_seed(seed, self.session, j), -1)
        for d in sorted(self._u2 - self._u3):
            self._remove_pair_masks(d, self._rebuild(d, "key_shares", "mask key"))
        total &= np.uint32(self.params.modulus_mask)
        released = self._holders >= self.params.min_holders
        total[~released] = 0
        self._sum = None  # the only copy leaves with the result
        return SecAggResult(total, self._holders, released, self.params.bits,
                            tuple(self._name(i) for i in sorted(self._u3)),
                            tuple(self._name(i) for i in sorted(self._u2 - self._u3)))

    def _remove_pair_masks(self, dropped: int, raw_key: bytes) -> None:
        private = keylib.private_from_bytes(raw_key)
        if keylib.public_bytes(private) != self._advertised[dropped].s_pk:
            raise SecAggError(f"the rebuilt mask key of {self._name(dropped)} does not match its "
                              "advertised key")
        for i in sorted(self.params.neighbours[dropped] & self._u3):
            seed = keylib.mask_seed(private, self._advertised[i].s_pk, self.session, i, dropped,
                                    f"mask key of {self._name(i)}")
            masks.apply(self._sum, self._common(i, dropped), seed, -masks.pair_sign(i, dropped))

    def _common(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """The global coordinates both hold, as runs in i's order (the order of i's mask stream)."""
        if self.params.support_digests[i] == self.params.support_digests[j]:
            return self._runs[i]
        _, starts, lengths = supports.common_runs(self._runs[i], self._runs[j])
        return starts, lengths

    def _rebuild(self, owner: int, field: str, what: str) -> bytes:
        shares = {holder + 1: getattr(answer, field)[owner] for holder, answer in self._answers.items()
                  if owner in getattr(answer, field)}
        if len(shares) < self.params.threshold:
            raise SecAggError(f"cannot rebuild the {what} of {self._name(owner)}: {len(shares)} of its "
                              f"neighbours answered, the threshold is {self.params.threshold}")
        return shamir.reconstruct(shares, self.params.threshold, f"{what} of {self._name(owner)}")

    # --- bookkeeping -------------------------------------------------------------------------

    def _keep_recoverable(self, members: set[int], what: str) -> set[int]:
        """Drops, until none is left to drop, every device with fewer than t of its closed
        neighbourhood in `members`; refuses when fewer than t remain."""
        members = set(members)
        while True:
            short = {i for i in members if len(self.params.closed(i) & members) < self.params.threshold}
            if not short:
                break
            members -= short
        self._refuse_below_threshold(len(members), f"devices {what} with enough neighbours")
        return members

    def _refuse_below_threshold(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            self._stage = None  # the round is over
            raise SecAggError(f"only {count} {what}, the threshold is {self.params.threshold} of "
                              f"{self.params.n}: refusing to unmask")

    def _sender(self, session: bytes, sender: int, seen, what: str, allowed: set[int] | None = None) -> int:
        if session != self.session:
            raise SecAggError(f"{what} belongs to another session")
        if sender >= self.params.n:
            raise SecAggError(f"{what} from device index {sender} of {self.params.n}")
        if allowed is not None and sender not in allowed:
            raise SecAggError(f"{what} from {self._name(sender)}, which dropped at an earlier step")
        if sender in seen:
            raise SecAggError(f"{what} from {self._name(sender)} twice")
        return sender

    def _name(self, index: int) -> str:
        return self.params.participants[index]

    def _expect(self, stage: Kind) -> None:
        if self._stage != stage:
            now = self._stage.name if self._stage else "finished"
            raise SecAggError(f"{stage.name} out of order: the server is at {now}")

    def _close(self, stage: Kind, following: Kind | None) -> None:
        self._expect(stage)
        self._stage = following
