"""FedP3 (Yi et al., ICLR 2024): per-device layer selection, global pruning, partial upload.

Readings taken where the paper and its released code leave room (see docs/ARCHITECTURE.md):
- hidden layers are every parameterised layer but the last; the output layer is always uploaded
  and, as in the released code, never overwritten from the server (`personal_head`);
- devices fall into as many groups as there are hidden layers, by device index modulo that count
  (a simulation's ordinal; a service device's index comes from its id, `rounds.device_key`, so
  its group does not depend on the order devices registered in);
- a device trains all layers by default (`train_layers="all"`) and uploads only its selection;
- the weighted rule weights a device by the number of layers it uploads, normalised per entry.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
from pydantic import Field

from edge_sdk.models import ModelSpec, SpecError, layer_tensor_names
from edge_sdk.plan import SubmodelPlan, TensorPlan
from edge_sdk.settings import Settings

from .base import Strategy
from .registry import register_strategy


class FedP3Settings(Settings):
    selection: str = "opu2"   # lowerb, opuK (K layers in turn by device group) or oprK (random)
    global_keep: float = Field(1.0, gt=0, le=1)  # download keep of the layers a device does not upload
    local_keep: float = Field(1.0, gt=0, le=1)   # magnitude keep during local training
    aggregation: Literal["mean", "weighted"] = "mean"
    train_layers: Literal["all", "selected"] = "all"
    personal_head: bool = True


_SELECTION = re.compile(r"^(lowerb|opu(\d+)|opr(\d+))$")


def parse_selection(text: str, hidden_layers: int) -> tuple[str, int]:
    match = _SELECTION.match(text.lower())
    if not match:
        raise ValueError(f"fedp3.selection {text!r} not understood; use lowerb, opuK or oprK "
                         "(e.g. opu2, opu3, opr2)")
    kind = match.group(1)[:3] if match.group(1) != "lowerb" else "lowerb"
    k = 1 if kind == "lowerb" else int(match.group(2) or match.group(3))
    if not 1 <= k <= hidden_layers:
        raise ValueError(f"fedp3.selection {text!r}: k must be between 1 and the {hidden_layers} "
                         "hidden layers of this model (forms: lowerb, opuK, oprK)")
    return kind, k


@register_strategy("fedp3", settings=FedP3Settings,
                   summary="FedP3 (Yi et al., ICLR 2024): per-device layer selection, global pruning, "
                           "partial upload; DP-FedP3 with `[dp]`")
class FedP3(Strategy):
    settings: FedP3Settings

    def __init__(self, spec: ModelSpec, settings: FedP3Settings | None = None, upload_dtype: str = "fp32",
                 seed: int = 0):
        super().__init__(spec, settings or FedP3Settings(), upload_dtype, seed)
        self.hidden = len(self.layers) - 1
        self.kind, self.k = parse_selection(self.settings.selection, self.hidden)

    @classmethod
    def check_model(cls, spec: ModelSpec, settings: FedP3Settings | None = None) -> None:
        """Devices choose among the hidden layers (every layer but the output layer), so a model
        needs one at least, and as many as the selection uploads."""
        hidden = len(layer_tensor_names(spec)) - 1
        if hidden < 1:
            raise SpecError(f"fedp3 selects hidden layers to upload, and model {spec.name!r} has "
                            "only its output layer; give it a hidden layer, or list its layers in "
                            "a `fedprune_layers` attribute, or use another strategy")
        try:
            parse_selection((settings or FedP3Settings()).selection, hidden)
        except ValueError as exc:
            raise SpecError(str(exc)) from None

    def selected_layers(self, device_index: int, round_number: int) -> tuple[int, ...]:
        if self.kind == "opr":
            rng = np.random.default_rng([self.seed, round_number, device_index])
            return tuple(sorted(int(i) for i in rng.choice(self.hidden, self.k, replace=False)))
        group = device_index % self.hidden
        return tuple(sorted((group + j) % self.hidden for j in range(self.k)))

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        cfg = self.settings
        selected = self.selected_layers(device_index, round_number)
        tensors: list[TensorPlan] = []
        for index, names in enumerate(self.layers[:-1]):
            chosen = index in selected
            for name in names:
                tensors.append(TensorPlan(
                    name, train=chosen or cfg.train_layers == "all", upload=chosen,
                    download_keep=1.0 if chosen else cfg.global_keep, local_keep=cfg.local_keep))
        for name in self.layers[-1]:
            tensors.append(TensorPlan(name, private=cfg.personal_head, local_keep=cfg.local_keep))
        weight = float(len(selected) + 1) if cfg.aggregation == "weighted" else 1.0
        return SubmodelPlan(device_index, round_number, self.spec, tuple(tensors),
                            aggregation_weight=weight, upload_dtype=self.upload_dtype,
                            selected_layers=selected)
