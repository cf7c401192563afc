"""A model's own memory record (`<cache>/<digest>.json`): read instead of rehearsing again, fitted
to an upper bound of every rehearsal in it, and refused with the reason and the remedy when it is
not what the planner wrote (a file anyone could have edited)."""

from __future__ import annotations

import json

import pytest
from torch import nn

from coordinator.planning.memory import MemoryCoefficients
from coordinator.planning.model_memory import (
    REHEARSALS,
    ModelMemoryError,
    cache_dir,
    is_builtin,
    memory_model,
    rehearse,
)
from coordinator.planning.planner import PlannerSettings, plan_device
from device_profiles import catalogue_profile
from edge_sdk.models import model_spec, register_model, structure
from edge_sdk.slicing import width_spec

NAME = "test-model-memory-mlp"


@register_model(NAME)
def _mlp(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, num_classes))


class _RefusesRealTensors(nn.Module):
    """Builds and traces (on meta) like any model, fails on the first real batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        if not out.is_meta:
            raise RuntimeError("this network refuses real tensors")
        return out


def refuses_real_tensors(input_shape, num_classes):
    return _RefusesRealTensors()


BASE = model_spec(NAME, (1, 28, 28), 10)
DIGEST = structure(BASE).digest
REFERENCE = MemoryCoefficients.load()


def record(peaks_mb: list[float] | None = None, **changes) -> dict:
    """A record as the planner writes it, for REHEARSALS, floors of 243 MB; peaks in MB."""
    peaks_mb = peaks_mb or [430, 425, 428, 420, 400, 398]
    data = {"format": 1, "digest": DIGEST, "model": NAME, "input_shape": [1, 28, 28],
            "num_classes": 10, "machine": "test", "date": "2026-12-04", "threads": 2,
            "rehearsals": [{"width": w, "physical_batch": b, "dp": dp, "floor_bytes": 243_000_000,
                            "peak_bytes": int(mb * 1e6)}
                           for (w, b, dp), mb in zip(REHEARSALS, peaks_mb)]}
    data.update(changes)
    return data


def write(tmp_path, data) -> None:
    (tmp_path / f"{DIGEST}.json").write_text(data if isinstance(data, str) else json.dumps(data))


def test_builtins_keep_the_shipped_calibration_and_others_do_not():
    assert is_builtin(model_spec("leaf_cnn", (1, 28, 28), 62))
    assert not is_builtin(BASE)
    shipped = memory_model(model_spec("resnet18", (1, 28, 28), 10), REFERENCE, "/nonexistent")
    assert shipped.dp == shipped.plain == REFERENCE


def test_the_cache_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRUNE_MEMORY_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env" and cache_dir(tmp_path / "state") == tmp_path / "state"
    monkeypatch.delenv("FEDPRUNE_MEMORY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fedprune" / "memory"


def test_a_stored_record_is_read_not_rehearsed_again_and_bounds_every_peak(tmp_path):
    """The record's peaks (far above what this small MLP really needs) are what the prediction
    follows: a planner that rehearsed again would predict far less."""
    heavy = [900, 700, 760, 520, 700, 420]
    write(tmp_path, record(heavy))
    memory = memory_model(BASE, REFERENCE, tmp_path)
    assert str(tmp_path) in memory.origin
    for (width, batch, dp), mb in zip(REHEARSALS, heavy):
        standing = mb * 1e6 - 243e6 + REFERENCE.floor_bytes  # on a real rehearsal's floor
        predicted = memory.peak(width_spec(BASE, width), batch, 0, dp)
        assert standing <= predicted < standing * 1.5
    plan = plan_device(catalogue_profile("rpi3b"), BASE, NAME,
                       PlannerSettings(memory_cache=str(tmp_path)), REFERENCE)
    assert plan.predicted_peak_bytes == memory.peak(width_spec(BASE, plan.width_ratio),
                                                    plan.physical_batch_size, 420)
    assert str(tmp_path) in plan.decisions["width"]


def _rehearsal(**changes) -> list[dict]:
    rows = record()["rehearsals"]
    return [{**rows[0], **changes}] + rows[1:]


@pytest.mark.parametrize("content, complaint", ids=[
    "not json", "nan", "infinite", "negative peak", "width over 1", "string number",
    "unknown key", "another structure", "another input", "plain only", "too big"], argvalues=[
    ("{not json", "not valid JSON|cannot be parsed|JSON"),
    (json.dumps(record()).replace('"peak_bytes": 430000000', '"peak_bytes": NaN'), "NaN"),
    (json.dumps(record()).replace("1.0", "1e999", 1), "1e999|overflow|finite|Infinity"),
    (record(rehearsals=_rehearsal(peak_bytes=-5)), "peak_bytes"),
    (record(rehearsals=_rehearsal(width=1.5)), "width"),
    (record(rehearsals=_rehearsal(floor_bytes="243000000")), "floor_bytes"),
    (record(rehearsals=_rehearsal(swap_bytes=1)), "swap_bytes"),
    (record(digest="0123456789abcdef"), "measured for structure 0123456789abcdef"),
    (record(input_shape=[3, 32, 32]), r"input \(3, 32, 32\)"),
    (record(rehearsals=[r for r in record()["rehearsals"] if not r["dp"]]), "too few rehearsals"),
    ('{"format": 1, "pad": "' + "x" * (2 << 20) + '"}', "limit"),
])
def test_a_malformed_record_is_refused_with_the_reason_and_the_remedy(tmp_path, content, complaint):
    write(tmp_path, content)
    with pytest.raises(ModelMemoryError, match=complaint) as caught:
        memory_model(BASE, REFERENCE, tmp_path)
    message = str(caught.value)
    assert str(tmp_path / f"{DIGEST}.json") in message
    assert "delete" in message and "measures the model again" in message


def test_a_model_that_cannot_train_is_a_clear_error_naming_the_rehearsal(tmp_path):
    """The child's own error (its last line) with the model and the configuration, not a
    traceback of the child or a prediction made up without it."""
    broken = model_spec("test_model_memory:refuses_real_tensors", (1, 28, 28), 10)
    with pytest.raises(ModelMemoryError, match=r"rehearsing 'test_model_memory:refuses_real_tensors' "
                       r"at width 1, physical batch 8, DP-SGD failed.*RuntimeError: this network "
                       r"refuses real tensors"):
        rehearse(broken, 1.0, 8, True)
