"""Export formats are registered, not listed: a format defined here, in the test, goes through the
same bundle, manifest, runtime, config and CLI paths as ONNX and TFLite."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from coordinator.cli import build_parser
from coordinator.config import ConfigError, load_config
from edge_sdk.agent.config import EdgeConfigError, load_edge_config
from edge_sdk.data import to_tensor
from edge_sdk.models import build_model, model_spec
from edge_sdk.models.layered import DenseLayer
from edge_sdk.runtime import (Predictor, load_manifest, open_backend, register_runtime,
                              runtime_formats, unregister_runtime)
from export import (ExportError, export_bundle, export_formats, register_exporter,
                    unregister_exporter)


@pytest.fixture
def npz_format():
    """A toy format: an MLP's weights in a numpy .npz, run by a numpy forward pass on the edge."""

    @register_runtime("npz")
    class NpzBackend:
        runtime = "numpy"
        version = np.__version__

        def __init__(self, model: bytes, threads: int | None = None):
            with np.load(io.BytesIO(model)) as arrays:
                self.layers = [(arrays[f"w{i}"].astype(np.float32), arrays[f"b{i}"].astype(np.float32),
                                bool(arrays[f"act{i}"])) for i in range(int(arrays["count"]))]

        def run(self, batch: np.ndarray) -> np.ndarray:
            x = np.asarray(batch, np.float32).reshape(len(batch), -1)
            for weight, bias, act in self.layers:
                x = x @ weight.T + bias
                x = np.maximum(x, 0) if act else x
            return x

    def npz_fp16(fp32: bytes, precision: str) -> bytes:
        with np.load(io.BytesIO(fp32)) as arrays:
            halved = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in arrays.items()}
        buffer = io.BytesIO()
        np.savez(buffer, **halved)
        return buffer.getvalue()

    @register_exporter("npz", precisions=("fp32", "fp16"), packages=("numpy",), variant=npz_fp16)
    def export_npz(model: torch.nn.Module, example: torch.Tensor,
                   metadata: dict[str, str] | None = None) -> bytes:
        layers = list(getattr(model, "layers", model))
        if not all(isinstance(layer, DenseLayer) for layer in layers):
            raise ExportError("npz holds fully connected networks only")
        arrays = {"count": np.array(len(layers))}
        for i, layer in enumerate(layers):
            arrays[f"w{i}"] = layer.linear.weight.detach().numpy()
            arrays[f"b{i}"] = layer.linear.bias.detach().numpy()
            arrays[f"act{i}"] = np.array(layer.act)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    yield "npz"
    unregister_exporter("npz")
    unregister_runtime("npz")


@pytest.fixture(scope="module")
def mlp_and_inputs(fmnist):
    spec = model_spec("mlp", (1, 28, 28), 10)
    return build_model(spec, seed=3).eval(), spec, to_tensor(fmnist.test_x[:256], fmnist.info).numpy()


def test_a_registered_format_is_exported_verified_and_run_like_the_built_in_ones(
        npz_format, mlp_and_inputs, fmnist, tmp_path):
    model, spec, x = mlp_and_inputs
    assert export_formats()[:2] == ("onnx", "tflite") and "npz" in export_formats()
    assert "npz" in runtime_formats()
    manifest = export_bundle(model, tmp_path, spec=spec, info=fmnist.info, device_id="toy-1",
                             verify_x=x, verify_y=fmnist.test_y[:256], formats=("npz",),
                             precisions=("fp32", "fp16"))

    assert [(a.format, a.precision, a.path) for a in manifest.artifacts] == [
        ("npz", "fp32", "model-fp32.npz"), ("npz", "fp16", "model-fp16.npz")]
    assert manifest.artifact("npz", "fp32").parity.runtime == "numpy"
    assert manifest.artifact("npz", "fp32").batch is None and "numpy" in manifest.exporters
    assert load_manifest(tmp_path) == manifest  # the manifest validates the format by the registry

    raw = fmnist.test_x[:256]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    fp32 = Predictor.open(tmp_path, fmt="npz")  # the bundle through the runtime registry
    np.testing.assert_allclose(fp32.logits(raw), want, atol=1e-4, rtol=1e-5)
    assert (fp32.classify(raw) == want.argmax(1)).all()
    fp16 = Predictor.open(tmp_path, fmt="npz", precision="fp16")
    assert (fp16.classify(raw) == want.argmax(1)).mean() >= 0.99


def test_a_format_refuses_precisions_it_does_not_have_and_exporters_need_a_runtime(
        npz_format, mlp_and_inputs, fmnist, tmp_path):
    model, spec, x = mlp_and_inputs
    with pytest.raises(ExportError, match="npz has no int8 variant; it exports fp32, fp16"):
        export_bundle(model, tmp_path, spec=spec, info=fmnist.info, device_id="toy-1",
                      verify_x=x, formats=("npz",), precisions=("fp32", "int8"))
    with pytest.raises(ExportError, match="unknown export format 'caffe'; registered formats: "
                                          "onnx, tflite, npz"):
        export_bundle(model, tmp_path, spec=spec, info=fmnist.info, device_id="toy-1",
                      verify_x=x, formats=("caffe",))
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="'caffe' has no edge runtime"):
        register_exporter("caffe")(lambda *args: b"")
    with pytest.raises(ValueError, match="'npz' is already registered"):
        register_exporter("npz")(lambda *args: b"")
    with pytest.raises(ValueError, match="precisions other than fp32 need a variant function"):
        register_exporter("npz", precisions=("fp32", "int8"))(lambda *args: b"")
    with pytest.raises(ValueError, match="must be fp32 and any of fp16, int8"):
        register_exporter("npz", precisions=("int8",))(lambda *args: b"")
    with pytest.raises(ValueError, match="must match"):
        register_runtime("../x")
    with pytest.raises(ValueError, match="unknown artifact format 'caffe'; registered formats: "
                                         "onnx, tflite, npz"):
        open_backend("caffe", b"")


def test_config_and_cli_take_format_names_from_the_registries(npz_format, tmp_path):
    assert load_config(overrides=["export_formats=['onnx', 'npz']"]).export_formats == ["onnx", "npz"]
    assert build_parser().parse_args(["export", "--checkpoint", "c.pt", "--out", "o",
                                      "--format", "npz"]).format == "npz"
    (tmp_path / "edge.toml").write_text('device_id = "pi-1"\nformats = ["npz", "onnx"]\n')
    assert load_edge_config(tmp_path / "edge.toml").formats == ["npz", "onnx"]


def test_an_unregistered_format_is_refused_naming_the_registered_ones(tmp_path, capsys):
    assert "npz" not in export_formats() and "npz" not in runtime_formats()
    with pytest.raises(ConfigError, match=r"export_formats\.1: .*unknown export format 'npz'; "
                                          r"registered formats: onnx, tflite"):
        load_config(overrides=["export_formats=['onnx', 'npz']"])
    (tmp_path / "edge.toml").write_text('device_id = "pi-1"\nformats = ["npz"]\n')
    with pytest.raises(EdgeConfigError, match="formats.0: .*unknown artifact format 'npz'; "
                                              "registered formats: onnx, tflite"):
        load_edge_config(tmp_path / "edge.toml")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--checkpoint", "c.pt", "--out", "o", "--format", "npz"])
    assert re.search(r"invalid choice: 'npz' \(choose from '?onnx'?, '?tflite'?, '?all'?\)",
                     capsys.readouterr().err)


def test_the_registry_loads_without_torch():
    """Config validation and the CLI's choices read it: neither may pay for importing torch."""
    script = ("import sys; sys.modules['torch'] = None\n"
              "from export.formats import export_formats, check_registered\n"
              "assert export_formats() == ('onnx', 'tflite'), export_formats()\n"
              "assert check_registered('tflite') == 'tflite'\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
