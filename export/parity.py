"""Parity between an exported artifact and the torch model it came from.

Each precision has its own bar: fp32 must match torch to float rounding, fp16 to half-precision
rounding, int8 dynamic-range to what weight quantization costs. The bar is on the logits (an
absolute plus a relative term, relative to the largest torch logit) and on top-1 agreement over
real test inputs. When an artifact misses it, `localize` re-exports ever longer prefixes of the
network the same way to name the first layer whose output departs from torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .formats import ExportError


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_top1: float

    def bound(self, reference: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.abs(reference).max(initial=0.0))


TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-5, min_top1=0.998),
    "fp16": Tolerance(atol=1e-3, rtol=1e-2, min_top1=0.99),
    "int8": Tolerance(atol=5e-2, rtol=1e-1, min_top1=0.97),
}


@dataclass(frozen=True)
class ParityResult:
    max_abs_diff: float
    top1_agreement: float
    bound: float
    tolerance: Tolerance

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.bound and self.top1_agreement >= self.tolerance.min_top1

    def describe(self) -> str:
        return (f"max |logit difference| {self.max_abs_diff:.3g} (allowed {self.bound:.3g}), "
                f"top-1 agreement {self.top1_agreement:.4f} (required {self.tolerance.min_top1})")


def compare(got: np.ndarray, want: np.ndarray, tolerance: Tolerance) -> ParityResult:
    if got.shape != want.shape:
        raise ExportError(f"exported model returns shape {got.shape}, torch returns {want.shape}")
    diff = float(np.abs(got - want).max()) if np.isfinite(got).all() else float("inf")
    agreement = float((got.reshape(len(got), -1).argmax(1) == want.reshape(len(want), -1).argmax(1)).mean())
    return ParityResult(diff, agreement, tolerance.bound(want), tolerance)


def torch_outputs(model: torch.nn.Module, inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(inputs)).numpy()


def localize(layers: torch.nn.ModuleList, names: list[str], inputs: np.ndarray,
             run_exported: Callable[[torch.nn.Module, np.ndarray], np.ndarray],
             tolerance: Tolerance) -> str | None:
    """Name of the first layer whose prefix network, exported the same way, misses the bar."""
    for end in range(1, len(layers) + 1):
        prefix = torch.nn.Sequential(*layers[:end]).eval()
        want = torch_outputs(prefix, inputs)
        try:
            got = run_exported(prefix, inputs)
        except Exception as exc:  # a prefix that cannot even be exported names the layer too
            return f"{names[end - 1]} (export failed: {exc})"
        got, want = got.reshape(len(got), -1), want.reshape(len(want), -1)
        if got.shape != want.shape or not np.abs(got - want).max() <= tolerance.bound(want):
            return names[end - 1]
    return None
