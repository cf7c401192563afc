"""Every registered strategy on models fedprune has no code for: one round runs, or the strategy
refuses the model at configuration with the reason.

The models: a MobileNetV2-style network (inverted residuals, depthwise convolutions, BatchNorm
that Opacus turns into GroupNorm, ReLU6; `harness.models`), a 1-D convolutional signal network
(Conv1d, depthwise), and an MLP over a flat (features,) input, all written as a user writes them.
A round is the real one: `RoundPipeline` tasks (width-sliced where the strategy slices), the real
device client training on a small learnable synthetic set, the coordinator's intake and
`RoundCombiner`; the new global state must be finite and moved exactly where the round's plans
uploaded something. A refusal must come from `build_strategy`, before any round, and say why.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from coordinator.backends.base import device_threads
from coordinator.combine import RoundCombiner
from coordinator.config import load_config
from coordinator.rounds import RoundPipeline
from coordinator.strategies import build_strategy, strategy_entry, strategy_names
from edge_sdk.client import LocalClient
from edge_sdk.data.partition import ClientData
from edge_sdk.models import (SpecError, build_model, layer_tensor_names, model_spec, register_model,
                             tensor_shapes)
from edge_sdk.settings import TrainSettings
from harness.models import MOBILENET, SIGNAL_CNN, MobileNetStyle

TABULAR = "test_any_model_tabular_mlp"
SCALED = "test_any_model_channel_scaled"
LINEAR = "test_any_model_linear"
FUNCTIONAL = "test_any_model_functional_relu6"
FROZEN = "test_any_model_frozen_features"
BLOCKS = "test_any_model_mobilenet_by_blocks"


class TabularMLP(nn.Module):
    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                                 nn.Linear(16, num_classes))

    def forward(self, x):
        return self.net(x)


class ChannelScaled(nn.Module):
    """A fixed per-channel scale held in a buffer: Torch-Pruning prunes parameters, not buffers,
    so half the channels meet a scale for all of them and the narrow model fails."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc((torch.relu(self.conv(x)) * self.scale).mean(dim=(2, 3)))


class FunctionalReLU6(nn.Module):
    """Saturating activations called in the forward, not modules SynFlow could bypass."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(channels, 16, 3, padding=1),
                                    nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)])
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        for conv in self.convs:
            x = nn.functional.relu6(conv(x))
        return self.fc(x.mean(dim=(2, 3)))


class FrozenFeatures(nn.Module):
    """Features detached before the classifier: no gradient reaches the first layer."""

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Linear(features, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.features(x)).detach())


def _mobilenet_by_blocks(shape, classes):
    """The MobileNet with its blocks as the layers FedP3 chooses among (`fedprune_layers`)."""
    model = MobileNetStyle(shape[0], classes)
    model.fedprune_layers = [f"features.{i}" for i in range(len(model.features))] + ["classifier"]
    return model


register_model(BLOCKS)(_mobilenet_by_blocks)
register_model(FUNCTIONAL)(lambda shape, classes: FunctionalReLU6(shape[0], classes))
register_model(FROZEN)(lambda shape, classes: FrozenFeatures(shape[0], classes))
register_model(TABULAR)(lambda shape, classes: TabularMLP(shape[0], classes))
register_model(SCALED)(lambda shape, classes: ChannelScaled(shape[0], classes))
register_model(LINEAR)(lambda shape, classes: nn.Sequential(nn.Flatten(), nn.Linear(shape[0], classes)))

CLASSES = 3
SHAPES = {MOBILENET: (1, 16, 16), SIGNAL_CNN: (2, 32), TABULAR: (12,)}
# What a strategy cannot do on a model, and the words of its reason (everything else runs).
REFUSED = {("feddp", SIGNAL_CNN): "has none to gate", ("feddp", TABULAR): "has none to gate"}
# Each strategy's own settings for a round that is quick and still that method.
EXTRA = {"heterofl": {"width_levels": [1.0, 0.5]}, "fedrolex": {"width_levels": [1.0, 0.5]},
         "fjord": {"width_levels": [1.0, 0.5], "fjord.levels": [1.0, 0.5]},
         "feddp": {"feddp.variant": "gate"}, "hidenseek": {"hidenseek.synflow_iterations": 3}}


def _config(strategy: str, **extra):
    return load_config(None, [], strategy=strategy, clients=2, rounds=1,
                       **{**EXTRA.get(strategy, {}), **extra})


def _shard(device: int, shape: tuple[int, ...], n: int = 32) -> ClientData:
    """Three classes, each a fixed random pattern plus noise: learnable in a few steps."""
    rng = torch.Generator().manual_seed(100 + device)
    patterns = torch.randn(CLASSES, *shape, generator=torch.Generator().manual_seed(7))
    y = torch.arange(n) % CLASSES
    x = patterns[y] + 0.5 * torch.randn(n, *shape, generator=rng)
    cut = n * 3 // 4
    return ClientData(device, x[:cut], y[:cut], x[cut:], y[cut:])


def _one_round(strategy_name: str, model: str):
    """(strategy, global state before, after, names uploaded, clients) of one two-device round."""
    config = _config(strategy_name)
    shape = SHAPES[model]
    strategy = build_strategy(config, model_spec(model, shape, CLASSES))
    before = strategy.initial_state() or {k: v.detach().numpy().copy() for k, v in
                                          build_model(strategy.spec, seed=0).state_dict().items()}
    train = TrainSettings(batch_size=8, lr=0.05, local_epochs=1)
    pipeline = RoundPipeline(strategy, config, before, 1, train)
    combiner = RoundCombiner(strategy, before, config.aggregator, config.seed)
    uploaded, clients = set(), []
    for device in range(2):
        data = _shard(device, shape)
        task = pipeline.task(device, len(data.train_y))
        client = LocalClient(data, task.train)
        with device_threads(1):  # a device is one core; two threads on a shared machine crawl
            outcome = client.run_task(task.plan, pipeline.download(task, device_has_private_copy=False))
        assert not outcome.refused, outcome.refused
        combiner.add(pipeline.intake(task, outcome.payload), task.plan.aggregation_weight, before)
        uploaded |= set(task.plan.uploaded)
        clients.append((client, task))
    return strategy, before, combiner.result(), uploaded, clients


CASES = [(s, m) for m in SHAPES for s in strategy_names()]


@pytest.mark.parametrize("strategy,model", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_every_strategy_runs_a_round_on_any_model_or_says_why_not(strategy, model):
    reason = REFUSED.get((strategy, model))
    if reason is not None:
        with pytest.raises(SpecError, match=reason):
            build_strategy(_config(strategy), model_spec(model, SHAPES[model], CLASSES))
        return
    strategy_obj, before, after, uploaded, clients = _one_round(strategy, model)
    assert set(after) == set(before)
    assert all(np.isfinite(v).all() for v in after.values())
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed <= uploaded  # nothing moves that no device sent (private heads stay put)
    if not uploaded:  # `local`: nothing is federated; each device's own model trained instead
        assert strategy == "local" and not changed
        for client, task in clients:
            assert any(not np.array_equal(client.state[k].numpy(), before[k])
                       for k in client.state if k in before)
        return
    assert changed, f"{strategy} on {model}: the round moved nothing of {sorted(uploaded)[:5]}"
    if strategy_obj.aggregates == "values" and strategy not in ("hidenseek", "fedp3"):
        # plain averaging of every uploaded weight: each of the model's weight matrices and
        # kernels moved. (Not FedDP's gates: a gate's scale on a channel that a one-channel
        # GroupNorm normalises next gets no gradient, only its top-k choice acts.)
        model_weights = tensor_shapes(model_spec(model, SHAPES[model], CLASSES))
        weights = {k for k in uploaded if k in model_weights and before[k].ndim > 1}
        assert weights <= changed, sorted(weights - changed)[:5]


def test_the_mobilenet_layers_heads_and_masks_are_the_models_own():
    """FedP3 chooses among the model's own parametrised modules, in forward order (or the
    modules it lists in `fedprune_layers`: here its blocks), and the head
    of FedPer, FedRep and FFGG is the output layer; HideNseek keeps weights in every one of its
    kernels (SynFlow's linearised path norm sees through GroupNorm and ReLU6), about `density`."""
    spec = model_spec(MOBILENET, SHAPES[MOBILENET], CLASSES)
    layers = layer_tensor_names(spec)
    config = _config("fedp3")
    fedp3 = build_strategy(config, spec)
    assert fedp3.hidden == len(layers) - 1 == 16 * 2  # 16 conv+norm pairs, then the classifier
    plan = fedp3.plan(3, 1, 10)
    chosen = {n for i in plan.selected_layers for n in layers[i]}
    assert set(plan.uploaded) == chosen | set(layers[-1]) and len(plan.selected_layers) == 2
    blocks = model_spec(BLOCKS, SHAPES[MOBILENET], CLASSES)
    by_block = build_strategy(config, blocks)
    assert by_block.hidden == 7 and by_block.layers[-1] == ("classifier.weight", "classifier.bias")
    chosen = by_block.plan(3, 1, 10).selected_layers
    assert chosen == (3, 4) and {n for i in chosen for n in by_block.layers[i]} == \
        {n for n in tensor_shapes(blocks) if n.startswith(("features.3.", "features.4."))}
    for name in ("fedper", "fedrep", "ffgg"):
        strategy = build_strategy(_config(name), spec)
        private = strategy.head if name != "ffgg" else strategy.private
        assert private == ["classifier.weight", "classifier.bias"]
    hidenseek = build_strategy(_config("hidenseek", **{"hidenseek.synflow_iterations": 5}), spec)
    kernels = {n for n, shape in tensor_shapes(spec).items() if len(shape) > 1}
    assert set(hidenseek.masks) == kernels and all(m.any() for m in hidenseek.masks.values())
    kept = sum(int(m.sum()) for m in hidenseek.masks.values())
    assert kept == pytest.approx(0.2 * sum(m.size for m in hidenseek.masks.values()), rel=0.02)


@pytest.mark.parametrize("strategy,model,extra,reason", [
    ("heterofl", SCALED, {}, r"heterofl trains narrower submodels .*'test_any_model_channel_scaled' "
                             r"cannot be width-pruned: RuntimeError"),
    ("fedrolex", SCALED, {}, "cannot be width-pruned"),
    ("fjord", SCALED, {}, "cannot be width-pruned"),
    ("fedavg", SCALED, {"width_levels": [1.0, 0.5]}, r"width_levels \[0.5\] ask for narrower"),
    ("hidenseek", TABULAR, {"width_levels": [1.0, 0.5]}, "hidenseek runs every device at full width"),
    ("feddp", TABULAR, {"feddp.variant": "threshold"}, "prunes convolution kernels; model "
                                                      "'test_any_model_tabular_mlp' has no convolution"),
    ("hidenseek", FROZEN, {}, r"SynFlow scores every weight of features.weight, fc.weight zero \(no path"),
    ("fedp3", LINEAR, {}, "has only its output layer"),
    ("fedp3", TABULAR, {"fedp3.selection": "opu3"}, "k must be between 1 and the 2 hidden layers"),
    ("fedper", LINEAR, {}, "has no layer before its output layer"),
    ("fedrep", TABULAR, {"personal.head_layers": 3}, r"head_layers = 3 leaves no shared body: "
                                                     r"model 'test_any_model_tabular_mlp' has 3 layers"),
    ("ffgg", LINEAR, {}, r"ffgg.private = 'head' must select some but not all tensors"),
    ("ffgg", TABULAR, {"ffgg.private": "nothing"}, "selects 0 of 6"),
])
def test_a_strategy_refuses_a_model_it_cannot_serve_at_configuration(strategy, model, extra,
                                                                      reason):
    shape = (1, 8, 8) if model == SCALED else (12,)
    spec = model_spec(model, shape, CLASSES)
    config = load_config(None, [], strategy=strategy, clients=2, rounds=1, **extra)
    with pytest.raises(SpecError, match=reason):
        build_strategy(config, spec)
    if "width_levels" not in extra:  # the refusal is the model's, found without a strategy
        entry = strategy_entry(strategy)
        settings = getattr(config, entry.section) if entry.section else None
        if strategy != "hidenseek":  # SynFlow's refusal comes with the mask, in the constructor
            with pytest.raises(SpecError, match=reason):
                entry.cls.check_model(spec, settings)


def test_synflow_keeps_weights_in_every_kernel_of_a_net_with_functional_relu6():
    """Saturation the scoring cannot bypass as a module: the scaled-down input stays below it."""
    from coordinator.strategies.hidenseek import synflow_masks

    masks = synflow_masks(model_spec(FUNCTIONAL, (1, 8, 8), CLASSES), 0.2, 5, seed=0)
    assert set(masks) == {"convs.0.weight", "convs.1.weight", "convs.2.weight", "fc.weight"}
    assert all(m.any() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == pytest.approx(0.2 * sum(m.size for m in masks.values()), rel=0.02)
