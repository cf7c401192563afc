"""Secure aggregation (edge_sdk/secagg, docs/PROTOCOL.md "Secure aggregation"): real X25519,
ChaCha20 and AEAD from `cryptography`, real dp-accounting; a driver passes bytes between client
objects and a server object, as the MQTT wiring will."""

from __future__ import annotations

import dataclasses
import math
import random
import struct

import numpy as np
import pytest

from edge_sdk.secagg import (SecAggClient, SecAggError, SecAggServer, accounting, messages, shamir,
                             supports)
from edge_sdk.secagg import keys as keylib
from edge_sdk.secagg.discrete_gaussian import DiscreteGaussian
from edge_sdk.secagg.messages import Kind
from edge_sdk.secagg.params import default_degree
from edge_sdk.secagg.quantize import QuantizeSettings, decode, quantize


class Round:
    """One round driven step by step, keeping every message it relayed."""

    def __init__(self, supports, dim, **server_options):
        self.supports = {d: np.asarray(s) for d, s in supports.items()}
        self.server = SecAggServer(self.supports, dim, **server_options)
        self.clients = {d: SecAggClient(self.server.setup_message(d), d, s)
                        for d, s in self.supports.items()}
        self.sent: dict[tuple[Kind, str], bytes] = {}

    def advertise(self, gone=()):
        for d, c in self.clients.items():
            if d not in gone:
                self.server.receive_advertise(self._keep(Kind.ADVERTISE, d, c.advertise()))
        return self.server.keys_messages()

    def share(self, keys, gone=()):
        for d, m in keys.items():
            self.sent[Kind.KEYS, d] = m
            if d not in gone:
                self.server.receive_shares(self._keep(Kind.SHARES, d, self.clients[d].share_keys(m)))
        return self.server.forward_messages()

    def mask(self, forward, inputs, gone=()):
        for d, m in forward.items():
            self.sent[Kind.FORWARD, d] = m
            if d not in gone:
                message = self.clients[d].mask_input(m, inputs[d])
                self.server.receive_masked_input(self._keep(Kind.MASKED, d, message))
        return self.server.unmask_requests()

    def unmask(self, requests, gone=()):
        for d, m in requests.items():
            self.sent[Kind.UNMASK_REQUEST, d] = m
            if d not in gone:
                self.server.receive_unmask(self._keep(Kind.UNMASK, d, self.clients[d].unmask(m)))
        return self.server.result()

    def run(self, inputs, before_shares=(), before_masked=(), before_unmask=()):
        keys = self.advertise()
        forward = self.share(keys, gone=before_shares)
        requests = self.mask(forward, inputs, gone=before_masked)
        return self.unmask(requests, gone=before_unmask)

    def _keep(self, kind, device, message):
        self.sent[kind, device] = message
        return message


FULL = np.arange(4)


def test_three_devices_one_drops_after_its_masked_input_sum_is_exact():
    """Worked by hand: a + b + c = [111, 222, 333, 65539 mod 2**16 = 3]; c's masked input is in
    the sum, its self mask is rebuilt from a's and b's shares (t = 2 of 3)."""
    inputs = {"a": np.array([1, 2, 3, 65535]), "b": np.array([10, 20, 30, 3]),
              "c": np.array([100, 200, 300, 1])}
    r = Round({d: FULL for d in inputs}, 4, bits=16)
    assert (r.server.params.threshold, r.server.params.degree) == (2, 2)
    result = r.run(inputs, before_unmask={"c"})
    assert result.sum.tolist() == [111, 222, 333, 3]
    assert result.survivors == ("a", "b", "c") and result.dropped == ()
    assert result.holders.tolist() == [3, 3, 3, 3] and result.released.all()


def test_a_device_dropping_before_its_masked_input_is_left_out_and_its_masks_removed():
    """b shared its keys, so a and c masked with it; its mask key is rebuilt from a's and c's
    shares and those masks removed. a + c = [101, 202, 303, 404]."""
    inputs = {"a": np.array([1, 2, 3, 4]), "b": np.array([10, 20, 30, 40]),
              "c": np.array([100, 200, 300, 400])}
    result = Round({d: FULL for d in inputs}, 4).run(inputs, before_masked={"b"})
    assert result.sum.tolist() == [101, 202, 303, 404]
    assert result.survivors == ("a", "c") and result.dropped == ("b",)


def test_overlapping_supports_mask_each_pair_on_what_both_hold_and_withhold_below_min_holders():
    """dim 8: a holds 0-4, b 3-7, c 0-1 and 7. Coordinate 2 is held by a alone (withheld at
    min_holders 2), 5 and 6 by b alone (withheld); the rest by two or three."""
    supports = {"a": np.arange(0, 5), "b": np.arange(3, 8), "c": np.array([0, 1, 7])}
    inputs = {"a": np.array([1, 2, 3, 4, 5]), "b": np.array([10, 20, 30, 40, 50]),
              "c": np.array([100, 200, 300])}
    result = Round(supports, 8, min_holders=2).run(inputs)
    assert result.holders.tolist() == [2, 2, 1, 2, 2, 1, 1, 2]
    assert result.released.tolist() == [True, True, False, True, True, False, False, True]
    #                  0        1        2  3        4        5  6  7
    assert result.sum.tolist() == [101, 202, 0, 4 + 10, 5 + 20, 0, 0, 50 + 300]
    assert result.min_released_holders == 2


def test_overlapping_supports_with_a_dropout_withhold_what_the_survivors_hold_too_rarely():
    supports = {"a": np.arange(0, 5), "b": np.arange(3, 8), "c": np.array([0, 1, 7])}
    inputs = {"a": np.array([1, 2, 3, 4, 5]), "b": np.array([10, 20, 30, 40, 50]),
              "c": np.array([100, 200, 300])}
    result = Round(supports, 8, min_holders=2).run(inputs, before_masked={"b"})
    assert result.holders.tolist() == [2, 2, 1, 1, 1, 0, 0, 1]
    assert result.sum.tolist() == [101, 202, 0, 0, 0, 0, 0, 0]
    assert result.released.sum() == 2


def test_secagg_plus_graph_with_dropouts_at_every_step():
    """40 devices: the default degree is below n - 1, so SecAgg+'s sparse graph; devices drop
    before sharing, before masking and before unmasking; the sum is exact."""
    n, dim = 40, 64
    ids = [f"dev{i:02d}" for i in range(n)]
    rng = np.random.default_rng(7)
    supports = {d: np.sort(rng.choice(dim, size=int(rng.integers(20, 64)), replace=False)) for d in ids}
    inputs = {d: rng.integers(0, 2**32, size=supports[d].size, dtype=np.uint64) for d in ids}
    r = Round(supports, dim, min_holders=1)
    params = r.server.params
    assert params.degree == default_degree(n) < n - 1
    assert all(len(params.neighbours[i]) == params.degree for i in range(n))
    assert all(i in params.neighbours[j] for i in range(n) for j in params.neighbours[i])
    result = r.run(inputs, before_shares={"dev03"}, before_masked={"dev11", "dev27"},
                   before_unmask={"dev05", "dev30"})
    expected = np.zeros(dim, np.int64)
    summed = [d for d in ids if d not in {"dev03", "dev11", "dev27"}]
    for d in summed:
        expected[supports[d]] += inputs[d].astype(np.int64)
    assert np.array_equal(result.sum, (expected % 2**32).astype(np.uint32))
    assert result.survivors == tuple(summed) and result.dropped == ("dev11", "dev27")


def test_the_graph_is_the_same_for_everyone_and_changes_with_the_round_seed():
    supports = {f"d{i}": FULL for i in range(40)}
    one = SecAggServer(supports, 4, round_seed=b"\x01" * 32).params
    again = SecAggServer(supports, 4, round_seed=b"\x01" * 32).params
    other = SecAggServer(supports, 4, round_seed=b"\x02" * 32).params
    assert one.neighbours == again.neighbours != other.neighbours


def test_fewer_survivors_than_the_threshold_are_refused_with_the_counts():
    inputs = {d: np.array([1, 2, 3, 4]) for d in "abc"}
    r = Round({d: FULL for d in inputs}, 4)
    forward = r.share(r.advertise())
    with pytest.raises(SecAggError, match="only 1 devices sent masked inputs, the threshold is 2 of 3"):
        r.mask(forward, inputs, gone={"a", "b"})

    r = Round({d: FULL for d in inputs}, 4)
    requests = r.mask(r.share(r.advertise()), inputs)
    with pytest.raises(SecAggError, match="only 1 devices answered the unmasking request, the threshold is 2"):
        r.unmask(requests, gone={"a", "b"})

    with pytest.raises(SecAggError, match="only 0 devices advertised keys with enough neighbours"):
        Round({d: FULL for d in inputs}, 4, threshold=3).advertise(gone={"c"})


def test_a_client_refuses_to_help_unmask_below_the_threshold_or_to_reveal_both_secrets():
    inputs = {d: np.array([1, 2, 3, 4]) for d in "abc"}
    r = Round({d: FULL for d in inputs}, 4)
    requests = r.mask(r.share(r.advertise()), inputs)
    client, session = r.clients["a"], r.server.session
    for total, survivors, dropped, reason in [
            (1, [0], [1, 2], "1 survivors, the threshold is 2"),
            (3, [0, 1, 2], [1], "both survived and dropped"),
            (2, [1, 2], [0], "does not count this device"),
            (2, [0, 1], [], "exchanged shares with")]:
        forged = messages.encode_unmask_request(session, 0, total, survivors, dropped)
        with pytest.raises(SecAggError, match=reason):
            client.unmask(forged)
    client.unmask(requests["a"])
    with pytest.raises(SecAggError, match="round is over"):
        client.unmask(requests["a"])


def _structural(message: bytes, session: bool = True):
    """Truncations, one byte more, and flips in the prefix (magic, version, kind, flags) and in the
    session id: no receiver may accept any of them, nor fail with another exception."""
    chooser = random.Random(len(message))
    for cut in sorted({0, 1, 4, 7, 8, 39, len(message) - 1, *chooser.sample(range(len(message)), 8)}):
        yield f"truncated to {cut}", message[:cut]
    yield "one byte more", message + b"\x00"
    for position in (0, 3, 4, 5, 6, 7) + ((8, 39) if session else ()):
        yield f"byte {position} flipped", _flip(message, position)


def _anywhere(message: bytes):
    """Besides the structural mutations, single-byte flips all over the message."""
    yield from _structural(message)
    for position in random.Random(7).sample(range(len(message)), min(len(message), 40)):
        yield f"byte {position} flipped", _flip(message, position)


def _flip(message: bytes, position: int) -> bytes:
    flipped = bytearray(message)
    flipped[position] ^= 0x5A
    return bytes(flipped)


def _refused(receive, mutations, who: str) -> None:
    for what, bad in mutations:
        try:
            receive(bad)
        except SecAggError:
            continue
        raise AssertionError(f"{who}: a message {what} was accepted")


def test_malformed_truncated_and_tampered_messages_are_refused_with_secagg_error():
    """Every message of a round, as each receiver gets it, cut, padded and flipped: the receiver
    raises SecAggError (never another exception) and then accepts the genuine message. FORWARD
    and UNMASK_REQUEST are refused whatever byte is flipped (sealed shares authenticate, the
    request is checked against what the device exchanged); a flipped key, sealed share or masked
    value elsewhere parses and is caught by the cryptography
    (test_tampering_the_server_cannot_detect_is_caught_by_the_cryptography)."""
    inputs = {"a": np.array([1, 2, 3, 4]), "b": np.array([10, 20, 30, 40]),
              "c": np.array([100, 200, 300, 400])}
    supports = {d: FULL for d in inputs}
    server = SecAggServer(supports, 4)
    clients = {}
    for d in inputs:
        setup = server.setup_message(d)
        _refused(lambda bad, d=d: SecAggClient(bad, d, FULL), _structural(setup, session=False), d)
        clients[d] = SecAggClient(setup, d, FULL)
    for d, c in clients.items():
        genuine = c.advertise()
        _refused(server.receive_advertise, _structural(genuine), "server")
        server.receive_advertise(genuine)
    for d, m in server.keys_messages().items():
        _refused(clients[d].share_keys, _structural(m), d)
        shares = clients[d].share_keys(m)
        _refused(server.receive_shares, _structural(shares), "server")
        server.receive_shares(shares)
    for d, m in server.forward_messages().items():
        _refused(lambda bad, d=d: clients[d].mask_input(bad, inputs[d]), _anywhere(m), d)
        masked = clients[d].mask_input(m, inputs[d])
        _refused(server.receive_masked_input, _structural(masked), "server")
        server.receive_masked_input(masked)
    for d, m in server.unmask_requests().items():
        _refused(clients[d].unmask, _anywhere(m), d)
        answer = clients[d].unmask(m)
        _refused(server.receive_unmask, _structural(answer), "server")
        server.receive_unmask(answer)
    assert server.result().sum.tolist() == [111, 222, 333, 444]


def test_tampering_the_server_cannot_detect_is_caught_by_the_cryptography():
    inputs = {"a": np.array([1, 2, 3, 4]), "b": np.array([10, 20, 30, 40]),
              "c": np.array([100, 200, 300, 400])}

    # a sealed share altered in transit: the recipient's AEAD refuses it
    r = Round({d: FULL for d in inputs}, 4)
    forward = r.share(r.advertise())
    bad = bytearray(forward["a"])
    bad[-5] ^= 1
    with pytest.raises(SecAggError, match="do not authenticate"):
        r.clients["a"].mask_input(bytes(bad), inputs["a"])

    # a neighbour's key swapped in KEYS: the shares sealed to it do not open at that neighbour
    r = Round({d: FULL for d in inputs}, 4)
    keys = r.advertise()
    parsed = messages.decode_keys(keys["a"])
    swapped = dict(parsed.entries)
    swapped[1] = dataclasses.replace(swapped[1], c_pk=swapped[2].c_pk)
    with pytest.raises(SecAggError, match="repeats a public key"):
        r.clients["a"].share_keys(messages.encode_keys(parsed.session, 0, swapped))
    # a's own keys not echoed unchanged
    changed = dict(parsed.entries)
    changed[0] = dataclasses.replace(changed[0], s_pk=bytes(32))
    with pytest.raises(SecAggError, match="does not echo"):
        r.clients["a"].share_keys(messages.encode_keys(parsed.session, 0, changed))
    # a low-order point (all zero) as a neighbour's key
    low = dict(parsed.entries)
    low[1] = dataclasses.replace(low[1], c_pk=bytes(32))
    with pytest.raises(SecAggError, match="low-order|not a usable"):
        r.clients["a"].share_keys(messages.encode_keys(parsed.session, 0, low))

    # a share altered in UNMASK: with three answers for t = 2, the extra one exposes it
    r = Round({d: FULL for d in inputs}, 4)
    requests = r.mask(r.share(r.advertise()), inputs)
    for d, m in requests.items():
        answer = r.clients[d].unmask(m)
        if d == "b":
            parsed = messages.decode_unmask(answer)
            shares = dict(parsed.self_shares)
            shares[0] = (shares[0] + 1) % shamir.PRIME
            answer = messages.encode_unmask(parsed.session, parsed.sender, shares, parsed.key_shares)
        r.server.receive_unmask(answer)
    with pytest.raises(SecAggError, match="disagrees|commitment"):
        r.server.result()


def test_messages_from_the_wrong_step_session_or_sender_are_refused():
    inputs = {d: np.array([1, 2, 3, 4]) for d in "abc"}
    r = Round({d: FULL for d in inputs}, 4)
    advert = r.clients["a"].advertise()
    r.server.receive_advertise(advert)
    with pytest.raises(SecAggError, match="twice"):
        r.server.receive_advertise(advert)
    with pytest.raises(SecAggError, match="ADVERTISE expected, got SHARES"):
        r.server.receive_advertise(messages.encode_sealed(Kind.SHARES, r.server.session, 0, {}))
    with pytest.raises(SecAggError, match="out of order"):
        r.server.receive_masked_input(advert)
    low_order = messages.encode_advertise(r.server.session, 1, keylib.PublicKeys(
        bytes(32), keylib.public_bytes(keylib.new_private_key()), bytes(32)))
    with pytest.raises(SecAggError, match="low-order|not a usable"):
        r.server.receive_advertise(low_order)
    other = Round({d: FULL for d in inputs}, 4)
    with pytest.raises(SecAggError, match="another session"):
        r.server.receive_advertise(other.clients["b"].advertise())
    with pytest.raises(SecAggError, match="a message is bytes"):
        r.server.receive_advertise("FPSA")
    with pytest.raises(SecAggError, match="not a secure-aggregation message"):
        r.server.receive_advertise(b"\x00" * 80)


def test_a_device_refuses_a_setup_that_does_not_match_its_own_support():
    server = SecAggServer({"a": FULL, "b": FULL, "c": np.arange(2)}, 4)
    with pytest.raises(SecAggError, match="other than its own"):
        SecAggClient(server.setup_message("c"), "c", np.arange(3))
    with pytest.raises(SecAggError, match="addressed to 'a', not 'b'"):
        SecAggClient(server.setup_message("a"), "b", FULL)


def test_the_servers_state_never_holds_an_individual_input():
    """Inputs drawn at random over full and partial supports; at every step, every array anywhere
    in the server's state (and its running sum on each device's support) differs from every
    device's input."""
    rng = np.random.default_rng(3)
    dim = 32
    supports = {"a": np.arange(32), "b": np.arange(8, 32), "c": np.arange(0, 24), "d": np.arange(32)}
    inputs = {d: rng.integers(1, 2**32, size=s.size, dtype=np.uint64).astype(np.uint32)
              for d, s in supports.items()}
    r = Round(supports, dim, min_holders=2)

    def check():
        for array in _arrays(vars(r.server)):
            for d, x in inputs.items():
                assert not (array.shape == x.shape and np.array_equal(array, x)), d
                if array.shape == (dim,):
                    assert not np.array_equal(array[supports[d]], x), d

    requests = r.mask(r.share(r.advertise()), inputs, gone={"d"})
    check()
    for d, m in requests.items():
        r.server.receive_unmask(r.clients[d].unmask(m))
        check()
    result = r.server.result()
    check()
    expected = np.zeros(dim, np.uint64)
    for d in "abc":
        expected[supports[d]] += inputs[d]
    assert np.array_equal(result.sum, (expected % 2**32).astype(np.uint32))


def _arrays(value, seen=None):
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _arrays(v, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _arrays(v, seen)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield from _arrays(vars(value), seen)


# --- Shamir ------------------------------------------------------------------------------------

def _probably_prime(n: int) -> bool:
    if n % 2 == 0:
        return n == 2
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71]:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_the_field_is_the_smallest_prime_above_2_to_the_256():
    assert shamir.PRIME == 2**256 + 297 and _probably_prime(shamir.PRIME)
    assert not any(_probably_prime(2**256 + k) for k in range(1, 297, 2))


def test_shamir_any_t_shares_reconstruct_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    for subset in ([1, 2, 3], [2, 4, 5], [1, 3, 5, 4]):
        assert shamir.reconstruct({x: shares[x] for x in subset}, 3, "test") == secret
    with pytest.raises(SecAggError, match="2 shares, 3 needed"):
        shamir.reconstruct({1: shares[1], 2: shares[2]}, 3, "test")
    with pytest.raises(SecAggError, match="disagrees"):
        shamir.reconstruct({**shares, 5: shares[5] ^ 1}, 3, "test")
    with pytest.raises(SecAggError, match="not a share"):
        shamir.share_value((shamir.PRIME).to_bytes(33, "big"), "test")


# --- the distributed discrete Gaussian --------------------------------------------------------

def test_discrete_gaussian_variance_and_shape_on_200k_draws():
    for sigma in (4.0, 120.5):
        g = DiscreteGaussian.with_sigma(sigma)
        draws = g.sample(200_000)
        assert abs(draws.var() / sigma**2 - 1) < 0.03, (sigma, draws.var())
        assert abs(draws.mean()) < 4 * sigma / math.sqrt(200_000)
    # the probability of 0 at sigma 4: 1 / sum_k exp(-k^2 / 32)
    draws = DiscreteGaussian.with_sigma(4.0).sample(200_000)
    p0 = 1 / sum(math.exp(-k * k / 32) for k in range(-60, 61))
    assert abs((draws == 0).mean() - p0) < 4 * math.sqrt(p0 * (1 - p0) / 200_000)


def test_quantize_secure_sum_and_decode_stay_within_the_rounding_and_noise_error():
    n, d = 5, 200
    rng = np.random.default_rng(11)
    updates = {f"dev{i}": rng.normal(size=d) * (0.5 + i) for i in range(n)}
    clipped_sum = sum(u * min(1.0, 2.0 / np.linalg.norm(u)) for u in updates.values())
    for sigma in (0.0, 30.0):
        settings = QuantizeSettings(clip=2.0, scale=2.0**12, bits=24, noise_sigma=sigma)
        settings.check_range(n)
        values = {k: quantize(u, settings) for k, u in updates.items()}
        result = Round({k: np.arange(d) for k in updates}, d, bits=24).run(values)
        error = np.abs(decode(result.sum, settings) - clipped_sum)
        rounding = n / settings.scale  # each device's rounding moves a coordinate by < 1 unit
        assert error.max() <= rounding + 6 * math.sqrt(n) * sigma / settings.scale, (sigma, error.max())
        if sigma:
            spread = np.std(decode(result.sum, settings) - clipped_sum) * settings.scale
            assert 0.7 < spread / (math.sqrt(n) * sigma) < 1.3
    with pytest.raises(SecAggError, match="past 2\\*\\*23"):
        QuantizeSettings(clip=2.0, scale=2.0**22, bits=24).check_range(n)
    with pytest.raises(SecAggError, match="non-finite"):
        quantize(np.array([1.0, np.nan]), QuantizeSettings(clip=1.0, scale=8.0))


def test_accounting_matches_dp_accounting_run_directly():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    settings = QuantizeSettings(clip=1.0, scale=2.0**10, bits=32, noise_sigma=400.0)
    dim, devices, rounds, q, delta = 50_000, 80, 40, 0.2, 1e-5
    c = settings.clip * settings.scale
    sensitivity = min(math.sqrt(c * c + dim / 4 + 1.0 * (c + math.sqrt(dim) / 2)), c + math.sqrt(dim))
    z = math.sqrt(devices) * settings.noise_sigma / sensitivity  # tau vanishes at sigma 400
    direct = RdpAccountant()
    direct.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds))
    expected = direct.get_epsilon(delta)
    got = accounting.epsilon(settings, dim, devices, rounds, q, delta)
    assert abs(got / expected - 1) < 0.01, (got, expected)

    sigma = accounting.noise_for_epsilon(2.0, settings, dim, devices, rounds, q, delta)
    spent = accounting.epsilon(dataclasses.replace(settings, noise_sigma=sigma), dim, devices,
                               rounds, q, delta)
    assert 1.98 <= spent <= 2.0
    # tau: two shares of sigma 0.5 are far from one discrete Gaussian, and the bound pays for it
    small = dataclasses.replace(settings, noise_sigma=0.5)
    tau = 10 * math.exp(-2 * math.pi**2 * 0.25 * 1 / 2)  # n = 2: k = 1 alone
    bound = sensitivity / (math.sqrt(2) * 0.5) + math.sqrt(dim) * tau
    assert accounting.effective_noise_multiplier(small, dim, 2) == pytest.approx(1 / bound, rel=1e-9)
    assert math.sqrt(dim) * tau > 0.1 * sensitivity / (math.sqrt(2) * 0.5)


def test_masked_messages_take_bits_over_8_bits_per_value_only_as_needed():
    inputs = {d: np.array([1, 2, 3, 4]) for d in "abc"}
    r = Round({d: FULL for d in inputs}, 4, bits=16)
    r.run(inputs)
    masked = r.sent[Kind.MASKED, "a"]
    assert len(masked) == 8 + 32 + struct.calcsize(">HBI") + 4 * 2


def test_run_by_run_intersection_agrees_with_the_array_intersection():
    rng = np.random.default_rng(5)
    for _ in range(200):
        dim = int(rng.integers(1, 200))
        a = np.flatnonzero(rng.random(dim) < rng.random())
        b = np.flatnonzero(rng.random(dim) < rng.random())
        own, other = supports.to_ranges(a), supports.to_ranges(b)
        for positions, starts, lengths in (supports.common_runs(own, other),
                                           supports._common_pieces_by_array(own, other)):
            common = np.intersect1d(a, b)
            assert np.array_equal(supports.from_ranges(starts, lengths), common)
            assert np.array_equal(a[supports.from_ranges(positions, lengths)], common)


def test_protocol_md_lists_the_message_kinds_the_code_speaks():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md").read_text()
    section = text[text.index("\n## Secure aggregation\n"):]
    rows = [line.split("|")[1:3] for line in section.splitlines()
            if line.startswith("| `") and line.split("|")[2].strip().isupper()]
    assert {int(code.strip(" `")): name.strip() for code, name in rows} == {k.value: k.name for k in Kind}
    assert 'b"FPSA"' in section and messages.MAGIC == b"FPSA"
    assert "2**256 + 297" in section and messages.SEALED_BYTES == 98


def test_the_default_threshold_table_in_protocol_md_is_the_codes():
    from pathlib import Path

    from edge_sdk.secagg.params import default_threshold

    text = (Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md").read_text()
    section = text[text.index("| devices n | default degree k |"):].split("\n\n")[0]
    for line in section.splitlines()[2:]:
        n, k, t, survives = (cell.split()[0] for cell in line.strip("|").split("|"))
        assert default_degree(int(n)) == int(k) and default_threshold(int(k) + 1) == int(t)
        assert int(k) + 1 - int(t) == int(survives)
