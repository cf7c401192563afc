"""Submodels chosen while the model runs: FedDP's channel gates keep at most k channels per sample
and cut the inference FLOPs; FjORD's ordered dropout runs only the nested prefix of every layer's
channels, and the full layers once its hooks are removed. Both on any registered network: the
built-in FedP3 CNN and a MobileNetV2-style module (BatchNorm, depthwise convolutions, residual
adds) they have no code for."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from coordinator.strategies import build_strategy
from edge_sdk.models import build_model, gates, model_spec, structure
from edge_sdk.models.cost import footprint, inference_macs
from edge_sdk.plan_features import PlanFeatureError, build_features
from harness.models import MOBILENET
from harness.strategies import SPEC, simulation_config

MOBILE = model_spec(MOBILENET, (1, 28, 28), 10)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def outputs_of(model: nn.Module, names) -> tuple[dict[str, torch.Tensor], list]:
    """What each named module returns after every hook registered so far (gates, dropout)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, o.detach())) for n in names]
    return seen, handles


# --------------------------------------------------------------------------- FedDP's gates


def test_feddp_gates_cut_inference_flops_and_keep_k_channels_per_sample():
    strategy = build_strategy(simulation_config("feddp", **{"feddp.variant": "gate", "feddp.gate": 0.5}), SPEC)
    assert strategy.spec.gate == 0.5
    # conv 4 -> 2 channels: 57,600 / 2; conv 12 -> 6 reading 2 of 4: 76,800 / 4; the first fc reads
    # 6 x 4 x 4 of 192 inputs: 196,608 / 2; fc 1024x1024 and the head whole; gates 1x4 and 4x12.
    assert inference_macs(strategy.spec) == 28_800 + 19_200 + 98_304 + 1_048_576 + 10_240 + 4 + 48
    assert footprint(SPEC).macs == 57_600 + 76_800 + 196_608 + 1_048_576 + 10_240
    model = build_model(strategy.spec, seed=0)
    gates = sorted(n for n, _ in model.named_parameters() if ".gate." in n)
    assert gates == ["layers.0.conv.gate.bias", "layers.0.conv.gate.weight",
                     "layers.1.conv.gate.bias", "layers.1.conv.gate.weight"]
    seen, _ = outputs_of(model, ["layers.0.conv", "layers.1.conv"])
    model(torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    for name, channels in (("layers.0.conv", 4), ("layers.1.conv", 12)):
        active = (seen[name].abs().sum(dim=(2, 3)) > 0).sum(dim=1)
        assert active.max() == math.ceil(0.5 * channels), name  # k kept, the rest exactly zero
        assert len({tuple(row.nonzero().flatten().tolist()) for row in seen[name].abs().sum(dim=(2, 3))}) > 1, \
            f"{name}: every sample kept the same channels, so the gate is not per sample"


def test_gates_sit_on_every_plain_conv_of_any_model_and_are_priced():
    gated = dataclasses.replace(MOBILE, gate=0.25)
    model = build_model(gated, seed=0)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    depthwise = {n for n, m in convs.items() if m.groups > 1}
    assert len(depthwise) == 5 and len(convs) == 16  # stem, 5 blocks (one without expansion), last
    with_gate = {n for n, m in convs.items() if hasattr(m, "gate")}
    assert with_gate == set(convs) - depthwise
    assert {n.rsplit(".gate.", 1)[0] for n, _ in model.named_parameters() if ".gate." in n} == with_gate
    assert structure(MOBILE).head == "classifier"
    # every gated tensor belongs to its convolution's layer, so strategies move it with the conv
    from edge_sdk.models import layer_tensor_names
    layered = [n for layer in layer_tensor_names(gated) for n in layer]
    assert sorted(layered) == sorted(n for n, _ in model.named_parameters())

    # Opacus's GroupNorm has one group per channel here, so at initialisation (zero bias) every
    # channel mean a gate reads is zero and all saliencies tie at the gate's bias: the lowest
    # indices would win everywhere. Training moves the biases; set them as it would.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.5)
    seen, _ = outputs_of(model, sorted(with_gate))
    model(torch.randn(4, 1, 28, 28, generator=generator))
    for name in with_gate:
        limit = math.ceil(0.25 * convs[name].out_channels)
        assert (seen[name].abs().sum(dim=(2, 3)) > 0).sum(dim=1).max() == limit, name
    dense, cheap = footprint(gated), inference_macs(gated)
    gate_macs = sum(m.gate.in_features * m.gate.out_features for n, m in convs.items() if n in with_gate)
    assert dense.macs == footprint(MOBILE).macs + gate_macs  # dense: every channel, plus the gates
    assert cheap < 0.2 * dense.macs  # a quarter of the channels on both sides of most products


@pytest.mark.parametrize("bias, kept", [
    ([1.0] * 8, [0, 1, 2, 3]),                                # all tie: the lowest indices
    ([1, 2, 2, 1, 3, 3, 0.5, 2], [1, 2, 4, 5]),               # 3, 3, then two of the three 2s
])
def test_gates_keep_exactly_k_channels_on_ties_in_torch_and_when_exported(bias, kept):
    """Saliencies set by the gate's bias alone (zero weights), so they tie exactly. The exported
    graph (what ONNX and TFLite convert) counts instead of sorting and must keep the same."""
    model = gates.attach(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), 0.5, head="")
    with torch.no_grad():
        model[0].gate.weight.zero_()
        model[0].gate.bias.copy_(torch.tensor(bias))
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(model, (x,))
    assert not [n for n in program.graph.nodes if "sort" in str(n.target) or "topk" in str(n.target)]
    for run in (model, program.module()):
        with torch.no_grad():
            alive = run(x).abs().sum(dim=(2, 3)) > 0
        assert [row.nonzero().flatten().tolist() for row in alive] == [kept] * 4


# --------------------------------------------------------------------------- FjORD


def ordered_dropout(model, spec, level):
    feature = build_features({"ordered_dropout": {"levels": [level]}}, spec)[0]
    hooks = feature.hooks(model, np.random.default_rng(0))
    hooks.before_batch()
    return hooks


def test_fjord_ordered_dropout_runs_the_nested_prefix():
    model = build_model(SPEC, seed=0)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    seen, _ = outputs_of(model, ["layers.0", "layers.2", "layers.4"])
    hooks = ordered_dropout(model, SPEC, 0.25)
    model(x)
    for name, units in (("layers.0", 4), ("layers.2", 1024)):
        alive = (seen[name].abs().flatten(2).sum(dim=2) if seen[name].dim() > 2
                 else seen[name].abs()).sum(dim=0) > 0
        assert not alive[math.ceil(0.25 * units):].any(), name
        assert alive[:math.ceil(0.25 * units)].any(), name
    assert seen["layers.4"].shape == (2, 10) and (seen["layers.4"] != 0).all()  # the head is whole
    hooks.remove()
    model(x)
    assert ((seen["layers.2"].abs().sum(dim=0) > 0).sum() > 512)


def test_fjord_prefix_on_a_mobilenet_runs_the_narrow_network_of_the_same_channels():
    """At level p every channel group's suffix is zero after every block (the adds, the depthwise
    convolutions and the normalisations included), not only after the convolutions."""
    model = build_model(MOBILE, seed=0).eval()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    blocks = [f"features.{i}" for i in range(len(model.features))]
    seen, _ = outputs_of(model, blocks)
    hooks = ordered_dropout(model, MOBILE, 0.5)
    with torch.no_grad():
        narrow = model(x)
    for name in blocks:
        channels = seen[name].shape[1]
        assert seen[name][:, math.ceil(0.5 * channels):].abs().max() == 0, name
        assert seen[name][:, :math.ceil(0.5 * channels)].abs().max() > 0, name
    hooks.remove()
    with torch.no_grad():
        full = model(x)
    assert not torch.allclose(full, narrow, atol=1e-3)


def test_ordered_dropout_needs_the_plan_spec():
    feature = build_features({"ordered_dropout": {"levels": [0.5]}})[0]
    with pytest.raises(PlanFeatureError, match="model spec"):
        feature.hooks(build_model(SPEC), np.random.default_rng(0))
