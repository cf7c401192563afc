"""Width-sliced submodels, the device's half: the spec a device builds for its width.

Masking saves nothing on a device that cannot hold the full model; slicing removes whole output
units (channels, neurons), and every tensor that reads those units loses the matching inputs, so
the submodel is an ordinary smaller `ModelSpec` the device builds and trains like any other:
`width_spec(spec, ratio)`. Everything else happens on the coordinator (`coordinator/slicing.py`):
it picks the kept units, builds the index map, cuts the download and maps the upload back into
global flat positions. Both halves walk the spec with `layer_sites`, so they cannot disagree on
a layer's width.

Caveat on GroupNorm: `network.py` picks the group count from the channel count, so a sliced layer
may normalise over differently sized groups than the same channels in the global model (16
channels use 8 groups, 4 kept channels use 4). The affine scale and shift still follow their
channels; only the statistics differ, which is accepted (HeteroFL has the same issue with its
static batch norm), but it means a sliced normalised network is not an exact restriction of the
global one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, replace

from .models.network import _conv_out
from .models.spec import LayerSpec, ModelSpec

__all__ = ["LayerSite", "check_ratio", "layer_sites", "sliced_width", "width_spec"]


# --------------------------------------------------------------------------- walking the spec


@dataclass(frozen=True)
class LayerSite:
    """What a layer sees coming in, in the global model, as `SpecModel` computes it."""

    index: int
    layer: LayerSpec
    in_channels: int
    in_hw: tuple[int, int] | None  # spatial size of the input; None once an fc has flattened it
    hidden: bool  # parameterised and not the output layer
    identity: bool  # a resblock whose skip path is the input itself (no shortcut conv)


def layer_sites(spec: ModelSpec) -> Iterator[LayerSite]:
    """Mirror SpecModel's shape bookkeeping so slicing and the network can never disagree."""
    spec.validate()
    channels, height, width = spec.input_shape
    hw: tuple[int, int] | None = (height, width)
    last = len(spec.layers) - 1
    for i, layer in enumerate(spec.layers):
        identity = (layer.kind == "resblock" and layer.stride == 1 and channels == layer.out)
        yield LayerSite(i, layer, channels, hw, layer.kind != "gap" and i != last, identity)
        if layer.kind == "gap":
            hw = (1, 1)
        elif layer.kind == "fc":
            channels, hw = layer.out, None
        else:
            assert hw is not None, "SpecModel rejects conv/resblock after fc"
            kernel, padding = (layer.kernel, layer.padding) if layer.kind == "conv" else (3, 1)
            h, w = (_conv_out(s, kernel, layer.stride, padding) for s in hw)
            if layer.kind == "conv" and layer.pool > 1:
                h, w = h // layer.pool, w // layer.pool
            channels, hw = layer.out, (h, w)


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"width ratio must be a number in (0, 1], got {ratio!r}")
    return float(ratio)


def sliced_width(out: int, ratio: float) -> int:
    # Rounded before the ceiling so 0.3 * 10 (= 3.0000000000000004) keeps 3 units, not 4.
    return max(1, math.ceil(round(ratio * out, 9)))


# --------------------------------------------------------------------------- sub-spec and units


def width_spec(spec: ModelSpec, ratio: float) -> ModelSpec:
    """The spec a device builds: hidden widths scaled by `ratio`, the output layer untouched.

    An identity-shortcut resblock takes its input's sliced width rather than its own, because the
    residual sum needs equal widths; in practice both are the same number, except for a block that
    reads the (never sliced) model input directly.
    """
    ratio = check_ratio(ratio)
    layers = []
    channels = spec.input_shape[0]  # sliced width of the current activation
    for site in layer_sites(spec):
        layer = site.layer
        if not site.hidden:
            layers.append(layer)
            continue
        out = channels if site.identity else sliced_width(layer.out, ratio)
        if (layer.kind == "resblock" and not site.identity and layer.stride == 1
                and out == channels):
            raise ValueError(
                f"layer {site.index}: at ratio {ratio} the block's input and output widths are "
                f"both {out}, so the submodel would drop the shortcut convolution the global "
                "model has; use a larger ratio")
        layers.append(replace(layer, out=out))
        channels = out
    return replace(spec, name=f"{spec.name}@w{ratio:g}", layers=tuple(layers))
