"""A bundle's manifest cannot make the edge runtime read outside the bundle folder: absolute
paths, `..`, symlinks out of the folder and ONNX external data are refused; FIFOs and devices are
refused without being read; a file is read only if its size is the one the manifest declares.
Every refusal is the runtime's own ManifestError with the reason (issue 22, item 5)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import zstandard
from onnx import TensorProto, helper, numpy_helper

from edge_sdk.runtime import ArtifactEntry, BundleManifest, ManifestError, Parity, Predictor

WEIGHTS = np.arange(8, dtype=np.float32).reshape(4, 2)


def tiny_model() -> onnx.ModelProto:
    """Flatten (N, 1, 2, 2) and multiply by a 4x2 weight: two logits, a real ONNX model."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(WEIGHTS, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def with_external_weights(folder: Path, location: str) -> bytes:
    """The tiny model saved by onnx with its weight as external data, the reference then
    pointed at `location`; the model file's bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(tiny_model(), folder / "external.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    model = onnx.load(folder / "external.onnx", load_external_data=False)
    (tensor,) = model.graph.initializer
    assert tensor.data_location == TensorProto.EXTERNAL
    next(e for e in tensor.external_data if e.key == "location").value = location
    return model.SerializeToString()


def write_bundle(folder: Path, model: bytes, *, path: str = "model-fp32.onnx",
                 compressed_path: str = "model-fp32.onnx.zst", write_files: bool = True,
                 packed: bytes | None = None) -> Path:
    """A bundle of one ONNX artifact: `model` under `path` and its .zst (or `packed`), the
    manifest naming them with their sizes and `model`'s sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    packed = zstandard.ZstdCompressor().compress(model) if packed is None else packed
    if write_files:
        (folder / path).write_bytes(model)
        (folder / compressed_path).write_bytes(packed)
    entry = ArtifactEntry(format="onnx", precision="fp32", path=path,
                          bytes=len(model),
                          sha256=hashlib.sha256(model).hexdigest(), compressed_path=compressed_path,
                          compressed_bytes=len(packed),
                          parity=Parity(runtime="onnxruntime", runtime_version="1", samples=1,
                                        max_abs_diff=0.0, top1_agreement=1.0))
    BundleManifest(device_id="pi-7", model="tiny", spec={}, spec_digest="x", width_ratio=1.0,
                   dataset="none", input_shape=(1, 2, 2), input_scale=1.0, mean=(0.0,), std=(1.0,),
                   labels=("a", "b"), parameters=8, nonzero_parameters=7, sparsity=0.125,
                   macs_per_sample=8, flops_per_sample=16, exporters={}, created_at="2026-01-01",
                   artifacts=(entry,)).save(folder / "manifest.json")
    return folder


def model_bytes() -> bytes:
    return tiny_model().SerializeToString()


def open_in_a_bounded_process(bundle: Path) -> subprocess.CompletedProcess:
    """Predictor.open(bundle) in a child limited to 1 GiB of address space and 60 s: a reader
    that blocks on a FIFO or reads /dev/zero fails there, not in the test process."""
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
              "from edge_sdk.runtime import ManifestError, Predictor\n"
              "try:\n    Predictor.open(sys.argv[1])\nexcept ManifestError as exc:\n"
              "    print('refused:', exc)\nelse:\n    print('opened')\n")
    return subprocess.run([sys.executable, "-c", script, str(bundle)], capture_output=True,
                          text=True, timeout=60)


def test_a_confined_bundle_opens_from_its_file_or_its_zst(tmp_path):
    bundle = write_bundle(tmp_path / "b", model_bytes())
    raw = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    assert np.allclose(Predictor.open(bundle).logits(raw), raw.reshape(2, 4) @ WEIGHTS)
    (bundle / "model-fp32.onnx").unlink()
    assert Predictor.open(bundle).classify(raw).tolist() == [1, 1]


def test_an_absolute_path_is_refused(tmp_path):
    passwd = Path("/etc/passwd").read_bytes()
    write_bundle(tmp_path / "b", passwd, path="/etc/passwd", write_files=False)
    with pytest.raises(ManifestError, match=r"'/etc/passwd', which resolves to /etc/passwd, "
                                            r"outside the bundle folder"):
        Predictor.open(tmp_path / "b")


def test_a_parent_path_is_refused_even_when_the_file_there_is_the_right_model(tmp_path):
    (tmp_path / "model-fp32.onnx").write_bytes(model_bytes())  # beside the bundle, not in it
    write_bundle(tmp_path / "b", model_bytes(), path="../model-fp32.onnx", write_files=False)
    with pytest.raises(ManifestError, match=r"'\.\./model-fp32\.onnx'.*outside the bundle folder"):
        Predictor.open(tmp_path / "b")


def test_a_symlink_out_of_the_bundle_is_refused(tmp_path):
    (tmp_path / "elsewhere.onnx").write_bytes(model_bytes())
    bundle = write_bundle(tmp_path / "b", model_bytes())
    (bundle / "model-fp32.onnx").unlink()
    (bundle / "model-fp32.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    with pytest.raises(ManifestError, match=r"resolves to .*elsewhere\.onnx, outside the bundle"):
        Predictor.open(bundle)
    (bundle / "model-fp32.onnx").unlink()  # a symlink inside the folder is fine
    (bundle / "real.onnx").write_bytes(model_bytes())
    (bundle / "model-fp32.onnx").symlink_to("real.onnx")
    assert Predictor.open(bundle).format == "onnx"


def test_dev_zero_and_a_fifo_are_refused_without_reading(tmp_path):
    zero = write_bundle(tmp_path / "zero", b"\0" * 64, path="/dev/zero", write_files=False)
    run = open_in_a_bounded_process(zero)
    assert "refused:" in run.stdout and "outside the bundle folder" in run.stdout, run.stderr[-2000:]
    fifo = write_bundle(tmp_path / "fifo", model_bytes())
    (fifo / "model-fp32.onnx").unlink()
    os.mkfifo(fifo / "model-fp32.onnx")  # no writer: opening it to read would block forever
    run = open_in_a_bounded_process(fifo)
    assert "refused:" in run.stdout and "not a regular file" in run.stdout, run.stderr[-2000:]
    (fifo / "manifest.json").rename(fifo / "manifest.saved")
    os.mkfifo(fifo / "manifest.json")
    run = open_in_a_bounded_process(fifo)
    assert "refused:" in run.stdout and "not a regular file" in run.stdout, run.stderr[-2000:]


def test_a_file_of_another_size_than_declared_is_refused_before_it_is_read(tmp_path):
    model = model_bytes()
    bundle = write_bundle(tmp_path / "b", model)
    (bundle / "model-fp32.onnx").write_bytes(model + b"\0" * 10)
    with pytest.raises(ManifestError, match=rf"is {len(model) + 10:,} bytes, the manifest says "
                                            rf"{len(model):,}"):
        Predictor.open(bundle)
    (bundle / "model-fp32.onnx").write_bytes(model[:-1])
    with pytest.raises(ManifestError, match=rf"is {len(model) - 1:,} bytes, the manifest says"):
        Predictor.open(bundle)
    with open(bundle / "model-fp32.onnx", "wb") as file:  # 8 GiB, sparse: never read
        file.truncate(8 << 30)
    run = open_in_a_bounded_process(bundle)
    assert f"is {8 << 30:,} bytes, the manifest says" in run.stdout, run.stderr[-2000:]


def test_a_zst_that_unpacks_to_more_than_declared_is_refused(tmp_path):
    model = model_bytes()
    bomb = zstandard.ZstdCompressor().compress(model + b"\0" * (64 << 20))
    bundle = write_bundle(tmp_path / "b", model, packed=bomb)
    (bundle / "model-fp32.onnx").unlink()
    with pytest.raises(ManifestError, match=rf"decompresses to more than {len(model):,} bytes"):
        Predictor.open(bundle)


@pytest.mark.parametrize("location, where", [("weights.bin", "the working directory"),
                                             ("../weights.bin", "beside the bundle"),
                                             ("/etc/passwd", "an absolute path"),
                                             ("inside.bin", "inside the bundle, unhashed")])
def test_onnx_external_data_is_refused(tmp_path, monkeypatch, location, where):
    """The manifest's sha256 covers the model file only, so an artifact is one self-contained
    file: external data (which onnxruntime resolved against the working directory) is refused
    wherever it points."""
    model = with_external_weights(tmp_path / "scratch", location)
    weights = WEIGHTS.tobytes()
    for folder in (tmp_path / "cwd", tmp_path):  # the weights where the old code found them
        folder.mkdir(exist_ok=True)
        (folder / "weights.bin").write_bytes(weights)
    bundle = write_bundle(tmp_path / "b", model)
    (bundle / "inside.bin").write_bytes(weights)
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(ManifestError, match="external data is refused"):
        Predictor.open(bundle)
