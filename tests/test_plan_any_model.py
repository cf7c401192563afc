"""`fedprune plan` for models fedprune has never seen, named `package.module:function`: a
MobileNetV2-style network (tests/harness/models.py's, wider: depthwise convs, BatchNorm that
Opacus swaps for GroupNorm, in-place ReLU6) and an MLP on rows of features. Each one's memory
comes from its own fresh rehearsals, measured once on first use and kept in the cache; the plans
it gives different devices differ and each fits, and a real rehearsal of a plan (`--verify`)
peaks at or under the prediction."""

from __future__ import annotations

import json
import math

import pytest
from torch import nn

from harness.models import MobileNetStyle

MOBILENET = "test_plan_any_model:wide_mobilenet"
TABULAR = "test_plan_any_model:tabular"


class _WideMobileNet(MobileNetStyle):
    # tests/harness/models.py's network with MobileNetV2's expansion of 6 and its first stages at
    # full resolution: on 28x28 images a 730 MB device cannot hold it at full width.
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 2, 2))


def wide_mobilenet(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return _WideMobileNet(input_shape[0], num_classes, last_channels=256)


def tabular(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    features = math.prod(input_shape)
    return nn.Sequential(nn.Linear(features, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                         nn.Linear(128, num_classes))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("memory-cache")


def plan(capsys, *args: str) -> tuple[int, dict]:
    from coordinator.cli import main

    code = main(["plan", *args, "--json"])
    out, err = capsys.readouterr()
    assert code in (0, 1), err
    return code, json.loads(out)


def test_a_mobilenet_gets_its_own_rehearsals_and_a_width_per_device(capsys, cache):
    from coordinator.planning.memory import MemoryCoefficients
    from coordinator.planning.model_memory import load_record, memory_model
    from edge_sdk.models import model_spec, structure
    from edge_sdk.slicing import width_spec

    common = ["--model", MOBILENET, "--dataset", "fashion-mnist", "--memory-cache", str(cache)]
    small = plan(capsys, "--catalogue", "rpi3b", *common)[1]
    large = plan(capsys, "--catalogue", "rpi4-2gb", *common)[1]
    assert small["width_ratio"] < large["width_ratio"] == 1.0
    for device in (small, large):
        assert device["fits"] and device["predicted_peak_bytes"] <= device["memory_limit_bytes"]
        assert "rehearsals of this model" in device["decisions"]["width"]

    # Measured once, for both plans: the record holds the six fresh rehearsals, DP and plain,
    # and the fitted bound is above every one of them.
    base = model_spec(MOBILENET, (1, 28, 28), 10)
    digest = structure(base).digest
    assert [p.name for p in cache.iterdir()] == [f"{digest}.json"]
    record = load_record(cache / f"{digest}.json", base, digest)
    assert len(record.rehearsals) == 6 and {r.dp for r in record.rehearsals} == {True, False}
    memory = memory_model(base, MemoryCoefficients.load(), cache)
    reference_floor = MemoryCoefficients.load().floor_bytes
    for r in record.rehearsals:
        # the child's peak moved onto the floor of a process that holds its data, as predicted
        standing = r.peak_bytes - r.floor_bytes + reference_floor
        assert standing <= memory.peak(width_spec(base, r.width), r.physical_batch, 0, r.dp)
    # DP costs this network more than plain SGD (per-sample gradients of every conv and norm)
    full = width_spec(base, 1.0)
    assert memory.peak(full, 48, 420, dp=True) > memory.peak(full, 48, 420, dp=False)


def test_plan_verify_rehearses_the_mobilenet_plan_under_its_prediction(capsys, cache):
    code, checked = plan(capsys, "--catalogue", "rpi3b", "--model", MOBILENET, "--dataset",
                         "fashion-mnist", "--local-samples", "96", "--memory-cache", str(cache),
                         "--verify")
    assert code == 0 and checked["fits"], checked["reasons"]
    assert checked["width_ratio"] < 1.0
    assert 200e6 < checked["measured_peak_bytes"] <= checked["predicted_peak_bytes"] \
        <= checked["memory_limit_bytes"]


def test_a_model_on_rows_of_features_is_planned_and_verified_without_a_dataset(capsys, cache):
    code, rows = plan(capsys, "--catalogue", "phone-low", "--model", TABULAR, "--input-shape", "30",
                      "--classes", "2", "--local-samples", "96", "--memory-cache", str(cache),
                      "--verify")
    assert code == 0 and rows["fits"], rows["reasons"]
    assert rows["width_ratio"] == 1.0 and rows["parameters"] == 30 * 256 + 256 + 256 * 128 + 128 + 128 * 2 + 2
    assert 200e6 < rows["measured_peak_bytes"] <= rows["predicted_peak_bytes"]
