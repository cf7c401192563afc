"""Per-device and per-tier accuracy of the model each device runs at the end of a run (issue 26,
coordinator/device_scores.py): recomputed here from the run's final global weights, their width
slice and the device's own test split, for every device."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coordinator.config import load_config
from coordinator.slicing import width_slice
from coordinator.simulation import run_simulation
from device_profiles import sample_fleet, tier_index, tier_of
from edge_sdk.models import build_model, model_spec
from edge_sdk.data.sources import federated_data
from edge_sdk.training.local import accuracy

CLASSES = ["rpi3b", "phone-low", "rpi4-2gb", "rpi4-4gb"]


PROFILES = sample_fleet(4, 0, names=CLASSES)


@pytest.fixture(scope="module")
def runs():
    """One round under planned and under full sizing: (config, result) of each."""
    out = {}
    for sizing in ("planned", "full"):
        config = load_config(None, [f"sizing=\"{sizing}\""],
                             dataset="fashion-mnist", model="leaf_cnn", strategy="heterofl",
                             clients=4, fraction=1.0, rounds=1, partition="tier-classes:0.1",
                             max_client_samples=60, deadline_seconds=30)
        out[sizing] = config, run_simulation(config, progress=False, profiles=PROFILES)
    return out


@pytest.mark.parametrize("sizing", ["planned", "full"])
def test_each_device_is_scored_with_its_width_of_the_final_global_model(runs, sizing):
    profiles = PROFILES
    config, result = runs[sizing]
    final = result.to_dict()["final"]
    spec = model_spec("leaf_cnn", (1, 28, 28), 10)
    shards = federated_data(config.data_settings, 4, config.partition, config.seed,
                            groups=[tier_index(p) for p in profiles]).shards
    for device, profile, shard in zip(final["devices"], profiles, shards):
        assert device["device_id"] == profile.name and device["tier"] == tier_of(profile)
        data = shard.capped(config.max_client_samples)
        cut = width_slice(spec, result.weights, device["width"], "prefix", 1) \
            if device["width"] < 1 else None
        model = build_model(cut.spec if cut else spec)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v))
                               for k, v in (cut.state if cut else result.weights).items()})
        with torch.no_grad():
            assert device["accuracy"] == accuracy(model, data.test_x, data.test_y)
    out = [d for d in final["devices"] if d["runs"] == "global (left out of training)"]
    if sizing == "full":  # it leaves out the devices that cannot train the full model, which run it
        assert out and all(d["trained_rounds"] == 0 and d["width"] == 1.0 for d in out)
        assert {d["tier"] for d in out} == {"low"}
    else:  # the low tier trains a narrower slice, and is scored with it
        assert not out and {d["width"] < 1 for d in final["devices"]} == {True, False}
        assert all(d["width"] < 1 for d in final["devices"] if d["tier"] == "low")
    for tier, summary in final["tiers"].items():
        members = [d["accuracy"] for d in final["devices"] if d["tier"] == tier]
        assert summary["devices"] == len(members) and summary["accuracy"] == np.mean(members)
    assert final["worst_tier_accuracy"] == min(t["accuracy"] for t in final["tiers"].values())


def test_the_report_draws_each_tier_and_refuses_an_accuracy_that_is_not_one(runs, tmp_path):
    from coordinator.report import ReportError, report_files, report_results

    results = [(sizing, result.to_dict()) for sizing, (_, result) in runs.items()]
    report = report_results(results, tmp_path / "report")
    figure = tmp_path / "report" / "accuracy_by_tier.png"
    assert "accuracy_by_tier.png" in report.figures
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000

    hostile = results[0][1]
    hostile["final"]["tiers"]["low"]["accuracy"] = 1.5  # (NaN: refused as a file already)
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(hostile))
    with pytest.raises(ReportError, match=r'final\.tiers\["low"\]\.accuracy: expected an '
                                          r"accuracy between 0 and 1, got 1.5"):
        report_files([path], tmp_path / "hostile-report")
