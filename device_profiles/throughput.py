"""The compute test: training samples per second of a model, with plain SGD or with DP-SGD.

The caller hands over the model (for a profile, the reference model `REFERENCE_MODEL` as the
device trains it) and the optimiser settings, so this package needs only torch and Opacus, never
fedprune's own model code. The model is trained in place, and wrapped by Opacus when `dp` is
set: give each call a fresh one.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .catalogue import REFERENCE_BATCH_SIZE
from .profile import ProfilingError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["measure_throughput"]


def measure_throughput(model: nn.Module, input_shape: tuple[int, ...], num_classes: int,
                       seconds: float, dp: bool, *, lr: float, clip_norm: float | None,
                       batch_size: int = REFERENCE_BATCH_SIZE, seed: int = 0) -> float:
    """Training samples per second of `model` on inputs of `input_shape`, plain SGD or DP-SGD.

    The inputs are random tensors: this measures speed, not learning, and the cost of a step does
    not depend on the values. The run is calibrated by wall time rather than a step count so a
    slow device finishes as quickly as a fast one; one warm-up batch first keeps allocator and
    hook set-up out of the figure. DP goes through Opacus's ghost clipping with Poisson sampling,
    as the device trains, because that is the speed the planner must budget for; without DP the
    gradient norm is clipped at `clip_norm` (when set), as the device's plain SGD does.
    """
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    pool = batch_size * 10
    x = torch.randn(pool, *input_shape, generator=generator)
    y = torch.randint(0, num_classes, (pool,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion: nn.Module = nn.CrossEntropyLoss()

    if dp:
        from opacus import PrivacyEngine

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure-RNG advice; irrelevant to a speed test
            model, optimizer, criterion, loader = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
                noise_generator=generator)
        batches = _forever(loader)
    else:
        batches = _forever([(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, pool, batch_size)])

    def step(xb, yb) -> int:
        if len(xb) == 0:  # Poisson sampling can draw an empty batch
            return 0
        loss = criterion(model(xb), yb)
        loss.backward()
        if not dp and clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        optimizer.zero_grad()
        return len(xb)

    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook")
        step(*next(batches))
        samples = 0
        start = time.perf_counter()
        while True:
            samples += step(*next(batches))
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    if samples == 0:
        raise ProfilingError("the compute test trained no samples; try again without --quick")
    return samples / elapsed


def _forever(batches: Iterable) -> Iterator:
    while True:
        yield from batches
