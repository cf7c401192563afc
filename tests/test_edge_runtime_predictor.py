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
