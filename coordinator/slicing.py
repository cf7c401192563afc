"""Width-sliced submodels, the coordinator's half: which channels a device keeps, moving values.

The coordinator picks the kept channels per channel group (`select_keep`), builds the index map
(`slice_map`, from `edge_sdk.models.width.index_map`, so it is the network the device builds),
cuts the download (`extract`), and maps the upload back into global flat positions (`to_global`)
for the `StreamingAggregator`, whose per-entry coverage counts give HeteroFL's averaging over the
devices that hold each entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from edge_sdk.codec import SparseTensor
from edge_sdk.models import ModelSpec
from edge_sdk.models.network import meta_model
from edge_sdk.models.width import group_importance, group_sizes, index_map, sliced_width
from edge_sdk.slicing import check_ratio

__all__ = ["Method", "SliceMap", "WidthSlice", "extract", "select_keep", "slice_map", "to_global",
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


def select_keep(spec: ModelSpec, global_state: Mapping[str, np.ndarray], ratio: float,
                method: Method, round_number: int = 0) -> ModelSpec:
    """`spec` at `ratio` of its width, with the kept channels of every group chosen by `method`.

    `prefix` is HeteroFL's static slice, `rolling` FedRolex's window that moves one channel per
    round so every channel is trained over time, `magnitude` keeps the channels the global model
    relies on most (group L2 norm over every coupled tensor).
    """
    ratio = check_ratio(ratio)
    if method not in _METHODS:
        raise ValueError(f"unknown selection method {method!r}; use one of {', '.join(_METHODS)}")
    if ratio >= 1.0:
        return dataclasses.replace(spec, keep=())
    scores = _importance(spec, global_state) if method == "magnitude" else {}
    keep = []
    for key, size in group_sizes(spec.base):
        count = sliced_width(size, ratio)
        if method == "prefix":
            chosen = np.arange(count)
        elif method == "rolling":
            chosen = np.sort((round_number + np.arange(count)) % size)
        else:
            chosen = np.sort(np.argsort(-scores[key], kind="stable")[:count])
        keep.append((key, tuple(int(c) for c in chosen)))
    return dataclasses.replace(spec, keep=tuple(sorted(keep)))


def _importance(spec: ModelSpec, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = meta_model(spec).to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in state:
                raise KeyError(f"magnitude selection needs {name!r} in the global state")
            param.copy_(torch.as_tensor(np.asarray(state[name])))
    return group_importance(model, spec.base)


@lru_cache(maxsize=32)
def slice_map(spec: ModelSpec) -> SliceMap:
    """Index map of the submodel `spec` describes, for every tensor it has."""
    positions, shapes = index_map(spec)
    smap = SliceMap()
    for name, index in positions.items():
        smap[name] = index
        smap.global_shapes[name] = shapes[name]
    return smap


@dataclass(frozen=True)
class WidthSlice:
    spec: ModelSpec                   # the narrower model a device builds
    smap: SliceMap                    # each of its entries' place in the full model
    state: dict[str, np.ndarray]      # the full state's values at those places


def width_slice(spec: ModelSpec, state: Mapping[str, np.ndarray], ratio: float, method: Method,
                round_number: int = 0) -> WidthSlice:
    """The model at `ratio` of its width: the one place a full state is cut down, so the task a
    device trains and the artifact it runs are sliced alike."""
    sub = select_keep(spec, state, ratio, method, round_number)
    smap = slice_map(sub)
    return WidthSlice(sub, smap, extract(state, smap))


def extract(global_state: Mapping[str, np.ndarray], smap: SliceMap) -> dict[str, np.ndarray]:
    """The submodel's dense state, cut out of the global one (new arrays, not views)."""
    sub: dict[str, np.ndarray] = {}
    for name, index in smap.items():
        source = np.asarray(global_state[name])
        if source.shape != smap.global_shapes[name]:
            raise ValueError(f"tensor {name!r} has shape {source.shape}, but the slice map was "
                             f"built for {smap.global_shapes[name]}")
        sub[name] = np.asarray(source.reshape(-1)[index])  # a 0-d index gives a scalar
    return sub


def to_global(
    sub_tensors: Mapping[str, SparseTensor | np.ndarray], smap: SliceMap
) -> dict[str, SparseTensor]:
    """A device's (possibly sparse) sub-state as sparse tensors over the global tensors.

    The codec requires increasing indices; the values are reordered with the positions so that no
    caller has to rely on the map's order.
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
