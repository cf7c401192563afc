"""Shamir secret sharing over the prime field GF(2**256 + 297), written here because the shares
are our protocol's bytes.

A secret is 32 bytes (a self-mask seed or an X25519 private key) read as an integer below 2**256,
so one field element holds it: 2**256 + 297 is the smallest prime above 2**256
(tests/test_secagg.py checks it). Shares of a polynomial of degree t - 1 at x = 1..n: any t
reconstruct the secret, t - 1 reveal nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from .errors import SecAggError

PRIME = 2**256 + 297
SECRET_BYTES = 32
SHARE_BYTES = 33  # a field element, big-endian


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares of `secret` at each x in `xs` (distinct, 1 <= x < PRIME); any `threshold` of them
    reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a shared secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} needs 1..{len(xs)} shares")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME)
                                                      for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in xs}


def reconstruct(shares: Mapping[int, int], threshold: int, what: str) -> bytes:
    """The secret from at least `threshold` shares. Every share beyond the first `threshold` must
    lie on their polynomial, so a tampered or mixed-up share is refused (SecAggError naming
    `what`) rather than silently giving a wrong secret."""
    if len(shares) < threshold:
        raise SecAggError(f"{what}: {len(shares)} shares, {threshold} needed to reconstruct")
    points = sorted(shares.items())
    basis, rest = points[:threshold], points[threshold:]
    for x, y in rest:
        if _interpolate(basis, x) != y:
            raise SecAggError(f"{what}: the share at x={x} disagrees with the others "
                              "(tampered, or shares of different secrets)")
    value = _interpolate(basis, 0)
    if value >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError(f"{what}: the shares do not reconstruct a {SECRET_BYTES}-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")


def share_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def share_value(data: bytes, what: str) -> int:
    """A share from its bytes; a value outside the field is refused."""
    value = int.from_bytes(data, "big")
    if len(data) != SHARE_BYTES or value >= PRIME:
        raise SecAggError(f"{what}: not a share (a field element below 2**256 + 297 in "
                          f"{SHARE_BYTES} bytes)")
    return value


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for c in reversed(coefficients):
        result = (result * x + c) % PRIME
    return result


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """Lagrange interpolation through `points`, evaluated at `at`."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (at - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        total = (total + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total
