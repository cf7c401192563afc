"""Submodels chosen while the model runs: FedDP's channel gates keep at most k channels per sample
and cut the inference FLOPs; FjORD's ordered dropout runs only the nested prefix of a layer's
units, and the full layer once its hooks are removed."""

from __future__ import annotations

import numpy as np
import torch

from coordinator.strategies import build_strategy
from edge_sdk.models import build_model
from edge_sdk.models.cost import footprint, inference_macs
from edge_sdk.plan_features import build_features
from harness.strategies import SPEC, simulation_config


def test_feddp_gates_cut_inference_flops_and_keep_k_channels_per_sample():
    strategy = build_strategy(simulation_config("feddp", **{"feddp.variant": "gate", "feddp.gate": 0.5}), SPEC)
    assert inference_macs(strategy.spec) < footprint(SPEC).macs
    model = build_model(strategy.spec, seed=0)
    out = model.layers[0](torch.randn(4, 1, 28, 28))
    active = (out.abs().sum(dim=(2, 3)) > 0).sum(dim=1)
    assert torch.all(active <= model.layers[0].keep)


def test_fjord_ordered_dropout_runs_the_nested_prefix():
    model = build_model(SPEC, seed=0)
    hooks = build_features({"ordered_dropout": {"levels": [0.25]}})[0].hooks(model, np.random.default_rng(0))
    hooks.before_batch()
    out = model.layers[0](torch.randn(2, 1, 28, 28))
    units = model.layers[0].conv.out_channels
    alive = (out.abs().sum(dim=(0, 2, 3)) > 0).numpy()
    assert not alive[int(np.ceil(0.25 * units)):].any()
    hooks.remove()
    assert (model.layers[0](torch.randn(2, 1, 28, 28)).abs().sum(dim=(0, 2, 3)) > 0).sum() > units // 2
