"""Privacy of the distributed discrete Gaussian over rounds, with dp-accounting.

The approximation, exactly:
1. Sensitivity: one device's rounded vector has L2 norm at most Delta = `settings.sensitivity(d)`
   (conditional randomized rounding, Kairouz et al. ICML 2021, Theorem 1), d its coordinates.
2. One round: the sum of `devices` independent N_Z(0, sigma^2) per coordinate is not itself a
   discrete Gaussian; Kairouz et al.'s Proposition 14 (third term) bounds the round's Renyi
   divergence of every order alpha by alpha/2 * (Delta / (sqrt(n) sigma) + sqrt(d) tau)^2, with
   tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)). That is the RDP curve of a Gaussian
   mechanism of noise multiplier z = 1 / (Delta / (sqrt(n) sigma) + sqrt(d) tau)
   (`effective_noise_multiplier`), which is what dp-accounting is given.
3. Rounds: R rounds of `PoissonSampledDpEvent(q, GaussianDpEvent(z))` in dp-accounting's
   `RdpAccountant`. For q = 1 steps 1-3 are a proof. For q < 1 they are an approximation: the
   amplification by sampling proven for the continuous Gaussian is applied to a mechanism known
   only to have the same unsampled RDP curve (Kairouz et al. used Zhu and Wang's generic sampled
   RDP bound instead, which is looser).
`devices` is the number of noise shares behind the least-held released coordinate
(`SecAggResult.min_released_holders`), not the number selected: a device that drops before its
masked input adds no noise. dp-accounting is imported when a function is called, so a device
imports this package without it.
"""

from __future__ import annotations

import math

from .errors import SecAggError
from .quantize import QuantizeSettings


def tau(local_sigma: float, devices: int) -> float:
    """Kairouz et al.'s distance between a sum of discrete Gaussians and one discrete Gaussian."""
    return 10 * sum(math.exp(-2 * math.pi**2 * local_sigma**2 * k / (k + 1)) for k in range(1, devices))


def effective_noise_multiplier(settings: QuantizeSettings, dim: int, devices: int) -> float:
    """The continuous Gaussian noise multiplier whose RDP bounds one round's (step 2 above)."""
    if devices < 1 or dim < 1:
        raise SecAggError(f"accounting needs devices >= 1 and dim >= 1, got {devices}, {dim}")
    if settings.noise_sigma <= 0:
        return 0.0
    if settings.noise_sigma < 0.5:
        raise SecAggError(f"Kairouz et al.'s bound needs each device's sigma >= 1/2, got "
                          f"{settings.noise_sigma}")
    ratio = settings.sensitivity(dim) / (math.sqrt(devices) * settings.noise_sigma)
    return 1.0 / (ratio + math.sqrt(dim) * tau(settings.noise_sigma, devices))


def gaussian_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """epsilon at `delta` of `rounds` Poisson-sampled Gaussian rounds (dp-accounting's RDP)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    _check(sampling_rate, rounds, delta)
    if noise_multiplier <= 0:
        return math.inf
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        rounds))
    return float(accountant.get_epsilon(delta))


def epsilon(settings: QuantizeSettings, dim: int, devices: int, rounds: int, sampling_rate: float,
            delta: float) -> float:
    """epsilon after `rounds` rounds in each of which a device is drawn with probability
    `sampling_rate`, `devices` noise shares summed."""
    return gaussian_epsilon(effective_noise_multiplier(settings, dim, devices), sampling_rate,
                            rounds, delta)


def noise_for_epsilon(target_epsilon: float, settings: QuantizeSettings, dim: int, devices: int,
                      rounds: int, sampling_rate: float, delta: float) -> float:
    """The least per-device sigma (integer units) for which `epsilon` is at most the target,
    with `settings`' clip, scale and bits (its own noise_sigma is ignored)."""
    from dataclasses import replace

    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    _check(sampling_rate, rounds, delta)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise SecAggError(f"target epsilon must be finite and positive, got {target_epsilon}")

    def event(sigma: float):
        z = effective_noise_multiplier(replace(settings, noise_sigma=sigma), dim, devices)
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(z)), rounds)

    from .discrete_gaussian import MAX_SIGMA
    upper = float(MAX_SIGMA)
    if gaussian_epsilon(effective_noise_multiplier(replace(settings, noise_sigma=upper), dim, devices),
                        sampling_rate, rounds, delta) > target_epsilon:
        raise SecAggError(f"epsilon {target_epsilon} needs a sigma above {MAX_SIGMA}: lower the scale")
    sigma = float(dp_accounting.calibrate_dp_mechanism(
        RdpAccountant, event, target_epsilon, delta,
        dp_accounting.ExplicitBracketInterval(1.0, upper), tol=1e-6))
    while epsilon(replace(settings, noise_sigma=sigma), dim, devices, rounds, sampling_rate, delta) > target_epsilon:
        sigma *= 1 + 1e-6  # the search's tolerance may leave it a hair short
    return sigma


def _check(sampling_rate: float, rounds: int, delta: float) -> None:
    if not 0 < sampling_rate <= 1:
        raise SecAggError(f"sampling rate must lie in (0, 1], got {sampling_rate}")
    if rounds < 1:
        raise SecAggError(f"rounds must be at least 1, got {rounds}")
    if not 0 < delta < 1:
        raise SecAggError(f"delta must lie in (0, 1), got {delta}")
