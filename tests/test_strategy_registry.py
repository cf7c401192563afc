"""A strategy is one file: this module adds one (with a settings section and a device-side plan
feature), and everything that lists strategies finds it without another edit.

The toy, "head_only", trains every tensor but uploads only the output layer, and asks the device
to count its batches through a plan feature; the tests check what the device actually received
and did.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import Field

from coordinator.cli import build_parser
from coordinator.config import ConfigError, SimulationSettings, load_config
from coordinator.simulation import run_simulation
from coordinator.strategies import Strategy, register_strategy, strategy_names, strategy_table
from coordinator.strategies.registry import strategy_entry
from edge_sdk.models import layer_tensor_names, model_spec, tensor_shapes
from edge_sdk.plan import SubmodelPlan, TensorPlan
from edge_sdk.plan_features import (PlanFeature, PlanFeatureError, TrainingHooks, build_features,
                                    register_plan_feature)
from edge_sdk.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
BATCHES: list[int] = []  # what the device-side feature counted, per task


class CountBatchesParams(Settings):
    tag: str = "toy"


@register_plan_feature("count_batches", CountBatchesParams)
class CountBatches(PlanFeature):
    def hooks(self, model, rng) -> TrainingHooks:
        BATCHES.append(0)

        def before_batch() -> None:
            BATCHES[-1] += 1
        return TrainingHooks(before_batch=before_batch)


class HeadOnlySettings(Settings):
    head_weight: float = Field(1.0, gt=0)


@register_strategy("head_only", settings=HeadOnlySettings, summary="toy: uploads the output layer only")
class HeadOnly(Strategy):
    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        head = set(self.layers[-1])
        tensors = tuple(TensorPlan(n, upload=n in head) for n in self.all_tensors())
        return SubmodelPlan(device_index, round_number, self.spec, tensors,
                            aggregation_weight=self.settings.head_weight, upload_dtype=self.upload_dtype,
                            features={"count_batches": {}})


def test_a_strategy_in_one_file_is_configured_run_and_reaches_the_device():
    config = load_config(None, ["head_only.head_weight=2.0"], strategy="head_only", clients=2, rounds=1,
                         max_client_samples=120, partition="iid")
    assert config.head_only.head_weight == 2.0
    BATCHES.clear()
    result = run_simulation(config, progress=False).to_dict()
    # Every device ran the toy's feature: 120 samples, 84 of them to train (70%), at batch 48 is
    # 2 batches in the one local epoch.
    assert BATCHES == [2, 2]
    # Only the output layer travelled up: the upload is the head's size, not the model's.
    # (fp32 values; zstd barely compresses trained weights, so the payload is close to 4 bytes each.)
    spec = model_spec(config.model, (1, 28, 28), 10)
    shapes = tensor_shapes(spec)
    head_values = sum(int(np.prod(shapes[name])) for name in layer_tensor_names(spec)[-1])
    per_device_up = result["final"]["bytes_up_total"] / 2
    assert 0.8 * head_values * 4 < per_device_up < head_values * 4 + 1024, (per_device_up, head_values)
    assert per_device_up < 0.1 * 4 * sum(int(np.prod(s)) for s in shapes.values())


def test_the_registry_feeds_the_cli_the_schema_and_the_errors():
    assert "head_only" in strategy_names()
    assert build_parser().parse_args(["simulate", "--strategy", "head_only"]).strategy == "head_only"
    schema = SimulationSettings.model_json_schema()
    assert schema["properties"]["head_only"]["properties"]["head_weight"]["exclusiveMinimum"] == 0
    assert schema["properties"]["fedp3"]["properties"]["selection"]["default"] == "opu2"
    with pytest.raises(ConfigError, match="head_only.head_weight: Input should be greater than 0"):
        load_config(None, ["head_only.head_weight=0"], strategy="head_only")
    with pytest.raises(ConfigError, match="'nope' is not a registered strategy; use one of .*head_only"):
        load_config(None, [], strategy="nope")
    with pytest.raises(ConfigError, match="tail_only: not a setting"):
        load_config(None, ["tail_only.x=1"])


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="strategy 'fedavg' is already registered"):
        register_strategy("fedavg")(type("Other", (Strategy,), {"plan": lambda *a: None}))
    assert strategy_entry("fedavg").cls.__module__ == "coordinator.strategies.fedavg"


def test_the_readme_table_is_the_registry():
    """Regenerate with: python -c 'from coordinator.strategies import strategy_table as t; print(t())'"""
    block = re.search(r"<!-- strategies:begin -->\n(.*?)\n<!-- strategies:end -->", README.read_text(),
                      re.DOTALL)
    assert block is not None
    builtin = [line for line in strategy_table().splitlines() if "head_only" not in line]
    assert block.group(1).splitlines() == builtin


@pytest.mark.parametrize("features, message", [
    ({"warp_drive": {}}, "feature 'warp_drive', which this device's SDK does not have"),
    ({"ordered_dropout": {"levels": [0.0]}}, "levels: widths must be in \\(0, 1\\]"),
    ({"ordered_dropout": {"levels": [1.0], "extra": 1}}, "extra: Extra inputs are not permitted"),
    ({"threshold_pruning": {"threshold": float("nan")}}, "threshold: Input should be a finite number"),
    ({"supermask": {"init_seed": 1}, "count_batches": {}}, None),
])
def test_a_plan_feature_is_checked_on_arrival(features, message):
    if message is None:
        assert [f.name for f in build_features(features)] == ["supermask", "count_batches"]
        return
    with pytest.raises(PlanFeatureError, match=message):
        build_features(features)
    with pytest.raises(ValueError, match=message):  # the device refuses such a plan as a bad task
        SubmodelPlan.from_dict({"device_index": 0, "round": 1, "spec": _spec_dict(), "tensors": [],
                                "features": features})


def test_plan_features_must_be_an_object_of_objects():
    for features in ([["ordered_dropout"]], {"ordered_dropout": [1.0]}):
        with pytest.raises(ValueError, match="plan.features must map each feature name"):
            SubmodelPlan.from_dict({"device_index": 0, "round": 1, "spec": _spec_dict(), "tensors": [],
                                    "features": features})


def _spec_dict():
    return model_spec("mlp", (1, 28, 28), 10).to_dict()
