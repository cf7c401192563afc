"""Width-sliced submodels, the coordinator's half: which units a device keeps, and moving values.

The device only builds `width_spec(spec, ratio)` (`edge_sdk/slicing.py`). The coordinator picks
the kept units (`select_channels`), builds the index map (`slice_map`), cuts the download
(`extract`), and maps the upload back into global flat positions (`to_global`) for the
`StreamingAggregator`, whose per-entry coverage counts then give HeteroFL's averaging over the
devices that hold each entry. Unit counts and the walk over the spec come from
`edge_sdk.slicing`, so the map always matches the network the device builds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edge_sdk.codec import SparseTensor
from edge_sdk.models.spec import ModelSpec
from edge_sdk.slicing import LayerSite, check_ratio, layer_sites, sliced_width, width_spec

__all__ = ["Method", "SliceMap", "WidthSlice", "extract", "select_channels", "slice_map", "to_global",
           "width_slice"]

Method = Literal["magnitude", "prefix", "rolling"]
_METHODS = ("magnitude", "prefix", "rolling")


class SliceMap(dict[str, np.ndarray]):
    """Sub-tensor name -> global flat index of each of its entries (int64, the sub-tensor's shape).

    It also carries the global shape of every tensor it maps, because the sparse tensors handed to
    the aggregator are addressed in the global tensor, which the sub-tensor alone cannot tell.
    """

    def __init__(self) -> None:
        super().__init__()
        self.global_shapes: dict[str, tuple[int, ...]] = {}


def select_channels(
    spec: ModelSpec,
    global_state: Mapping[str, np.ndarray],
    ratio: float,
    method: Method,
    round_number: int = 0,
) -> dict[int, np.ndarray]:
    """Sorted kept output units per hidden layer index, with counts matching `width_spec`.

    `prefix` is HeteroFL's static slice, `rolling` FedRolex's window that moves one unit per round
    so every unit is trained over time, `magnitude` keeps the units the global model relies on
    most. Identity-shortcut blocks follow their input whatever the method (see `width_spec`).
    """
    ratio = check_ratio(ratio)
    if method not in _METHODS:
        raise ValueError(f"unknown selection method {method!r}; use one of {', '.join(_METHODS)}")
    kept: dict[int, np.ndarray] = {}
    previous = np.arange(spec.input_shape[0], dtype=np.int64)
    for site in layer_sites(spec):
        if not site.hidden:
            continue
        units = site.layer.out
        count = sliced_width(units, ratio)
        if site.identity:
            chosen = previous.copy()
        elif method == "prefix":
            chosen = np.arange(count, dtype=np.int64)
        elif method == "rolling":
            chosen = np.sort((round_number + np.arange(count, dtype=np.int64)) % units)
        else:
            norms = _unit_norms(site, global_state)
            chosen = np.sort(np.argsort(-norms, kind="stable")[:count]).astype(np.int64)
        kept[site.index] = chosen
        previous = chosen
    return kept


def _unit_norms(site: LayerSite, state: Mapping[str, np.ndarray]) -> np.ndarray:
    """L2 norm of everything that writes unit c: one row (fc) or out-channel (conv) per tensor.

    A resblock's kept set indexes conv1, conv2 and the shortcut alike, so all three count.
    """
    prefix = f"layers.{site.index}"
    names = {"conv": ["conv.weight"], "fc": ["linear.weight"],
             "resblock": ["conv1.weight", "conv2.weight", "shortcut.weight"]}[site.layer.kind]
    total = np.zeros(site.layer.out, dtype=np.float64)
    for name in names:
        key = f"{prefix}.{name}"
        if key not in state:
            if name == "shortcut.weight":
                continue
            raise KeyError(f"magnitude selection needs {key!r} in the global state")
        rows = np.asarray(state[key], dtype=np.float64).reshape(site.layer.out, -1)
        total += np.square(rows).sum(axis=1)
    return np.sqrt(total)


# --------------------------------------------------------------------------- index map


def _grid(shape: tuple[int, ...], axes: list[np.ndarray | None]) -> np.ndarray:
    """Global flat positions of the sub-block picked by one index array per axis (None = all)."""
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    flat = np.zeros((), dtype=np.int64)
    for d, (size, picked) in enumerate(zip(shape, axes)):
        index = np.arange(size, dtype=np.int64) if picked is None else picked
        view = [1] * len(shape)
        view[d] = len(index)
        flat = flat + index.reshape(view) * strides[d]
    return flat


def _checked_units(kept: Mapping[int, np.ndarray], site: LayerSite) -> np.ndarray:
    if site.index not in kept:
        raise ValueError(f"no kept units for hidden layer {site.index}")
    units = np.asarray(kept[site.index])
    if units.ndim != 1 or units.size == 0 or units.dtype.kind not in "iu":
        raise ValueError(f"layer {site.index}: kept units must be a non-empty 1-D integer array")
    units = units.astype(np.int64)
    if units[0] < 0 or units[-1] >= site.layer.out or np.any(np.diff(units) <= 0):
        raise ValueError(f"layer {site.index}: kept units must be sorted, unique and in "
                         f"[0, {site.layer.out})")
    return units


def slice_map(spec: ModelSpec, kept: Mapping[int, np.ndarray]) -> SliceMap:
    """Index map of the submodel `kept` defines, for every tensor `width_spec` gives it.

    Each layer's inputs follow the previous layer's kept units; an fc reading a feature map takes,
    for kept channel c, the whole block c*H*W .. (c+1)*H*W-1 that `torch.flatten` puts it in.
    """
    sites = list(layer_sites(spec))
    hidden = {s.index for s in sites if s.hidden}
    if set(kept) - hidden:
        raise ValueError(f"kept units given for layers {sorted(set(kept) - hidden)}, which are not "
                         f"hidden parameterised layers (those are {sorted(hidden)})")
    smap = SliceMap()
    previous = np.arange(spec.input_shape[0], dtype=np.int64)

    def put(name: str, shape: tuple[int, ...], *axes: np.ndarray | None) -> None:
        smap[name] = _grid(shape, list(axes) + [None] * (len(shape) - len(axes)))
        smap.global_shapes[name] = shape

    for site in sites:
        layer, prefix = site.layer, f"layers.{site.index}"
        if layer.kind == "gap":
            continue
        out = _checked_units(kept, site) if site.hidden else np.arange(layer.out, dtype=np.int64)
        if layer.kind == "fc":
            inputs, in_features = previous, site.in_channels
            if site.in_hw is not None:
                area = site.in_hw[0] * site.in_hw[1]
                inputs = (previous[:, None] * area + np.arange(area)).reshape(-1)
                in_features = site.in_channels * area
            put(f"{prefix}.linear.weight", (layer.out, in_features), out, inputs)
            put(f"{prefix}.linear.bias", (layer.out,), out)
        elif layer.kind == "conv":
            put(f"{prefix}.conv.weight", (layer.out, site.in_channels, layer.kernel, layer.kernel),
                out, previous)
            put(f"{prefix}.conv.bias", (layer.out,), out)
            if layer.norm:
                put(f"{prefix}.norm.weight", (layer.out,), out)
                put(f"{prefix}.norm.bias", (layer.out,), out)
        else:
            if site.identity and not np.array_equal(out, previous):
                raise ValueError(f"layer {site.index}: a block with an identity shortcut must keep "
                                 "exactly its input's channels, or x + y adds unrelated channels")
            if not site.identity and layer.stride == 1 and len(out) == len(previous):
                raise ValueError(f"layer {site.index}: equal sliced input and output widths would "
                                 "drop the shortcut convolution; keep a different number of units")
            put(f"{prefix}.conv1.weight", (layer.out, site.in_channels, 3, 3), out, previous)
            put(f"{prefix}.norm1.weight", (layer.out,), out)
            put(f"{prefix}.norm1.bias", (layer.out,), out)
            put(f"{prefix}.conv2.weight", (layer.out, layer.out, 3, 3), out, out)
            put(f"{prefix}.norm2.weight", (layer.out,), out)
            put(f"{prefix}.norm2.bias", (layer.out,), out)
            if not site.identity:
                put(f"{prefix}.shortcut.weight", (layer.out, site.in_channels, 1, 1), out, previous)
        previous = out
    return smap


# --------------------------------------------------------------------------- moving values


@dataclass(frozen=True)
class WidthSlice:
    spec: ModelSpec                   # the narrower model a device builds
    smap: SliceMap                    # each of its entries' place in the full model
    state: dict[str, np.ndarray]      # the full state's values at those places


def width_slice(spec: ModelSpec, state: Mapping[str, np.ndarray], ratio: float, method: Method,
                round_number: int = 0) -> WidthSlice:
    """The model at `ratio` of its width: the one place a full state is cut down, so the task a
    device trains and the artifact it runs are sliced alike."""
    smap = slice_map(spec, select_channels(spec, state, ratio, method, round_number))
    return WidthSlice(width_spec(spec, ratio), smap, extract(state, smap))


def extract(global_state: Mapping[str, np.ndarray], smap: SliceMap) -> dict[str, np.ndarray]:
    """The submodel's dense state, cut out of the global one (new arrays, not views)."""
    sub: dict[str, np.ndarray] = {}
    for name, index in smap.items():
        source = np.asarray(global_state[name])
        if source.shape != smap.global_shapes[name]:
            raise ValueError(f"tensor {name!r} has shape {source.shape}, but the slice map was "
                             f"built for {smap.global_shapes[name]}")
        sub[name] = source.reshape(-1)[index]
    return sub


def to_global(
    sub_tensors: Mapping[str, SparseTensor | np.ndarray], smap: SliceMap
) -> dict[str, SparseTensor]:
    """A device's (possibly sparse) sub-state as sparse tensors over the global tensors.

    The codec requires increasing indices; sorted kept units already give increasing positions,
    but the values are reordered with the indices anyway so that no caller has to rely on it.
    """
    result: dict[str, SparseTensor] = {}
    for name, tensor in sub_tensors.items():
        if name not in smap:
            raise ValueError(f"tensor {name!r} is not part of this submodel")
        index = smap[name]
        if isinstance(tensor, SparseTensor):
            shape, values = tuple(tensor.shape), tensor.values
            positions = index.reshape(-1) if tensor.indices is None else index.reshape(-1)[tensor.indices]
        else:
            array = np.asarray(tensor)
            shape, values, positions = array.shape, array.reshape(-1), index.reshape(-1)
        if shape != index.shape:
            raise ValueError(f"tensor {name!r} has shape {shape}, the submodel's is {index.shape}")
        order = np.argsort(positions, kind="stable")
        result[name] = SparseTensor(smap.global_shapes[name], positions[order], values[order])
    return result
