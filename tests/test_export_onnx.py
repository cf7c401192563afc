"""ONNX export: parity with torch on real images, metadata, dynamic batch, refusal."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edge_sdk.data import to_tensor
from edge_sdk.models import build_model, model_spec
from edge_sdk.slicing import extract, select_channels, slice_map, width_spec
from export import ExportError, export_onnx


@pytest.fixture(scope="module")
def test_images(fmnist):
    return to_tensor(fmnist.test_x[:256], fmnist.info), fmnist.test_y[:256]


def _trained_submodel(name: str, width: float) -> torch.nn.Module:
    base = model_spec(name, (1, 28, 28), 10)
    full = build_model(base, seed=3)
    if width == 1.0:
        return full
    state = {k: v.detach().numpy() for k, v in full.state_dict().items()}
    smap = slice_map(base, select_channels(base, state, width, "magnitude"))
    sub = build_model(width_spec(base, width))
    sub.load_state_dict({k: torch.from_numpy(v) for k, v in extract(state, smap).items()})
    return sub


@pytest.mark.parametrize("name, width", [("fedp3_cnn", 1.0), ("fedp3_cnn", 0.5), ("mlp", 0.25)])
def test_exported_model_matches_torch_in_a_plain_onnxruntime_session(tmp_path, test_images, name, width):
    model = _trained_submodel(name, width).eval()
    images, _ = test_images
    artifact = export_onnx(model, tmp_path / "model.onnx", images,
                           metadata={"device_id": "dev-7", "width_ratio": str(width)})
    assert artifact.max_abs_diff <= 1e-4 and artifact.top1_agreement == 1.0
    assert artifact.verified_on == 256 and artifact.bytes == (tmp_path / "model.onnx").stat().st_size
    # A session that knows nothing of fedprune, at batch sizes other than the example's.
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    for batch in (1, 37):
        logits = session.run(None, {"input": images[:batch].numpy()})[0]
        with torch.no_grad():
            expected = model(images[:batch]).numpy()
        assert logits.shape == (batch, 10)
        assert np.array_equal(logits.argmax(1), expected.argmax(1))


def test_metadata_travels_inside_the_file(tmp_path, test_images):
    model = _trained_submodel("fedp3_cnn", 0.5)
    export_onnx(model, tmp_path / "m.onnx", test_images[0][:16],
                metadata={"device_id": "pi-12", "round": "4", "input_scale": "255.0"})
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props == {"device_id": "pi-12", "round": "4", "input_scale": "255.0"}


def test_smaller_width_gives_a_physically_smaller_file(tmp_path, test_images):
    sizes = [export_onnx(_trained_submodel("fedp3_cnn", w), tmp_path / f"{w}.onnx",
                         test_images[0][:8]).bytes for w in (1.0, 0.5, 0.25)]
    assert sizes[0] > 3 * sizes[1] > 3 * 3 * sizes[2] * 0.9


def test_an_export_outside_tolerance_is_refused_and_not_left_behind(tmp_path, test_images):
    with pytest.raises(ExportError, match="disagrees with torch"):
        export_onnx(_trained_submodel("fedp3_cnn", 1.0), tmp_path / "m.onnx", test_images[0][:32],
                    tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []
