"""`fedprune plan` for models fedprune has never seen, named `package.module:function`: a
MobileNetV2-style network (tests/harness/models.py's, wider: depthwise convs, BatchNorm that
Opacus swaps for GroupNorm, in-place ReLU6) and an MLP on rows of features. Each one's memory
comes from its own rehearsals, measured once on first use and kept in the cache; the plans it
gives different devices differ and each fits, and a real rehearsal of a plan (`--verify`) peaks
at or under the prediction.

The MobileNet's six rehearsals take a minute of CPU, so this file carries their record
(`MEASURED`, from `coordinator.planning.model_memory.measure` on the machine it names; `python
tests/test_plan_any_model.py` measures it again) and the planner finds it in its cache; the MLP,
whose rehearsals are the cheapest, is measured on first use, the path every new model takes."""

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


# The wide MobileNet's memory, measured by coordinator.planning.model_memory.measure (see the
# docstring).
MEASURED = {
    "format": 1, "digest": "5b3a5656e9d9106f", "model": MOBILENET, "input_shape": [1, 28, 28],
    "num_classes": 10, "machine": "AMD EPYC, 2 cores, x86_64, Linux 6.18.44-fc-v1272",
    "date": "2026-12-04", "threads": 2, "rehearsals": [
        {"width": 1.0, "physical_batch": 48, "dp": True, "floor_bytes": 243122176, "peak_bytes": 1576161280},
        {"width": 1.0, "physical_batch": 8, "dp": True, "floor_bytes": 243081216, "peak_bytes": 650084352},
        {"width": 0.25, "physical_batch": 48, "dp": True, "floor_bytes": 243122176, "peak_bytes": 740065280},
        {"width": 0.25, "physical_batch": 8, "dp": True, "floor_bytes": 243167232, "peak_bytes": 483041280},
        {"width": 1.0, "physical_batch": 48, "dp": False, "floor_bytes": 243068928, "peak_bytes": 989130752},
        {"width": 0.25, "physical_batch": 8, "dp": False, "floor_bytes": 243040256, "peak_bytes": 455962624}]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The MobileNet's memory cache, holding its record as the planner wrote it."""
    folder = tmp_path_factory.mktemp("memory-cache")
    (folder / f"{MEASURED['digest']}.json").write_text(json.dumps(MEASURED))
    return folder


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

    base = model_spec(MOBILENET, (1, 28, 28), 10)
    digest = structure(base).digest
    assert digest == MEASURED["digest"], "the network changed: measure MEASURED again (docstring)"
    kept = (cache / f"{digest}.json").read_text()
    common = ["--model", MOBILENET, "--dataset", "fashion-mnist", "--memory-cache", str(cache)]
    small = plan(capsys, "--catalogue", "rpi3b", *common)[1]
    large = plan(capsys, "--catalogue", "rpi4-2gb", *common)[1]
    assert small["width_ratio"] < large["width_ratio"] == 1.0
    for device in (small, large):
        assert device["fits"] and device["predicted_peak_bytes"] <= device["memory_limit_bytes"]
        assert "rehearsals of this model" in device["decisions"]["width"]

    # Both plans read the kept record, which holds the six rehearsals, DP and plain, and the
    # fitted bound is above every one of them.
    assert [p.name for p in cache.iterdir()] == [f"{digest}.json"]
    assert (cache / f"{digest}.json").read_text() == kept
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


def test_a_model_on_rows_of_features_is_measured_on_first_use_planned_and_verified(capsys,
                                                                                  tmp_path):
    from coordinator.planning.model_memory import REHEARSALS, load_record, machine
    from edge_sdk.models import model_spec, structure

    code, rows = plan(capsys, "--catalogue", "phone-low", "--model", TABULAR, "--input-shape", "30",
                      "--classes", "2", "--local-samples", "96", "--memory-cache", str(tmp_path),
                      "--verify")
    assert code == 0 and rows["fits"], rows["reasons"]
    assert rows["width_ratio"] == 1.0 and rows["parameters"] == 30 * 256 + 256 + 256 * 128 + 128 + 128 * 2 + 2
    assert 200e6 < rows["measured_peak_bytes"] <= rows["predicted_peak_bytes"]
    assert "rehearsals of this model" in rows["decisions"]["width"]
    # Its first plan measured it, here and now, and kept the record for the next plan.
    base = model_spec(TABULAR, (30,), 2)
    digest = structure(base).digest
    assert [p.name for p in tmp_path.iterdir()] == [f"{digest}.json"]
    record = load_record(tmp_path / f"{digest}.json", base, digest)
    assert [(r.width, r.physical_batch, r.dp) for r in record.rehearsals] == list(REHEARSALS)
    assert record.machine == machine()


if __name__ == "__main__":  # measure MEASURED again (a minute): python tests/test_plan_any_model.py
    from coordinator.planning.model_memory import measure
    from edge_sdk.models import model_spec

    spec = model_spec(MOBILENET, (1, 28, 28), 10)
    print(json.dumps(measure(spec, spec.structure).model_dump(mode="json")))
