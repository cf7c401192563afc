"""Parity between an exported artifact and the torch model it came from.

Each precision has its own bar: fp32 must match torch to float rounding, fp16 to half-precision
rounding, int8 dynamic-range to what weight quantization costs. The bar is on the logits (an
absolute plus a relative term, relative to the largest torch logit) and on top-1 agreement over
the real test inputs whose two best torch logits are further apart than twice that bound (the
agreement over all inputs is recorded too). When an artifact misses it, `localize` exports the
network cut at one of its layers (`structure(spec).layer_modules`, any architecture: the whole forward runs and that
layer's output is returned) the same way, and bisects over the layers for the one whose output
departs from torch while the layer before it still agrees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
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
    top1_agreement: float       # over every input: how often the device's answer is torch's
    bound: float
    tolerance: Tolerance
    decided_agreement: float = 1.0  # over the inputs torch decides by more than twice the bound
    decided: int = 0

    @property
    def ok(self) -> bool:
        """The bar is the logits', and top-1 agreement where the logits decide. An input whose
        two best torch logits lie within twice the bound is a near-tie: an artifact within the
        bound may answer it either way, so a weakly trained model's near-ties (common at int8)
        do not fail an export that is faithful to torch."""
        return (self.max_abs_diff <= self.bound
                and self.decided_agreement >= self.tolerance.min_top1)

    def describe(self) -> str:
        return (f"max |logit difference| {self.max_abs_diff:.3g} (allowed {self.bound:.3g}), "
                f"top-1 agreement {self.decided_agreement:.4f} on the {self.decided} inputs torch "
                f"decides by more than {2 * self.bound:.3g} (required {self.tolerance.min_top1}), "
                f"{self.top1_agreement:.4f} on all")


def compare(got: np.ndarray, want: np.ndarray, tolerance: Tolerance) -> ParityResult:
    if got.shape != want.shape:
        raise ExportError(f"exported model returns shape {got.shape}, torch returns {want.shape}")
    diff = float(np.abs(got - want).max()) if np.isfinite(got).all() else float("inf")
    got, want = got.reshape(len(got), -1), want.reshape(len(want), -1)
    same = got.argmax(1) == want.argmax(1)
    bound = tolerance.bound(want)
    if want.shape[1] > 1:
        best_two = np.sort(want, axis=1)[:, -2:]
        decided = best_two[:, 1] - best_two[:, 0] > 2 * bound
    else:
        decided = np.ones(len(want), dtype=bool)
    return ParityResult(diff, float(same.mean()), bound, tolerance,
                        float(same[decided].mean()) if decided.any() else 1.0, int(decided.sum()))


def torch_outputs(model: torch.nn.Module, inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(inputs)).numpy()


class _LayerOutput(torch.nn.Module):
    """`model` cut at one layer: its whole forward runs, the layer's (first) output is returned.

    A hook, not a prefix network, so any architecture can be cut (residual adds, branches, code
    in forward); the exporters drop the computation after the layer as unused."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.clear()
        self.model(x)
        return self.seen[0]


@contextmanager
def _cut_at(model: torch.nn.Module, layer: str):
    probe = _LayerOutput(model)
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, inputs, output: probe.seen.append(output.clone()))
    try:
        yield probe.eval()
    finally:
        handle.remove()


def _probed_layers(model: torch.nn.Module, layers: Sequence[str], inputs: np.ndarray) -> list[str]:
    """The layers whose output is one tensor with the batch's rows: those a cut can return."""
    outputs: dict[str, object] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, i, output, name=name: outputs.setdefault(name, output)) for name in layers]
    try:
        torch_outputs(model, inputs[:2])
    finally:
        for handle in handles:
            handle.remove()
    return [name for name in layers if isinstance(outputs.get(name), torch.Tensor)
            and outputs[name].dim() >= 1 and len(outputs[name]) == len(inputs[:2])]


def localize(model: torch.nn.Module, layers: Sequence[str], inputs: np.ndarray,
             run_exported: Callable[[torch.nn.Module, np.ndarray], np.ndarray],
             tolerance: Tolerance) -> str | None:
    """The layer (module name, from `layers` in forward order) whose output, exported the same
    way, is the first to miss the bar: it departs and the layer before it agrees. None when
    every layer agrees (the departure is after the last one, or only in top-1 agreement).

    Bisection: about log2(layers) exports, not one per layer; a converter is slow."""
    # The model's own parameters' layer ("") is the whole network, not a cut.
    candidates = _probed_layers(model.eval(), [name for name in layers if name], inputs)
    failures: dict[int, str] = {}

    def departs(index: int) -> bool:
        with _cut_at(model, candidates[index]) as probe:
            want = torch_outputs(probe, inputs)
            try:
                got = run_exported(probe, inputs)
            except Exception as exc:  # a cut that cannot even be exported names the layer too
                failures[index] = f" (export failed: {str(exc).splitlines()[0] if str(exc) else exc!r})"
                return True
        got, want = got.reshape(len(got), -1), want.reshape(len(want), -1)
        return got.shape != want.shape or not np.abs(got - want).max() <= tolerance.bound(want)

    agrees, departed = -1, len(candidates)  # the input agrees; past the last layer is unknown
    while departed - agrees > 1:
        middle = (agrees + departed) // 2
        if departs(middle):
            departed = middle
        else:
            agrees = middle
    if departed == len(candidates):
        return None
    return candidates[departed] + failures.get(departed, "")
