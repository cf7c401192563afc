"""The memory calibration: a missing or malformed file is an error, never silent defaults, and
the stored coefficients predict an upper bound of every peak the calibration measured."""

from __future__ import annotations

import json
import shutil

import pytest

from coordinator.planning.memory import (
    CALIBRATION_FILE,
    CalibrationError,
    MemoryCoefficients,
    predict_peak_bytes,
)
from edge_sdk.models import model_spec
from edge_sdk.slicing import width_spec


def stored() -> dict:
    return json.loads(CALIBRATION_FILE.read_text())


def test_a_missing_calibration_is_an_error_that_says_what_to_do(tmp_path):
    missing = tmp_path / "memory_calibration.json"
    with pytest.raises(CalibrationError) as caught:
        MemoryCoefficients.load(missing)
    message = str(caught.value)
    assert str(missing) in message and "missing" in message
    assert "reinstall fedprune" in message and "benchmarks/calibrate_memory.py" in message


def coefficients_with(**changes) -> str:
    """The shipped coefficients as JSON with some keys changed (None: left out)."""
    data = {**stored(), **changes}
    return json.dumps({k: v for k, v in data.items() if v is not None})


@pytest.mark.parametrize("content, complaint", ids=[
    "not json", "not an object", "term left out", "nan", "infinity", "negative", "string",
    "fraction over 1", "unknown term", "negative floor"], argvalues=[
    ("{not json", "cannot be read"),
    ("[1, 2]", "not a JSON object"),
    (coefficients_with(bytes_per_parameter=None), "bytes_per_parameter"),  # a term left out
    (coefficients_with(baseline_bytes=float("nan")), "baseline_bytes"),
    (coefficients_with(margin_bytes=float("inf")), "margin_bytes"),
    (coefficients_with(activation_factor=-1.0), "activation_factor"),
    (coefficients_with(bytes_per_parameter="41"), "bytes_per_parameter"),  # a string
    (coefficients_with(retained_fraction=1.5), "retained_fraction"),       # a fraction over 1
    (coefficients_with(extra_term=3.0), "extra_term"),                     # a term the formula lacks
    (coefficients_with(floor_bytes=-1.0), "floor_bytes"),
])
def test_a_malformed_calibration_is_refused_with_the_reason(tmp_path, content, complaint):
    path = tmp_path / "memory_calibration.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=complaint) as caught:
        MemoryCoefficients.load(path)
    assert str(path) in str(caught.value)


def test_the_shipped_calibration_loads_with_its_margin(tmp_path):
    copy = tmp_path / "copy.json"
    shutil.copy(CALIBRATION_FILE, copy)
    assert MemoryCoefficients.load(copy) == MemoryCoefficients.load()
    coefficients = MemoryCoefficients.load()
    assert coefficients.margin_bytes > 0 or coefficients.margin_fraction > 0
    record = stored()["calibration"]
    assert {"command", "machine", "date", "points", "off_grid"} <= set(record)


def test_every_calibration_peak_is_within_the_prediction():
    """The upper bound holds for every fresh rehearsal the calibration measured (on the grid and
    off it), and each repeated point was rehearsed at least 20 times."""
    record = stored()["calibration"]
    coefficients = MemoryCoefficients.load()
    repeated = 0
    for row in record["points"] + record["off_grid"]:
        spec = width_spec(model_spec(row["model"], (1, 28, 28), 10), row["width"])
        predicted = predict_peak_bytes(spec, row["physical_batch"], row["local_samples"], coefficients)
        over = [peak for peak in row["peaks"] if peak > predicted]
        assert not over, (row["model"], row["width"], row["physical_batch"], over, predicted)
        repeated += len(row["peaks"]) >= 20
    assert repeated >= 5 and record["off_grid"]


def test_the_floor_a_models_own_calibration_stands_on_is_the_highest_measured():
    """floor_bytes (a rehearsal's process with Fashion-MNIST loaded, before any model) is what a
    model calibrated on random inputs is predicted on: the highest floor of every rehearsal."""
    record = stored()["calibration"]
    rows = record["points"] + record["off_grid"]
    floors = [floor for row in rows for floor in row["floors"]]
    assert len(floors) == sum(len(row["peaks"]) for row in rows)
    assert 200e6 < min(floors) and max(floors) <= MemoryCoefficients.load().floor_bytes < max(floors) + 1e6
