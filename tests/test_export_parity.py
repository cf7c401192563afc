"""An exported model computes what torch computes, or is not published: plain onnxruntime and
ai-edge-litert sessions classify the Fashion-MNIST test set as accurately as torch (int8 within a
point); an artifact outside its tolerance is refused naming the first layer that departs, leaving
the previous bundle untouched; a model with no static graph fails with a clear message."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from ai_edge_litert.interpreter import Interpreter

from edge_sdk.data import to_tensor
from export import TOLERANCES, ExportError, Tolerance, export_bundle, to_onnx, to_tflite
from harness.exports import accuracy


def test_plain_runtimes_classify_the_test_set_as_accurately_as_torch(trained, full_bundle, fmnist):
    """Sessions that know nothing of fedprune, on all 10,000 Fashion-MNIST test images."""
    x = to_tensor(fmnist.test_x, fmnist.info).numpy()
    y = np.asarray(fmnist.test_y)
    with torch.no_grad():
        reference = accuracy(trained.build()(torch.from_numpy(x)).numpy(), y)
    assert reference > 0.70  # it learned: chance is 0.10

    session = ort.InferenceSession(str(full_bundle / "model-fp32.onnx"))
    onnx_fp32 = accuracy(session.run(None, {"input": x})[0], y)
    int8 = accuracy(ort.InferenceSession(str(full_bundle / "model-int8.onnx")).run(None, {"input": x})[0], y)

    interpreter = Interpreter(model_path=str(full_bundle / "model-fp32.tflite"))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    logits = []
    for image in x[:2000]:
        interpreter.set_tensor(inp, image[None])
        interpreter.invoke()
        logits.append(interpreter.get_tensor(out)[0].copy())
    with torch.no_grad():
        reference_2k = accuracy(trained.build()(torch.from_numpy(x[:2000])).numpy(), y[:2000])

    assert abs(onnx_fp32 - reference) <= 0.001
    assert abs(accuracy(np.stack(logits), y[:2000]) - reference_2k) <= 0.001
    assert abs(int8 - reference) <= 0.01  # the aim: int8 within 1 point of fp32


def test_an_artifact_outside_tolerance_is_refused_naming_the_layer(trained, fmnist, tmp_path, monkeypatch):
    monkeypatch.setitem(TOLERANCES, "fp32", Tolerance(atol=0.0, rtol=0.0, min_top1=1.0))
    x = to_tensor(fmnist.test_x[:32], fmnist.info).numpy()
    (tmp_path / "manifest.json").write_text("previous bundle")
    with pytest.raises(ExportError, match=r"onnx/fp32 export of dev-3 disagrees with torch.*"
                                          r"first layer that departs from torch: layers\.\d"):
        export_bundle(trained.build(), tmp_path, spec=trained.spec, info=fmnist.info,
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
