"""The discrete Gaussian N_Z(0, sigma^2), sampled exactly: Canonne, Kamath and Steinke's
algorithm ("The Discrete Gaussian for Differential Privacy", NeurIPS 2020, Algorithms 1-3),
vectorised over numpy arrays with integer arithmetic only.

Written here rather than installed: OpenDP 0.16's `make_gaussian` on integer vectors is the same
exact sampler, but its wheel is 47 MB (265 MB installed) for x86-64 and aarch64 glibc only, and
it drew 7M values in 75 s on this 2-core x86 machine (10.8 us a value; a device masks that many
in about a second); diffprivlib's `GaussianDiscrete` is parametrised by (epsilon, delta) rather
than sigma, draws one value per Python call in floating point, and pulls scikit-learn.

Exactness: sigma^2 is held as a fraction num/den (den a power of two, chosen so every product
below fits in 63 bits), every Bernoulli(p) is an exact uniform integer draw compared with p's
numerator, and the few squares that would overflow int64 are done with Python integers. The
randomness is `OsRandom` (os.urandom-keyed ChaCha20), never a seed anyone else knows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import SecAggError
from .randomness import OsRandom

MAX_SIGMA = 2**15   # per device, in integer units; 2 N D t^2 must stay below 2**62
_LIMIT = 2**62
_SQUARE_SAFE = 2**31  # |a| below this: a * a fits int64


@dataclass(frozen=True)
class DiscreteGaussian:
    """N_Z(0, num/den)."""
    num: int
    den: int

    @classmethod
    def with_sigma(cls, sigma: float) -> DiscreteGaussian:
        """sigma^2 as num/den with the largest power-of-two den (at most 2**40) that keeps the
        acceptance test's denominator 2 num den t^2 below 2**62 and its numerator's root
        |y| den t - num below 2**31 out to |y| = 24 sigma, so nearly every square is int64 (at
        sigma = 2**15 den is 1 and sigma^2 is rounded to an integer; below, closer)."""
        if not (math.isfinite(sigma) and 0 <= sigma <= MAX_SIGMA):
            raise SecAggError(f"discrete Gaussian sigma must lie in [0, {MAX_SIGMA}], got {sigma}")
        if sigma == 0:
            return cls(0, 1)
        t = math.floor(sigma) + 1
        den = 1
        while (den < 2**40 and 2 * (sigma**2 * 2 * den + 1) * (2 * den) * t * t < _LIMIT
               and 24 * (sigma + 1) * 2 * den * t < _SQUARE_SAFE):
            den *= 2
        return cls(max(1, round(sigma**2 * den)), den)

    @property
    def variance_parameter(self) -> float:
        """sigma^2 (the variance of N_Z(0, sigma^2) is below it by less than 1e-8 for sigma >= 1)."""
        return self.num / self.den

    def sample(self, count: int, rng: OsRandom | None = None) -> np.ndarray:
        """`count` independent draws as int64 (Algorithm 3: discrete Laplace proposals of scale
        t = floor(sigma) + 1, each kept with probability exp(-(|y| - sigma^2/t)^2 / (2 sigma^2)))."""
        rng = rng or OsRandom()
        if self.num == 0:
            return np.zeros(count, np.int64)
        n, d = self.num, self.den
        t = math.isqrt(n // d) + 1
        out = np.empty(count, np.int64)
        pending = np.arange(count)
        while pending.size:
            y = _discrete_laplace(t, pending.size, rng)
            kept = _bernoulli_exp_square(np.abs(y), d * t, n, 2 * n * d * t * t, rng)
            out[pending[kept]] = y[kept]
            pending = pending[~kept]
        return out


def _discrete_laplace(t: int, count: int, rng: OsRandom) -> np.ndarray:
    """Algorithm 2 with scale t (an integer): P(y) proportional to exp(-|y| / t)."""
    out = np.empty(count, np.int64)
    pending = np.arange(count)
    while pending.size:
        u = rng.below(t, pending.size)
        kept = _bernoulli_exp_fraction(u, t, rng)
        pending_kept, u = pending[kept], u[kept]  # the rest draw again: no work spent on them
        v = _geometric_exp1(u.size, rng)
        negative = rng.bits(u.size)
        valid = ~(negative & (u == 0) & (v == 0))
        z = u + t * v
        out[pending_kept[valid]] = np.where(negative, -z, z)[valid]
        pending = np.concatenate((pending[~kept], pending_kept[~valid]))
    return out


def _bernoulli_exp_square(magnitude: np.ndarray, scale: int, offset: int, denominator: int,
                          rng: OsRandom) -> np.ndarray:
    """Bernoulli(exp(-a^2 / denominator)) with a = magnitude * scale - offset, exactly: the
    integer part of the exponent as that many Bernoulli(exp(-1)) successes, the rest through
    Algorithm 1."""
    count = magnitude.size
    whole = np.empty(count, np.int64)
    rest = np.empty(count, np.int64)
    small = magnitude < (_SQUARE_SAFE + offset) // scale
    a = magnitude[small] * scale - offset
    square = a * a
    whole[small], rest[small] = square // denominator, square % denominator
    far = np.flatnonzero(~small)  # few: far in the tail, with Python integers
    if far.size:
        a = magnitude[far].astype(object) * scale - offset
        square = a * a
        whole[far] = np.minimum(square // denominator, _LIMIT).astype(np.int64)
        rest[far] = (square % denominator).astype(np.int64)
    return _bernoulli_exp_integer(whole, rng) & _bernoulli_exp_fraction(rest, denominator, rng)


def _bernoulli_exp_integer(exponent: np.ndarray, rng: OsRandom) -> np.ndarray:
    """Bernoulli(exp(-k)) for integers k >= 0: k independent Bernoulli(exp(-1)) all succeed."""
    result = np.ones(exponent.size, bool)
    active = np.flatnonzero(exponent > 0)
    done = 0
    while active.size:
        success = _bernoulli_exp_fraction(np.ones(active.size, np.int64), 1, rng)
        result[active[~success]] = False
        done += 1
        active = active[success]
        active = active[exponent[active] > done]
    return result


def _bernoulli_exp_fraction(numerator: np.ndarray, denominator: int, rng: OsRandom) -> np.ndarray:
    """Algorithm 1 for gamma = numerator / denominator in [0, 1]: draw A_k ~ Bernoulli(gamma / k)
    for k = 1, 2, ... until the first 0; the result is 1 when that k is odd. Bernoulli(gamma / k)
    is Bernoulli(gamma) and Bernoulli(1 / k), both exact integer draws."""
    count = numerator.size
    result = np.zeros(count, bool)
    active = np.arange(count)
    k = 1
    while active.size:
        a = rng.below(k, active.size) == 0 if k > 1 else np.ones(active.size, bool)
        if denominator > 1:
            a &= rng.below(denominator, active.size) < numerator[active]
        else:
            a &= numerator[active] >= 1
        stopped = active[~a]
        result[stopped] = k % 2 == 1
        active = active[a]
        k += 1
    return result


def _geometric_exp1(count: int, rng: OsRandom) -> np.ndarray:
    """How many Bernoulli(exp(-1)) successes come before the first failure."""
    v = np.zeros(count, np.int64)
    active = np.arange(count)
    while active.size:
        success = _bernoulli_exp_fraction(np.ones(active.size, np.int64), 1, rng)
        active = active[success]
        v[active] += 1
    return v
