"""Predicted peak resident memory of one local DP-SGD epoch of a submodel.

    batch terms = activation_factor x saved activation bytes per sample x physical batch
                + per_sample_gradient_factor x 4 B x per-sample gradient elements x physical batch
    peak = baseline
         + max( bytes_per_parameter x parameters + retained_fraction x batch terms,  (update phase)
                backward_bytes_per_parameter x parameters + batch terms )       (backward phase)
         + 4 bytes x input elements x local samples                         (the local data)
         [+ 4 bytes x parameters x physical batch   only in Opacus "hooks" mode]

The peak is the larger of two moments, not their sum: during the backward pass the activations
and per-sample gradients are alive; during the DP optimizer step they are gone but every
parameter has its weight, gradient, summed clipped gradient, noise and the allocator's freed but
not returned blocks, and the allocator still holds `retained_fraction` of the backward pass's
freed blocks. A wide fc layer (LEAF's CNN, 6.4 M parameters in one tensor) peaks at the
step whatever the batch; a conv network (ResNet-18) peaks in the backward pass and grows with it.

- baseline: the interpreter with torch, Opacus and the dataset loader imported and run;
- bytes_per_parameter: everything per parameter at the optimizer step;
- backward_bytes_per_parameter: what per parameter is alive during the backward pass;
- saved activation bytes: what autograd keeps for the backward pass of one sample, measured on
  the real network with `saved_tensors_hooks` (every conv input, normalisation output, ReLU output,
  max-pool index, ..., parameters excluded, each storage counted once); `activation_factor` is
  how many times that is alive at the peak (ghost clipping runs the backward twice on the same
  graph, plus the gradients flowing through it and Opacus's unfolded conv inputs);
- per-sample gradient elements: Opacus's ghost clipping computes per-sample gradient norms
  without per-sample gradients only for Linear layers; a Conv2d or GroupNorm layer still gets a
  batch x its parameters per-sample gradient, one layer at a time. So the transient is the
  largest such layer's parameter count per sample: 1,200 on FedP3's CNN, 2.36 M (0.45 GB at
  batch 48) for ResNet-18's last 3x3 conv.

The prediction is an upper bound, not a central estimate: peaks of the same plan vary from one
fresh process to the next (by up to 17%), and a plan predicted at exactly its limit must not
overrun it half the time. So the formula above is fitted to each calibration point's median peak,
and the prediction adds `margin_bytes + margin_fraction x (fit - baseline)`, the smallest margin
under which none of the repeated fresh rehearsals of any calibration point exceeds it.

The coefficients are fitted to peaks measured by `benchmarks/calibrate_memory.py` on this machine
kind and stored in `memory_calibration.json` with the command, machine, date and every measured
peak; docs/BENCHMARKS.md records the fit, its margin and its out-of-sample errors. Without that
file the planner refuses to plan (CalibrationError) rather than guess.

Those coefficients are the built-in networks' (`edge_sdk/models/zoo.py`). Any other model gets
its own from a handful of fresh rehearsals, once per structural digest (`model_memory.py`);
`MemoryModel` is what the planner asks either way.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import torch
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from edge_sdk.models import ModelSpec, build_model
from edge_sdk.models.cost import ModelFootprint, footprint  # noqa: F401  (re-exported for the planner)
from edge_sdk.validation import describe

CALIBRATION_FILE = Path(__file__).with_name("memory_calibration.json")
_COEFFICIENT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
NonNegative = Annotated[float, Field(ge=0)]


class CalibrationError(ValueError):
    """The memory calibration cannot be read. Planning refuses to guess: default coefficients
    would size every device's batch and width from numbers nobody measured."""


@pydantic_dataclass(frozen=True, config=_COEFFICIENT)
class MemoryCoefficients:
    baseline_bytes: NonNegative
    bytes_per_parameter: NonNegative
    activation_factor: NonNegative
    source: str = "uncalibrated"
    per_sample_gradient_factor: NonNegative = 0.0
    # None: the calibration predates the two-phase formula; the terms then add up (conservative).
    backward_bytes_per_parameter: NonNegative | None = None
    retained_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    # The upper bound over the central fit: + margin_bytes + margin_fraction x (fit - baseline),
    # the smallest pair that covers every repeated fresh rehearsal of the calibration.
    margin_bytes: NonNegative = 0.0
    margin_fraction: NonNegative = 0.0
    # The resident memory of a rehearsal process with its data loaded, before any model is built
    # (the highest the calibration measured): where a model calibrated on its own, on random
    # inputs in a process without that data, stands in a real one (model_memory.py).
    floor_bytes: NonNegative | None = None
    # The upper-bound margin of a model's own calibration (model_memory.py) instead of the one
    # above: fitted so that the built-in networks' own calibrations, each from six rehearsals on
    # random inputs, bound every real rehearsal of theirs. It covers what the spread margin does
    # not: a fit from six points, and a process with a data source in it.
    own_margin_bytes: NonNegative | None = None
    own_margin_fraction: NonNegative | None = None

    @classmethod
    def load(cls, path: Path | str = CALIBRATION_FILE) -> MemoryCoefficients:
        """The coefficients stored in `path`; CalibrationError if it is missing or malformed.

        The file's `calibration` record (command, machine, date, every measured peak) is for
        readers and tests, not for the formula.
        """
        path = Path(path)
        remedy = ("reinstall fedprune (the file ships in the package), or measure this machine "
                  "with `python benchmarks/calibrate_memory.py` from a checkout")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CalibrationError(f"memory calibration {path} is missing, so the planner cannot "
                                   f"predict peak memory; {remedy}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CalibrationError(f"memory calibration {path} cannot be read ({exc}); {remedy}") \
                from None
        if not isinstance(data, dict):
            raise CalibrationError(f"memory calibration {path} is not a JSON object; {remedy}")
        data.pop("calibration", None)
        try:
            return cls(**data)
        except (TypeError, ValidationError) as exc:
            detail = describe(exc, "calibration") if isinstance(exc, ValidationError) else str(exc)
            raise CalibrationError(f"memory calibration {path} is malformed ({detail}); {remedy}") \
                from None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MemoryFeatures:
    """Per-model quantities the memory model multiplies by its coefficients."""

    parameters: int
    saved_activation_bytes: int      # per sample: what autograd keeps for backward
    per_sample_gradient_elements: int  # per sample: largest conv/GroupNorm layer's parameters
    input_elements: int              # per sample


@lru_cache(maxsize=256)
def memory_features(spec: ModelSpec) -> MemoryFeatures:
    """Measured on the built network (batch 2, divided by 2), so it follows the builder exactly."""
    model = build_model(spec, seed=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    transient = max((sum(p.numel() for p in m.parameters(recurse=False))
                     for m in model.modules() if _materialises_per_sample_gradients(m)), default=0)
    batch = 2
    x = torch.zeros(batch, *spec.input_shape, requires_grad=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return MemoryFeatures(
        parameters=sum(p.numel() for p in model.parameters()),
        saved_activation_bytes=math.ceil(sum(saved.values()) / batch),
        per_sample_gradient_elements=transient,
        input_elements=math.prod(spec.input_shape),
    )


def _materialises_per_sample_gradients(module: torch.nn.Module) -> bool:
    """A layer Opacus's ghost clipping has a grad sampler but no norm sampler for (Conv*d, the
    norms, ...): its batch x parameters per-sample gradient exists, one layer at a time."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as Ghost

    kind = type(module)
    return (kind in Ghost.GRAD_SAMPLERS and kind not in Ghost.NORM_SAMPLERS
            and any(True for _ in module.parameters(recurse=False)))


def predict_peak_bytes(spec: ModelSpec, physical_batch: int, local_samples: int,
                       coefficients: MemoryCoefficients, per_sample_gradients: bool = False,
                       optimizer_state: int = 0) -> int:
    """`optimizer_state`: tensors the size of the parameters the optimizer keeps between steps
    (`OPTIMIZER_STATE`); the calibration is of plain SGD, which keeps none."""
    f = memory_features(spec)
    c = coefficients
    batch_terms = (c.activation_factor * f.saved_activation_bytes * physical_batch
                   + c.per_sample_gradient_factor * 4 * f.per_sample_gradient_elements * physical_batch)
    if c.backward_bytes_per_parameter is None:
        moving = c.bytes_per_parameter * f.parameters + batch_terms
    else:
        moving = max(c.bytes_per_parameter * f.parameters + c.retained_fraction * batch_terms,
                     c.backward_bytes_per_parameter * f.parameters + batch_terms)
    above_baseline = moving + 4 * f.input_elements * local_samples + 4 * optimizer_state * f.parameters
    if per_sample_gradients:
        above_baseline += 4 * f.parameters * physical_batch
    # Upper bound, not a central estimate: the margin covers the spread of fresh rehearsals.
    return math.ceil(c.baseline_bytes + c.margin_bytes + (1 + c.margin_fraction) * above_baseline)


@dataclass(frozen=True)
class MemoryModel:
    """One model's prediction: its DP-SGD coefficients, its plain-SGD ones, and where they come
    from (the shipped calibration or the model's own rehearsals, for `fedprune plan` to say)."""

    dp: MemoryCoefficients
    plain: MemoryCoefficients
    origin: str

    def peak(self, spec: ModelSpec, physical_batch: int, local_samples: int, dp: bool = True,
             optimizer_state: int = 0) -> int:
        return predict_peak_bytes(spec, physical_batch, local_samples, self.dp if dp else self.plain,
                                  optimizer_state=optimizer_state)

    def runtime_bytes(self, dp: bool = True) -> int:
        """What any task needs before its model: the interpreter with torch (and Opacus under DP)
        imported, and the margin. A device whose limit is below it fits no model at any width."""
        c = self.dp if dp else self.plain
        return math.ceil(c.baseline_bytes + c.margin_bytes)
