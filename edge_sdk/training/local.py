"""Local training on a device, with or without DP-SGD.

DP uses Opacus in ghost-clipping mode ("fast gradient clipping"): on FedP3's CNN it is about ten
times faster than the default hooks mode and never materialises a batch x parameters tensor of
per-sample gradients (measured in docs/BENCHMARKS.md), which matters on memory-tight devices. Pruning masks stay
outside the model (Opacus rejects trainable layers with buffers); weights are re-masked after every
step because DP noise lands on pruned entries too.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..settings import DPSettings, TrainSettings

# The losses and optimizers a task's `train` settings can name (settings.py's LossName and
# OptimizerName list the same names): a name from the wire is only looked up here. Opacus wraps
# whichever is chosen: the DP optimizer clips and noises the gradients before the inner step.
LOSSES: dict[str, Callable[[TrainSettings], nn.Module]] = {
    "cross_entropy": lambda config: nn.CrossEntropyLoss(),
    "label_smoothing": lambda config: nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
}
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], TrainSettings], torch.optim.Optimizer]] = {
    "sgd": lambda params, config: torch.optim.SGD(params, lr=config.lr, momentum=config.momentum),
    "adam": lambda params, config: torch.optim.Adam(params, lr=config.lr),
}
# How many tensors the size of the trained parameters each optimizer adds to plain SGD's peak:
# what the memory planner adds to a plan's prediction, which is calibrated on plain SGD. SGD with
# momentum keeps one buffer; Adam keeps two moment estimates and its step makes up to three more
# of the same size (measured on LEAF's CNN, 6.5 M parameters: 81-129 MB over plain SGD, 3.1-5.0
# tensors; docs/BENCHMARKS.md section 13). A new optimizer declares its own here.
OPTIMIZER_STATE: dict[str, Callable[[float], int]] = {
    "sgd": lambda momentum: 1 if momentum else 0,
    "adam": lambda momentum: 5,
}


@dataclass
class TrainReport:
    steps: int = 0
    samples: int = 0
    mean_loss: float = float("nan")
    privacy_history: list[tuple[float, float, int]] = field(default_factory=list)

    def merged(self, later: TrainReport) -> TrainReport:
        """This report followed by a later phase's: steps and privacy add up."""
        if self.samples == 0:
            return later
        loss = later.mean_loss if later.samples else self.mean_loss
        return TrainReport(self.steps + later.steps, self.samples + later.samples, loss,
                           self.privacy_history + later.privacy_history)


def dp_sampling(num_samples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate, steps) exactly as Opacus's DPDataLoader will use them."""
    batches = max(1, math.ceil(num_samples / batch_size))
    return 1.0 / batches, batches * epochs


def train_locally(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainSettings,
                  masks: dict[str, torch.Tensor], seed: int, dp: DPSettings | None = None,
                  noise_multiplier: float | None = None, secret_noise: bool = False,
                  before_batch: Callable[[], None] | None = None,
                  after_epoch: Callable[[dict[str, torch.Tensor]], None] | None = None) -> TrainReport:
    """Train the parameters of `model` that require grad; masked entries stay exactly zero.

    `before_batch` runs before every batch (FjORD samples its width there); `after_epoch` may
    add or tighten masks between epochs (FedDP's threshold pruning); masks are re-applied.
    `secret_noise`: DP's noise and Poisson sampling are drawn from a generator seeded by the
    OS, not from `seed`, which the coordinator may know; a simulation leaves it off to be
    reproducible.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return TrainReport()
    named = dict(model.named_parameters())
    masked = [(named[name], mask) for name, mask in masks.items()]
    masks = dict(masks)
    optimizer = OPTIMIZERS[config.optimizer](params, config)
    generator = torch.Generator().manual_seed(seed)
    criterion: nn.Module = LOSSES[config.loss](config)
    engine = None
    if dp is None:
        loader = _ShuffledBatches(x, y, config.batch_size, generator)
    else:
        from opacus import PrivacyEngine

        dataset = torch.utils.data.TensorDataset(x, y)
        loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, collate_fn=_stack)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure-RNG advice; see docs/ARCHITECTURE.md
            engine = PrivacyEngine(accountant=dp.accountant)
            model, optimizer, criterion, loader = engine.make_private(
                module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                noise_multiplier=noise_multiplier, max_grad_norm=dp.max_grad_norm,
                grad_sample_mode="ghost",
                noise_generator=_os_seeded() if secret_noise else generator)
        if secret_noise:  # Opacus's Poisson sampler draws from torch's global generator
            torch.manual_seed(secrets.randbits(63))
    report = TrainReport()
    total_loss = 0.0
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook")
        for _ in range(config.local_epochs):
            for xb, yb in _physical(loader, optimizer, config, dp is not None):
                if len(xb) == 0:  # Poisson sampling can draw an empty batch
                    optimizer.zero_grad()
                    continue
                if before_batch is not None:
                    before_batch()
                loss = criterion(model(xb), yb)
                loss.backward()
                if dp is None and config.clip_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
                optimizer.step()
                optimizer.zero_grad()
                with torch.no_grad():
                    for param, mask in masked:
                        param.mul_(mask)
                report.steps += 1
                report.samples += len(xb)
                total_loss += float(loss.detach()) * len(xb)
            if after_epoch is not None:
                after_epoch(masks)
                masked = [(named[name], mask) for name, mask in masks.items()]
                with torch.no_grad():
                    for param, mask in masked:
                        param.mul_(mask)
    report.mean_loss = total_loss / max(report.samples, 1)
    if engine is not None:
        model.to_standard_module()  # remove Opacus's hooks: a later phase wraps the model again
        # Every logical Poisson batch is a step of the mechanism, empty or split into physical
        # chunks alike, so the charge is the loader's batch count per epoch: exact. The noise
        # is the one Opacus's optimizer added, read back from it, not the one it was asked for.
        report.privacy_history = [(float(optimizer.noise_multiplier), float(loader.sample_rate),
                                   len(loader) * config.local_epochs)]
    return report


def _os_seeded() -> torch.Generator:
    """A generator seeded with 63 bits from the OS. torch's generator is not a CSPRNG (Opacus's
    secure_mode needs torchcsprng, which has no build for this torch); what this protects
    against is a coordinator that knows the device's seed and index and could otherwise
    recompute, and subtract, the noise of every step."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def _physical(loader, optimizer, config: TrainSettings, private: bool):
    """Batches as the model sees them: under DP, split by Opacus's BatchMemoryManager."""
    limit = config.physical_batch_size
    if not private or limit is None or limit >= config.batch_size:
        yield from loader
        return
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=limit,
                            optimizer=optimizer) as chunks:
        yield from chunks


class _ShuffledBatches:
    """Index-sliced mini-batches: ~10x less overhead than a per-item DataLoader without DP."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.x[idx], self.y[idx]


def _stack(batch):
    xs, ys = zip(*batch)
    return torch.stack(xs), torch.stack(ys)


def chance_accuracy(labels) -> float:
    """Accuracy of always answering the most frequent of `labels`: the chance level of a test
    split, which a partition that gives a device few classes raises well above 1/classes."""
    labels = np.asarray(labels)
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else float("nan")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    if len(y) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
    return correct / len(y)
