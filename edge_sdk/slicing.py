"""Width-sliced submodels, the device's half: the spec of a model at a share of its width.

Masking saves nothing on a device that cannot hold the full model; slicing removes whole channels
(a channel group at a time, `models/width.py`), so the submodel is an ordinary smaller network the
device builds and trains like any other. The coordinator (`coordinator/slicing.py`) picks which
channels, maps values between the submodel and the full model and sends the kept channels in the
spec; `width_spec` is the prefix choice with the same counts, which is all the planner and the
cost model need to know about a width.
"""

from __future__ import annotations

import dataclasses
import numbers

from .models.spec import ModelSpec
from .models.width import prefix_keep, sliced_width

__all__ = ["check_ratio", "sliced_width", "width_spec"]


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"width ratio must be a number in (0, 1], got {ratio!r}")
    return float(ratio)


def width_spec(spec: ModelSpec, ratio: float) -> ModelSpec:
    """The model at `ratio` of its width (every channel group's first ceil(ratio x C) channels);
    the full model itself at 1."""
    ratio = check_ratio(ratio)
    if ratio >= 1.0:
        return dataclasses.replace(spec, keep=())
    from .models.width import check_sliceable

    check_sliceable(spec.base)
    return dataclasses.replace(spec, keep=prefix_keep(spec, ratio))
