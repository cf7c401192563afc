"""What the slicing tests share: seeded global models and the zeroed-units reference.

Zeroing the incoming weights and bias of every removed unit makes a network without
normalisation compute exactly what its width-sliced submodel does, so equal logits prove a
slice map consistent (tests/test_slicing.py, tests/test_edge_models.py).
"""

from __future__ import annotations

import numpy as np
import torch

from edge_sdk.models import ModelSpec, build_model, model_spec

_GLOBALS: dict[tuple[str, int], tuple[ModelSpec, dict[str, np.ndarray]]] = {}


def global_model(name: str, classes: int = 10) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """The model on 1x28x28 inputs, initialised with seed 3, as numpy arrays (built once)."""
    if (name, classes) not in _GLOBALS:
        spec = model_spec(name, (1, 28, 28), classes)
        state = {k: v.detach().numpy().copy() for k, v in build_model(spec, seed=3).state_dict().items()}
        _GLOBALS[name, classes] = (spec, state)
    return _GLOBALS[name, classes]


def load(spec: ModelSpec, state: dict[str, np.ndarray]) -> torch.nn.Module:
    model = build_model(spec)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                          strict=True)
    return model.eval()


def zero_removed(sub: ModelSpec, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Global state with every dropped channel's producing weights and bias set to zero.

    The channels a submodel keeps are named per channel group, by the group's root module; in a
    network without normalisation or residual adds that module is the group's only producer, so
    its output rows are what a dropped channel is made of."""
    out = {k: v.copy() for k, v in state.items()}
    for key, units in sub.keep:
        weight = out[f"{key}.weight"]
        removed = np.setdiff1d(np.arange(weight.shape[0]), units)
        weight[removed] = 0.0
        if f"{key}.bias" in out:
            out[f"{key}.bias"][removed] = 0.0
    return out
