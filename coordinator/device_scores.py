"""What each device ends a run with, scored on its own data, and each tier's share of it.

The fleet-mean "personalized" accuracy scores each device's last local fine-tune, which rewards
any local training at any width, and scores a device that never trained with the global model.
Inclusive-FL work (HeteroFL, FjORD, FedRolex, "No One Left Behind") asks instead what a device
*runs* after the run: the final global model at the width it can hold, with whatever it keeps
for itself. Per device, that model is:

- its width of the final global model (the strategy's slicing: prefix, rolling window, ...);
- with the tensors the strategy keeps private on it (FedPer's head, FedP3's private layers, all
  of them for local-only training) taken from what it trained, where it trained;
- or, where DP-SGD's split keeps a noise-free personal model, that model;
- a device left out of training (`full` sizing: it cannot train the full model) still runs the
  full global model for inference, which needs far less memory than training; it is scored so.

Each device is scored on its own local test split; a tier (`device_profiles.tiers`) is the mean
of its devices, and the worst tier is the one a fleet owner hears from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from device_profiles import tier_of
from edge_sdk.client import LocalClient
from edge_sdk.models import ModelSpec, build_model

from .planning.fleet import DeviceAssignment
from .slicing import width_slice
from .strategies.base import Strategy


def device_scores(clients: Sequence[LocalClient], fleet: Sequence[DeviceAssignment],
                  widths: Sequence[float], strategy: Strategy, weights: dict[str, np.ndarray],
                  slicing: str, rounds: list[Any]) -> dict[str, Any]:
    """`final`'s per-device and per-tier accuracy (results JSON keys `devices`, `tiers`,
    `worst_tier`, `worst_tier_accuracy`, `fleet_accuracy`). `weights`: the final global model's
    materialised tensors; `rounds`: the run's RoundResults (trained rounds are counted there)."""
    trained = Counter(d["client"] for r in rounds for d in r.devices
                      if d.get("outcome") == "accepted")
    devices = []
    for client, assignment, width in zip(clients, fleet, widths):
        left_out = not assignment.selected
        width = 1.0 if left_out else width
        model, runs = _model_it_runs(client, strategy, weights, width, slicing, len(rounds))
        devices.append({
            "client": client.device_index, "device_id": assignment.profile.name,
            "device_class": assignment.profile.name.split("#")[0],
            "tier": tier_of(assignment.profile), "width": width,
            "runs": "global (left out of training)" if left_out else runs,
            "accuracy": client.evaluate(model), "trained_rounds": trained[client.device_index]})
    tiers: dict[str, dict[str, Any]] = {}
    for tier in dict.fromkeys(d["tier"] for d in devices):
        members = [d for d in devices if d["tier"] == tier]
        tiers[tier] = {"devices": len(members),
                       "accuracy": float(np.mean([d["accuracy"] for d in members])),
                       "widths": sorted({d["width"] for d in members}, reverse=True)}
    worst = min(tiers, key=lambda t: tiers[t]["accuracy"])
    return {"devices": devices, "tiers": tiers, "worst_tier": worst,
            "worst_tier_accuracy": tiers[worst]["accuracy"],
            "fleet_accuracy": float(np.mean([d["accuracy"] for d in devices]))}


def _model_it_runs(client: LocalClient, strategy: Strategy, weights: dict[str, np.ndarray],
                   width: float, slicing: str, round_number: int) -> tuple[torch.nn.Module, str]:
    personal = client.personal_model() if client.personal_state is not None else None
    if personal is not None:  # DP's split: the noise-free model it keeps, whole
        return personal, "personal (fine-tuned)"
    spec: ModelSpec = strategy.spec
    if width < 1.0:
        cut = width_slice(spec, weights, width, slicing, round_number)
        spec, state = cut.spec, dict(cut.state)
    else:
        state = dict(weights)
    private = [t.name for t in strategy.plan(client.device_index, round_number, 1).tensors
               if t.private]
    own = client.personal_state if client.personal_state is not None else client.state
    kept = [name for name in private if client.spec is not None and name in own
            and tuple(own[name].shape) == tuple(np.shape(state[name]))]
    for name in kept:
        state[name] = own[name].detach().numpy()
    model = build_model(spec)
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
    if not kept:
        return model, "global"
    return model, "global with its own private tensors" if len(kept) < len(state) else "its own"
