"""Export bundles: parity in onnxruntime and ai-edge-litert, metadata, width, refusal, CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import zstandard
from ai_edge_litert.interpreter import Interpreter

from coordinator.cli import main
from coordinator.exporting import export_checkpoint, submodel
from edge_sdk.sizing import DevicePlan
from edge_sdk.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from edge_sdk.data import to_tensor
from edge_sdk.models import build_model, model_spec
from edge_sdk.runtime import load_manifest
from export import TOLERANCES, ExportError, Tolerance, export_bundle, to_onnx, to_tflite


@pytest.fixture(scope="module")
def trained(fmnist, tmp_path_factory) -> Checkpoint:
    """A FedP3 CNN trained for one pass over 12,000 images (about 80% test accuracy)."""
    torch.manual_seed(0)
    model = build_model(model_spec("fedp3_cnn", (1, 28, 28), 10), seed=0)
    x, y = to_tensor(fmnist.train_x[:12000], fmnist.info), torch.tensor(fmnist.train_y[:12000])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for start in range(0, len(x), 64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[start:start + 64]), y[start:start + 64]).backward()
        opt.step()
    checkpoint = Checkpoint(model.spec, dict(model.state_dict()), "fedp3_cnn", "fashion-mnist",
                            round=7)
    checkpoint.save(tmp_path_factory.mktemp("ckpt") / "global.pt")
    return checkpoint


@pytest.fixture(scope="module")
def full_bundle(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    export_checkpoint(trained, out, precisions=("fp32", "fp16", "int8"), device_id="pi-12")
    return out


def _plan(width: float, tmp_path) -> DevicePlan:
    plan = DevicePlan(device_id="tiny-gw", model="fedp3_cnn", width_ratio=width, slicing="magnitude",
                      batch_size=48, physical_batch_size=8, local_steps=1, local_samples=48,
                      parameters=1, predicted_peak_bytes=1, memory_limit_bytes=1, download_bytes=1,
                      upload_bytes=1, transfer_seconds=0, compute_seconds=0, deadline_seconds=60,
                      fits=True)
    plan.save(tmp_path / "plan.json")
    return plan


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def test_plain_runtimes_classify_the_test_set_as_accurately_as_torch(trained, full_bundle, fmnist):
    """Sessions that know nothing of fedprune, on all 10,000 Fashion-MNIST test images."""
    x = to_tensor(fmnist.test_x, fmnist.info).numpy()
    y = np.asarray(fmnist.test_y)
    with torch.no_grad():
        reference = _accuracy(trained.build()(torch.from_numpy(x)).numpy(), y)
    assert reference > 0.70  # it learned: chance is 0.10

    session = ort.InferenceSession(str(full_bundle / "model-fp32.onnx"))
    onnx_fp32 = _accuracy(session.run(None, {"input": x})[0], y)
    int8 = _accuracy(ort.InferenceSession(str(full_bundle / "model-int8.onnx")).run(None, {"input": x})[0], y)

    interpreter = Interpreter(model_path=str(full_bundle / "model-fp32.tflite"))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    logits = []
    for image in x[:2000]:
        interpreter.set_tensor(inp, image[None])
        interpreter.invoke()
        logits.append(interpreter.get_tensor(out)[0].copy())
    with torch.no_grad():
        reference_2k = _accuracy(trained.build()(torch.from_numpy(x[:2000])).numpy(), y[:2000])

    assert abs(onnx_fp32 - reference) <= 0.001
    assert abs(_accuracy(np.stack(logits), y[:2000]) - reference_2k) <= 0.001
    assert abs(int8 - reference) <= 0.01  # the aim: int8 within 1 point of fp32


def test_manifest_records_contract_provenance_and_parity(trained, full_bundle, fmnist):
    manifest = load_manifest(full_bundle)
    assert manifest.device_id == "pi-12" and manifest.round == 7
    assert manifest.checkpoint_sha256 == trained.sha256
    assert manifest.spec_digest == trained.spec.digest()
    assert manifest.input_shape == (1, 28, 28) and manifest.input_scale == 255.0
    assert manifest.mean == fmnist.info.mean and manifest.labels == fmnist.info.labels
    assert manifest.parameters == 1_258_798 and manifest.flops_per_sample == 2 * 1_389_824
    assert {"torch", "onnxruntime", "litert-torch", "ai-edge-litert"} <= set(manifest.exporters)
    assert {(a.format, a.precision) for a in manifest.artifacts} == {
        (f, p) for f in ("onnx", "tflite") for p in ("fp32", "fp16", "int8")}
    for entry in manifest.artifacts:
        data = (full_bundle / entry.path).read_bytes()
        assert len(data) == entry.bytes and hashlib.sha256(data).hexdigest() == entry.sha256
        packed = (full_bundle / entry.compressed_path).read_bytes()
        assert len(packed) == entry.compressed_bytes
        assert zstandard.ZstdDecompressor().decompress(packed) == data
        assert entry.parity.samples == 512
        assert entry.parity.max_abs_diff <= TOLERANCES[entry.precision].bound(np.array([30.0]))
        assert entry.parity.top1_agreement >= TOLERANCES[entry.precision].min_top1
    fp32, int8 = manifest.artifact("onnx", "fp32"), manifest.artifact("onnx", "int8")
    assert int8.bytes < 0.3 * fp32.bytes
    assert fp32.parity.max_abs_diff < 1e-4 and fp32.batch is None and fp32.opset == 18
    assert manifest.artifact("tflite", "fp32").batch == 1


def test_onnx_file_carries_the_metadata_inside(full_bundle):
    props = {p.key: p.value for p in onnx.load(str(full_bundle / "model-fp32.onnx")).metadata_props}
    assert props["device_id"] == "pi-12" and json.loads(props["round"]) == 7
    assert json.loads(props["input_shape"]) == [1, 28, 28] and json.loads(props["input_scale"]) == 255.0
    assert json.loads(props["labels"])[0] == "T-shirt/top"
    assert len(props["checkpoint_sha256"]) == 64
    int8_props = {p.key for p in onnx.load(str(full_bundle / "model-int8.onnx")).metadata_props}
    assert {"device_id", "spec_digest", "sparsity"} <= int8_props


def test_width_pruned_export_is_physically_smaller_and_cheaper(trained, full_bundle, tmp_path):
    plan = _plan(0.5, tmp_path)
    manifest = export_checkpoint(trained, tmp_path / "half", plan=plan)
    full = load_manifest(full_bundle)
    assert manifest.device_id == "tiny-gw" and manifest.width_ratio == 0.5
    assert manifest.parameters < 0.3 * full.parameters
    assert manifest.flops_per_sample < 0.3 * full.flops_per_sample
    for fmt in ("onnx", "tflite"):
        assert manifest.artifact(fmt, "fp32").bytes < 0.3 * full.artifact(fmt, "fp32").bytes
        assert manifest.artifact(fmt, "fp32").parity.top1_agreement >= 0.998


def test_masked_zeros_are_baked_in_and_stored_compressed(trained, fmnist, tmp_path):
    model = trained.build()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p[p.abs() < p.abs().flatten().kthvalue(int(0.9 * p.numel())).values] = 0
    x = to_tensor(fmnist.test_x[:64], fmnist.info).numpy()
    manifest = export_bundle(model, tmp_path, model_name="fedp3_cnn", info=fmnist.info,
                             device_id="sparse", verify_x=x, formats=("onnx",))
    entry = manifest.artifact("onnx", "fp32")
    assert 0.85 < manifest.sparsity < 0.95
    assert entry.compressed_bytes < 0.35 * entry.bytes


def test_an_artifact_outside_tolerance_is_refused_naming_the_layer(trained, fmnist, tmp_path, monkeypatch):
    monkeypatch.setitem(TOLERANCES, "fp32", Tolerance(atol=0.0, rtol=0.0, min_top1=1.0))
    x = to_tensor(fmnist.test_x[:32], fmnist.info).numpy()
    (tmp_path / "manifest.json").write_text("previous bundle")
    with pytest.raises(ExportError, match=r"onnx/fp32 export of dev-3 disagrees with torch.*"
                                          r"first layer that departs from torch: layers\.\d"):
        export_bundle(trained.build(), tmp_path, model_name="fedp3_cnn", info=fmnist.info,
                      device_id="dev-3", verify_x=x, formats=("onnx",))
    # Nothing published, nothing half-written; the previous bundle is untouched.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    assert (tmp_path / "manifest.json").read_text() == "previous bundle"


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: no static graph exists
            return x.flatten(1)[:, :10]
        return -x.flatten(1)[:, :10]


@pytest.mark.parametrize("convert", [to_onnx, to_tflite], ids=["onnx", "tflite"])
def test_a_model_that_cannot_be_exported_fails_with_a_clear_message(convert):
    with pytest.raises(ExportError, match="could not (export|convert) _DataDependent"):
        convert(_DataDependent(), torch.randn(1, 1, 28, 28))


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
    assert abs(report["accuracy"] - _accuracy(logits, np.asarray(fmnist.test_y[:500]))) <= 0.002
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


def test_cli_export_with_a_plan_writes_bundle_and_manifest(trained, tmp_path, capsys):
    _plan(0.25, tmp_path)
    checkpoint_path = tmp_path / "global.pt"
    trained.save(checkpoint_path)
    code = main(["export", "--checkpoint", str(checkpoint_path), "--plan", str(tmp_path / "plan.json"),
                 "--format", "onnx", "--quantize", "int8", "--out", str(tmp_path / "out"),
                 "--verify-samples", "128"])
    assert code == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest.width_ratio == 0.25 and manifest.checkpoint_sha256 == load_checkpoint(checkpoint_path).sha256
    assert [(a.format, a.precision) for a in manifest.artifacts] == [("onnx", "fp32"), ("onnx", "int8")]
    assert "model-int8.onnx" in capsys.readouterr().out


def test_cli_export_of_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    assert main(["export", "--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable torch checkpoint" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(2)}, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match="not a fedprune checkpoint"):
        load_checkpoint(tmp_path / "y.pt")


def test_a_sliced_checkpoint_cannot_be_sliced_again(trained):
    half = submodel(trained, 0.5)
    checkpoint = Checkpoint(half.spec, dict(half.state_dict()), "fedp3_cnn", "fashion-mnist",
                            width_ratio=0.5)
    with pytest.raises(CheckpointError, match="from the global checkpoint"):
        submodel(checkpoint, 0.25)


def test_simulate_exports_every_clients_final_model(tmp_path):
    out = tmp_path / "exports"
    code = main(["simulate", "--clients", "3", "--rounds", "1", "--fraction", "0.67", "--quiet",
                 "--strategy", "fedp3", "--set", "max_client_samples=240", "--set",
                 "export_formats=['onnx']", "--export-dir", str(out), "--json-out",
                 str(tmp_path / "r.json")])
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert sorted(e["client"] for e in result["exports"]) == [0, 1, 2]
    assert {e["source"] for e in result["exports"]} == {"personalized", "global"}
    for entry in result["exports"]:
        manifest = load_manifest(entry["dir"])
        assert manifest.device_id == f"client-{entry['client']:03d}" and manifest.round == 1
        checkpoint = load_checkpoint(f"{entry['dir']}/checkpoint.pt")
        assert manifest.checkpoint_sha256 == checkpoint.sha256
        assert manifest.artifact("onnx", "fp32").parity.top1_agreement >= 0.998
    assert (out / "global" / "checkpoint.pt").exists()
