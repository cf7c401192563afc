"""Any registered model exports with parity, not only the built-in layer lists: a MobileNetV2-style
network written as a user would (inverted residuals, depthwise convs, BatchNorm that Opacus's fix
turns into GroupNorm) at full and half width, and a Conv1d network on tabular features, pass in
onnxruntime and ai-edge-litert; the manifest's input contract is the model's own (its spec's
shape, any rank), with the normalisation only where a dataset gives one. A parity failure names
the layer of such a network that departs; a FedDP-gated submodel exports to ONNX and TFLite with
parity (its gates count instead of sorting while exported: TFLite has no sort).

Real data that ships with scikit-learn: the handwritten digits (8x8, scaled to 16x16) and the
Wisconsin breast cancer table (30 features).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from torch import nn

from coordinator.slicing import width_slice
from edge_sdk.data import DatasetInfo
from edge_sdk.models import build_model, model_spec
from edge_sdk.models.network import structure
from edge_sdk.models.registry import register_model
from edge_sdk.runtime import Predictor, load_manifest, register_runtime, unregister_runtime
from edge_sdk.runtime.backends import OnnxBackend
from export import (TOLERANCES, ExportError, export_bundle, register_exporter, to_onnx,
                    unregister_exporter)
from harness.models import InvertedResidual, conv_bn  # MobileNetV2's blocks


class MobileNetV2(nn.Module):
    """A small MobileNetV2 (Sandler et al., 2018): every block kind, the residual add included."""

    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2))  # expansion, out, blocks, first stride

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        cin, blocks = 16, [conv_bn(in_channels, 16, 3)]
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        blocks.append(conv_bn(cin, 48, 1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(48, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class SignalNet(nn.Module):
    """A Conv1d network with a residual block, on a (features,) row read as a one-channel signal."""

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
                                   nn.Conv1d(8, 8, 3, padding=1))
        self.pool = nn.AdaptiveAvgPool1d(4)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x.unsqueeze(1))
        x = torch.relu(x + self.block(x))
        return self.head(self.pool(x).flatten(1))


register_model("test_mobilenet_v2")(lambda input_shape, num_classes: MobileNetV2(input_shape[0],
                                                                                  num_classes))
register_model("test_signal_net")(lambda input_shape, num_classes: SignalNet(input_shape[0],
                                                                             num_classes))


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """Raw 16x16 grey digits (values 0 to 16), as a sensor would give them: (N, 16, 16)."""
    images = load_digits().images.astype(np.float32)
    return np.kron(images, np.ones((1, 2, 2), np.float32))


@pytest.fixture(scope="module")
def mobilenet():
    spec = model_spec("test_mobilenet_v2", (1, 16, 16), 10)
    return spec, build_model(spec, seed=0).eval()


def _at_width(spec, model, ratio: float):
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cut = width_slice(spec, state, ratio, "magnitude")
    sliced = build_model(cut.spec)
    sliced.load_state_dict({k: torch.from_numpy(v) for k, v in cut.state.items()})
    return cut.spec, sliced.eval()


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_a_mobilenet_exports_at_each_width_with_parity_in_both_runtimes(
        mobilenet, digits, ratio, tmp_path):
    spec, model = mobilenet
    assert any("BatchNorm" in fixed for fixed in structure(spec).fixed)  # Opacus's fix ran
    if ratio < 1.0:
        spec, model = _at_width(spec, model, ratio)
    x = digits[:, None]  # the model's own contract: (N, 1, 16, 16), no normalisation
    manifest = export_bundle(model, tmp_path, spec=spec, device_id=f"w{ratio:g}",
                             verify_x=x[:128], width_ratio=ratio)

    assert manifest.input_shape == (1, 16, 16) and manifest.input_layout == "NCHW"
    assert manifest.dataset is None and manifest.input_scale is None and manifest.mean is None
    assert manifest.labels == () and manifest.spec == spec.to_dict()
    assert manifest.parameters == sum(p.numel() for p in model.parameters())
    for fmt in ("onnx", "tflite"):
        parity = manifest.artifact(fmt, "fp32").parity
        assert parity.samples == 128 and parity.top1_agreement >= TOLERANCES["fp32"].min_top1
    # Held-out digits, through the predictor from raw (N, 16, 16) images and a plain session.
    with torch.no_grad():
        want = model(torch.from_numpy(x[1000:1400])).numpy()
    bound = TOLERANCES["fp32"].bound(want)
    for fmt in ("onnx", "tflite"):
        assert np.abs(Predictor.open(tmp_path, fmt=fmt).logits(digits[1000:1400]) - want).max() <= bound
    session = ort.InferenceSession(str(tmp_path / "model-fp32.onnx"))
    assert np.abs(session.run(None, {"input": x[1000:1400]})[0] - want).max() <= bound
    if ratio < 1.0:
        full = sum(p.numel() for p in mobilenet[1].parameters())
        assert manifest.parameters < 0.4 * full  # the half-width artifact is a smaller network


@pytest.fixture(scope="module")
def tabular():
    """The breast cancer table: raw rows, labels, a fixed split, and its per-feature statistics
    as a dataset's contract gives them."""
    table = load_breast_cancer()
    raw, labels = table.data.astype(np.float32), table.target
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:455], order[455:]
    mean, std = raw[train].mean(0), raw[train].std(0)
    info = DatasetInfo(name="breast-cancer", input_shape=(30,), num_classes=2,
                       labels=tuple(table.target_names), input_scale=1.0,
                       mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    return raw, labels, train, test, info, (raw - mean) / std


def test_a_conv1d_model_on_tabular_features_exports_with_the_datasets_standardisation(tabular,
                                                                                      tmp_path):
    raw, labels, train, test, info, standardised = tabular
    spec = model_spec("test_signal_net", (30,), 2)
    model = build_model(spec, seed=0)
    x, y = torch.from_numpy(standardised), torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[train]), y[train]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        want = model(x[test]).argmax(1).numpy()
    torch_accuracy = float((want == labels[test]).mean())
    assert torch_accuracy > 0.85  # it learned: the majority class is 63%

    manifest = export_bundle(model, tmp_path, spec=spec, info=info, device_id="tab-1",
                             verify_x=x[test].numpy(), verify_y=labels[test])
    assert manifest.input_shape == (30,) and manifest.input_layout == "NF"
    assert manifest.dataset == "breast-cancer" and manifest.labels == ("malignant", "benign")
    assert len(manifest.mean) == len(manifest.std) == 30 and manifest.input_scale == 1.0
    assert load_manifest(tmp_path) == manifest
    for fmt in ("onnx", "tflite"):
        entry = manifest.artifact(fmt, "fp32")
        assert entry.parity.top1_agreement >= TOLERANCES["fp32"].min_top1
        assert abs(entry.parity.accuracy - torch_accuracy) <= 0.01
        # The predictor applies the contract: raw measurements in, the torch model's answers out.
        predictor = Predictor.open(tmp_path, fmt=fmt)
        assert (predictor.classify(raw[test]) == want).mean() >= 0.99
        assert predictor.classify(raw[test[0]]).shape == (1,)  # one row, without a batch axis


@pytest.fixture
def skewed_format():
    """ONNX whose converter gets one named layer wrong (its weights off by 0.5): a converter bug
    the bundle must refuse, naming that layer."""
    target = "block.3"  # the conv that feeds the residual add

    register_runtime("skewed")(OnnxBackend)

    @register_exporter("skewed")
    def skewed(model: nn.Module, example: torch.Tensor, metadata=None) -> bytes:
        weights = [m.weight for name, m in model.named_modules() if name.endswith(target)]
        with torch.no_grad():
            for weight in weights:
                weight += 0.5
            try:
                return to_onnx(model, example, metadata)
            finally:
                for weight in weights:
                    weight -= 0.5

    yield target
    unregister_exporter("skewed")
    unregister_runtime("skewed")


def test_a_parity_failure_names_the_departing_layer_inside_a_residual_block(
        skewed_format, tabular, tmp_path):
    spec = model_spec("test_signal_net", (30,), 2)
    assert structure(spec).layer_modules.index(skewed_format) == 4  # not the first, nor the head
    with pytest.raises(ExportError, match=rf"skewed/fp32 export of dev-9 disagrees with torch .*"
                                          rf"first layer that departs from torch: {skewed_format}\."):
        export_bundle(build_model(spec, seed=0), tmp_path, spec=spec, device_id="dev-9",
                      verify_x=tabular[5][:64], formats=("skewed",))
    assert not any(tmp_path.iterdir())


def test_a_feddp_gated_submodel_exports_to_onnx_and_tflite_with_parity(mobilenet, digits, tmp_path):
    """The gates' saliency reads each conv input's channel means. At initialisation GroupNorm's
    zero bias makes them all zero: every saliency ties at the gate's bias, the lowest indices
    win, and parity would not show whether each runtime ranks the channels as torch does.
    Training moves the biases; set them so."""
    spec, model = _at_width(*mobilenet, 0.5)
    spec = dataclasses.replace(spec, gate=0.5)
    gated = build_model(spec, seed=0).eval()
    missing, unexpected = gated.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and missing and all(".gate." in name for name in missing)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in gated.modules():
            if isinstance(module, nn.GroupNorm):
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.5)
    x = digits[:128, None]
    with torch.no_grad():  # the gates bite: they change the answers of the same weights
        want = gated(torch.from_numpy(x)).numpy()
        assert np.abs(want - model(torch.from_numpy(x)).numpy()).max() > 0.1
    manifest = export_bundle(gated, tmp_path, spec=spec, device_id="gated", verify_x=x,
                             width_ratio=0.5, formats=("onnx", "tflite"))
    assert manifest.spec["gate"] == 0.5 and manifest.spec["keep"]
    for fmt in ("onnx", "tflite"):
        parity = manifest.artifact(fmt, "fp32").parity
        assert parity.samples == 128 and parity.max_abs_diff <= TOLERANCES["fp32"].bound(want)
        assert parity.top1_agreement >= TOLERANCES["fp32"].min_top1
    # Reduced precision reorders near-tied saliencies (export/bundle.py, check_variants): such
    # a variant is refused before anything is converted or written.
    refused = tmp_path / "refused"
    for precision in ("fp16", "int8"):
        with pytest.raises(ExportError, match=f"FedDP-gated model exports at fp32 only, not {precision}"):
            export_bundle(gated, refused, spec=spec, device_id="gated", verify_x=x,
                          width_ratio=0.5, formats=("onnx",), precisions=("fp32", precision))
    assert not refused.exists()


def test_a_gated_run_asking_for_reduced_precision_exports_is_refused_before_its_rounds(tmp_path):
    from coordinator.config import load_config
    from coordinator.simulation import run_simulation

    config = load_config(None, ["feddp.variant=gate", "export_precisions=[\"fp32\", \"fp16\"]"],
                         strategy="feddp", model="fedp3_cnn", clients=2, rounds=1,
                         max_client_samples=40, export_dir=str(tmp_path / "exports"))
    tasks = []
    with pytest.raises(ExportError, match="exports at fp32 only, not fp16"):
        run_simulation(config, progress=False, observe=lambda *args: tasks.append(args))
    assert tasks == [] and not (tmp_path / "exports").exists()


def test_a_model_that_is_not_its_spec_or_inputs_of_another_shape_are_refused(mobilenet, digits,
                                                                            tmp_path):
    spec, model = mobilenet
    half_spec, _ = _at_width(spec, model, 0.5)
    with pytest.raises(ExportError, match="not the network its spec describes"):
        export_bundle(model, tmp_path, spec=half_spec, device_id="d", verify_x=digits[:8, None])
    with pytest.raises(ExportError, match=r"verification inputs have shape \(8, 16, 16\); model "
                                          r"'test_mobilenet_v2' takes \(N, 1, 16, 16\)"):
        export_bundle(model, tmp_path, spec=spec, device_id="d", verify_x=digits[:8])
    assert not any(tmp_path.iterdir())
