"""What an export bundle holds: a manifest recording the input contract, provenance (device,
round, checkpoint), exporters and each artifact's size, hash, compressed form and measured parity;
the same metadata inside the ONNX file; a width-pruned export physically smaller and cheaper; and
masked zeros baked in and compressed away."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import torch
import zstandard

from coordinator.exporting import export_checkpoint
from edge_sdk.data import to_tensor
from edge_sdk.runtime import load_manifest
from export import TOLERANCES, export_bundle
from harness.exports import device_plan


def test_the_manifest_records_contract_provenance_and_parity(trained, full_bundle, fmnist):
    manifest = load_manifest(full_bundle)
    assert manifest.device_id == "pi-12" and manifest.round == 7
    assert manifest.checkpoint_sha256 == trained.sha256
    assert manifest.spec_digest == trained.spec.digest()
    assert manifest.input_shape == (1, 28, 28) and manifest.input_layout == "NCHW"
    assert manifest.input_scale == 255.0 and manifest.dataset == "fashion-mnist"
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


def test_the_onnx_file_carries_the_metadata_inside(full_bundle):
    props = {p.key: p.value for p in onnx.load(str(full_bundle / "model-fp32.onnx")).metadata_props}
    assert props["device_id"] == "pi-12" and json.loads(props["round"]) == 7
    assert json.loads(props["input_shape"]) == [1, 28, 28] and json.loads(props["input_scale"]) == 255.0
    assert json.loads(props["labels"])[0] == "T-shirt/top"
    assert len(props["checkpoint_sha256"]) == 64
    int8_props = {p.key for p in onnx.load(str(full_bundle / "model-int8.onnx")).metadata_props}
    assert {"device_id", "spec_digest", "sparsity"} <= int8_props


def test_a_width_pruned_export_is_physically_smaller_and_cheaper(trained, full_bundle, tmp_path):
    plan = device_plan(0.5, tmp_path)
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
    manifest = export_bundle(model, tmp_path, spec=trained.spec, info=fmnist.info,
                             device_id="sparse", verify_x=x, formats=("onnx",))
    entry = manifest.artifact("onnx", "fp32")
    assert 0.85 < manifest.sparsity < 0.95
    assert entry.compressed_bytes < 0.35 * entry.bytes
