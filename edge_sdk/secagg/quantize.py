"""A float update to integers mod 2**bits and back: the device's half of the distributed discrete
Gaussian (Kairouz, Liu and Steinke, ICML 2021) and the server's decoding of the sum.

Device: clip to L2 norm `clip`, multiply by `scale` (gamma), round each coordinate up or down at
random (conditionally: redrawn until the rounded vector's norm is within `sensitivity(dim)`, so
the privacy analysis can use that bound), add discrete Gaussian noise of parameter
`noise_sigma` (each device's share: the sum's sigma / sqrt(expected devices)), wrap mod 2**bits.
Server: centre the unmasked sum into (-2**(bits-1), 2**(bits-1)] and divide by gamma.

No random rotation: without it a coordinate may carry the whole clipped norm, so `check_range`
bounds a coordinate's sum by n (gamma C + 1) plus the noise's tail and refuses parameters that
could wrap. Rounding and noise draw from `OsRandom`, never from a seed the coordinator knows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .discrete_gaussian import DiscreteGaussian
from .errors import SecAggError
from .params import MAX_BITS, MIN_BITS
from .randomness import OsRandom

DEFAULT_BETA = math.exp(-0.5)  # Kairouz et al.'s choice: sqrt(2 ln(1/beta)) = 1
MAX_ROUNDING_TRIES = 1000


@dataclass(frozen=True)
class QuantizeSettings:
    clip: float               # C: L2 bound of the float update
    scale: float              # gamma: integer units per unit of the update
    bits: int = 32            # the modulus 2**bits of secure aggregation
    noise_sigma: float = 0.0  # each device's discrete Gaussian sigma, in integer units
    beta: float = DEFAULT_BETA

    def __post_init__(self) -> None:
        for name in ("clip", "scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SecAggError(f"{name} must be finite and positive, got {value}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise SecAggError(f"bits must lie in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        if not 0 < self.beta < 1:
            raise SecAggError(f"beta must lie in (0, 1), got {self.beta}")
        DiscreteGaussian.with_sigma(self.noise_sigma)  # refuses an unusable sigma now

    def sensitivity(self, dim: int) -> float:
        """The L2 norm bound after conditional randomized rounding, in integer units (Kairouz et
        al., Theorem 1 / Proposition 22): min(sqrt((gC)^2 + d/4 + sqrt(2 ln(1/beta)) (gC +
        sqrt(d)/2)), gC + sqrt(d))."""
        c = self.clip * self.scale
        rounded = c * c + dim / 4 + math.sqrt(2 * math.log(1 / self.beta)) * (c + math.sqrt(dim) / 2)
        return min(math.sqrt(rounded), c + math.sqrt(dim))

    def check_range(self, devices: int, tails: float = 8.0) -> None:
        """Refuses settings whose sum over `devices` could leave (-2**(bits-1), 2**(bits-1)): a
        coordinate's worst case is n (gamma C + 1), plus `tails` standard deviations of the summed
        noise."""
        bound = devices * (self.clip * self.scale + 1) + tails * math.sqrt(devices) * self.noise_sigma
        if bound >= 2 ** (self.bits - 1):
            raise SecAggError(f"a coordinate's sum over {devices} devices may reach {bound:.3g}, "
                              f"past 2**{self.bits - 1}: lower scale or raise bits")


def quantize(update, settings: QuantizeSettings, rng: OsRandom | None = None) -> np.ndarray:
    """The device's values for `SecAggClient.mask_input`: uint32 in [0, 2**bits)."""
    rng = rng or OsRandom()
    x = np.asarray(update, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise SecAggError("the update has non-finite values")
    norm = float(np.linalg.norm(x))
    if norm > settings.clip:
        x = x * (settings.clip / norm)
    rounded = _rounded(x * settings.scale, settings.sensitivity(x.size), rng)
    noisy = rounded + DiscreteGaussian.with_sigma(settings.noise_sigma).sample(x.size, rng)
    return (noisy & ((1 << settings.bits) - 1)).astype(np.uint32)


def _rounded(scaled: np.ndarray, bound: float, rng: OsRandom) -> np.ndarray:
    """Unbiased randomized rounding, redrawn until the norm is within `bound`."""
    floor = np.floor(scaled)
    fraction = scaled - floor
    base = floor.astype(np.int64)
    for _ in range(MAX_ROUNDING_TRIES):
        candidate = base + (rng.unit(scaled.size) < fraction)
        if float(np.linalg.norm(candidate.astype(np.float64))) <= bound:
            return candidate
    raise SecAggError(f"randomized rounding exceeded the norm bound {bound:.6g} "
                      f"{MAX_ROUNDING_TRIES} times")


def decode(summed, settings: QuantizeSettings) -> np.ndarray:
    """The float sum from the unmasked integers mod 2**bits (SecAggResult.sum)."""
    values = np.asarray(summed).astype(np.int64) & ((1 << settings.bits) - 1)
    half = 1 << (settings.bits - 1)
    centred = np.where(values >= half, values - (1 << settings.bits), values)
    return centred / settings.scale
