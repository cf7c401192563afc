"""The edge runtime on a shipped bundle: it predicts from raw uint8 pixels without torch (only
the compressed artifact on the device, ONNX or TFLite) as accurately as torch, and refuses an
artifact whose bytes were altered."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from edge_sdk.data import to_tensor
from edge_sdk.runtime import load_manifest
from harness.exports import accuracy


EDGE_SCRIPT = """
import sys, json
sys.modules["torch"] = None  # any import of torch now fails
import gzip
import numpy as np
from edge_sdk.runtime import Predictor
bundle, fmt, images, labels = sys.argv[1:5]
x = np.frombuffer(gzip.open(images).read(), np.uint8, offset=16).reshape(-1, 28, 28)[:500]
y = np.frombuffer(gzip.open(labels).read(), np.uint8, offset=8)[:500]
predictor = Predictor.open(bundle, fmt=fmt)
predicted = predictor.classify(x)  # raw uint8 pixels: the predictor applies the contract
print(json.dumps({"accuracy": float((predicted == y).mean()), "label": predictor.manifest.labels[int(predicted[0])],
                  "torch_loaded": "torch" in sys.modules and sys.modules["torch"] is not None}))
"""


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_edge_runtime_predicts_from_raw_pixels_without_torch(full_bundle, fmnist, trained, fmt, tmp_path):
    import shutil

    from edge_sdk.data import resolve_data_dir
    root = resolve_data_dir(None) / "fashion-mnist"
    images, labels = root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"
    bundle = tmp_path / "shipped"
    shutil.copytree(full_bundle, bundle)
    (bundle / f"model-fp32.{fmt}").unlink()  # only the shipped .zst is on the device
    run = subprocess.run([sys.executable, "-c", EDGE_SCRIPT, str(bundle), fmt, str(images), str(labels)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        logits = trained.build()(to_tensor(fmnist.test_x[:500], fmnist.info)).numpy()
    assert abs(report["accuracy"] - accuracy(logits, np.asarray(fmnist.test_y[:500]))) <= 0.002
    assert report["label"] in fmnist.info.labels and not report["torch_loaded"]


def test_edge_runtime_refuses_a_tampered_artifact(full_bundle, tmp_path):
    import shutil

    from edge_sdk.runtime import ManifestError, Predictor
    bundle = tmp_path / "b"
    shutil.copytree(full_bundle, bundle)
    data = bytearray((bundle / "model-fp32.onnx").read_bytes())
    data[-100] ^= 0xFF
    (bundle / "model-fp32.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="corrupt or replaced"):
        Predictor.open(bundle, fmt="onnx")
    with pytest.raises(ManifestError, match="no tflite/bf16"):
        load_manifest(bundle).artifact("tflite", "bf16")


def test_the_contract_normalises_inputs_of_any_rank_the_model_takes():
    """Images with or without their single channel, tabular rows, multi-channel signals; one
    sample or a batch; standardised along a sample's first axis only where stats are given."""
    from edge_sdk.runtime import normalise

    pixels = np.full((5, 28, 28), 255, np.uint8)
    images = normalise(pixels, (1, 28, 28), 255.0, (0.5,), (0.25,))
    assert images.shape == (5, 1, 28, 28) and images.dtype == np.float32 and np.all(images == 2.0)
    assert normalise(pixels[0], (1, 28, 28), 255.0, (0.5,), (0.25,)).shape == (1, 1, 28, 28)
    assert np.array_equal(normalise(pixels[:, None], (1, 28, 28), 255.0, (0.5,), (0.25,)), images)
    rows = np.arange(60, dtype=np.float64).reshape(2, 30)
    np.testing.assert_array_equal(normalise(rows, (30,)), rows.astype(np.float32))  # no contract
    standardised = normalise(rows, (30,), None, rows.mean(0), np.full(30, 2.0))
    np.testing.assert_allclose(standardised[:, 0], [-7.5, 7.5])
    assert normalise(rows[0], (30,)).shape == (1, 30)
    signal = normalise(np.ones((4, 2, 10)), (2, 10), 2.0, (0.0, 1.0), (1.0, 0.5))
    assert np.all(signal[:, 0] == 0.5) and np.all(signal[:, 1] == -1.0)
    with pytest.raises(ValueError, match=r"input has shape \(2, 31\); this model takes \(N, 30\)"):
        normalise(np.ones((2, 31)), (30,))
    with pytest.raises(ValueError, match=r"takes \(N, 2, 10\) or one such sample"):
        normalise(np.ones((4, 10)), (2, 10))  # a two-channel signal needs both channels


MANIFEST = {
    "device_id": "pi-7", "round": 3, "model": "fedp3_cnn",
    "spec": {"name": "fedp3_cnn", "input_shape": [1, 28, 28], "num_classes": 2},
    "spec_digest": "abc", "width_ratio": 0.5, "dataset": "fashion-mnist",
    "input_shape": [1, 28, 28], "input_layout": "NCHW", "input_scale": 255.0, "mean": [0.28],
    "std": [0.35], "labels": ["a", "b"], "parameters": 10, "nonzero_parameters": 8,
    "sparsity": 0.2, "macs_per_sample": 100, "flops_per_sample": 200,
    "exporters": {"torch": "2"}, "created_at": "2026-01-01T00:00:00Z",
}


def test_manifests_of_before_any_rank_and_without_a_dataset_validate(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps(MANIFEST))  # what exports wrote before any-rank contracts
    assert load_manifest(old).input_layout == "NCHW"
    tabular = {**MANIFEST, "spec": {"name": "t", "input_shape": [30], "num_classes": 2},
               "input_shape": [30], "dataset": None, "input_scale": None, "mean": None,
               "std": None, "labels": []}
    del tabular["input_layout"]  # a manifest that leaves it out has its rank's layout
    (tmp_path / "tabular.json").write_text(json.dumps(tabular))
    manifest = load_manifest(tmp_path / "tabular.json")
    assert manifest.input_shape == (30,) and manifest.input_layout == "NF" and manifest.mean is None


@pytest.mark.parametrize("change, problem", [
    ({"input_layout": "NF"}, "input_layout NF does not fit input_shape"),
    ({"input_shape": [1, 28, 28, 1, 1]}, "input_shape"),
    ({"input_shape": [0, 28, 28], "spec": {}}, "must be positive sizes"),
    ({"input_shape": [9000, 9000, 3], "spec": {}}, "at most 67,108,864 elements"),
    ({"mean": [0.1, 0.2]}, "mean and std need one value, or one per entry"),
    ({"std": None}, "mean and std come together"),
    ({"std": [0.0]}, "every std must be positive"),
    ({"input_shape": [3, 28, 28]}, r"is not the spec's input_shape \[1, 28, 28\]"),
    ({"labels": ["a", "b", "c"]}, "3 labels for a model of 2 classes"),
    ({"input_scale": -1}, "input_scale"),
])
def test_a_manifest_whose_contract_does_not_hold_together_is_refused(tmp_path, change, problem):
    from edge_sdk.runtime import ManifestError

    (tmp_path / "manifest.json").write_text(json.dumps({**MANIFEST, **change}))
    with pytest.raises(ManifestError, match=f"not a fedprune bundle manifest: .*{problem}"):
        load_manifest(tmp_path)
