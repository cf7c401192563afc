"""The round pipeline's other promises: the simulated clock's arithmetic, stragglers left out
of the aggregate, and the exported artifact being the very model the device's task trains."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime
import pytest
import torch
import zstandard

from coordinator.config import load_config
from coordinator.planning.clock import task_time, time_to_accuracy
from coordinator.simulation import run_simulation
from device_profiles import catalogue_profile
from edge_sdk import codec
from edge_sdk.data import load_dataset, to_tensor
from coordinator.planning.memory import MemoryCoefficients, predict_peak_bytes
from edge_sdk.models import build_model, model_spec, tensor_shapes
from edge_sdk.models.cost import footprint
from edge_sdk.plan import SubmodelPlan
from edge_sdk.protocol import MessageType, decode_envelope, parse_header
from edge_sdk.slicing import width_spec
from edge_sdk.training import accuracy
from harness.fleet import Harness

BASE = model_spec("fedp3_cnn", (1, 28, 28), 10)


def _profile(name: str, down: float, up: float, dp_rate: float, memory: int | None = None):
    base = catalogue_profile("rpi4-4gb")
    network = base.network.model_copy(update={"downlink_bytes_per_s": down, "uplink_bytes_per_s": up})
    compute = base.compute.model_copy(update={"dp_samples_per_s": dp_rate, "samples_per_s": dp_rate})
    update = {"name": name, "network": network, "compute": compute}
    if memory is not None:
        update["memory_available_bytes"] = memory
    return base.model_copy(update=update)


def test_the_simulated_clock_on_a_hand_made_case():
    device = _profile("by-hand", down=1000.0, up=500.0, dp_rate=10.0)
    clock = task_time(device, BASE, True, download_bytes=5000, upload_bytes=1000,
                      samples=100, epochs=2)
    assert (clock.download_seconds, clock.train_seconds, clock.upload_seconds) == (5.0, 20.0, 2.0)
    assert clock.total == 27.0 and clock.to_dict()["seconds"] == 27.0
    # other models train slower or faster than the profile's reference (the FedP3 CNN) in
    # proportion to their forward MACs
    assert device.compute.reference_model == "fedp3_cnn"
    for other in (width_spec(BASE, 0.5), model_spec("leaf_cnn", (1, 28, 28), 10)):
        timed = task_time(device, other, True, 0, 0, samples=100, epochs=1)
        assert timed.train_seconds == pytest.approx(10.0 * footprint(other).macs / footprint(BASE).macs)
    assert time_to_accuracy([10.0, 20.0, 30.0], [0.4, 0.6, 0.7], (0.5, 0.65, 0.9)) == \
        {"0.5": 30.0, "0.65": 60.0, "0.9": None}


def test_a_straggler_is_not_aggregated():
    """Device 1's upload cannot arrive by the deadline (its uplink is 20 kB/s): it trains, sends,
    and is left out; the global model is then device 0's upload alone (FedAvg, one update)."""
    config = load_config(None, ["max_client_samples=200", "deadline_seconds=60", "train.lr=0.05",
                                "sizing=full-all"],
                         strategy="fedavg", clients=2, rounds=1, partition="iid")
    seen = {}
    result = run_simulation(
        config, progress=False,
        profiles=[_profile("fast", 1e6, 1e6, 200.0), _profile("slow-up", 1e6, 2e4, 200.0)],
        observe=lambda i, task, payload, outcome: seen.update({i: (task, outcome)})).to_dict()
    devices = result["rounds"][0]["devices"]
    assert [d["outcome"] for d in devices] == ["accepted", "straggled"]
    assert devices[1]["seconds"] > 60 and devices[1]["upload_bytes"] > 0  # trained and sent, late
    assert result["rounds"][0]["participants"] == 1 and result["final"]["updates_lost"] == 1
    assert result["rounds"][0]["simulated_seconds"] == 60.0  # the round waited to its deadline

    task, outcome = seen[0]
    upload = codec.decode(outcome.payload, expected_shapes=tensor_shapes(task.plan.spec))
    model = build_model(BASE)
    model.load_state_dict({k: torch.from_numpy(v.to_dense()) for k, v in upload.items()})
    source = load_dataset("fashion-mnist")
    alone = accuracy(model, to_tensor(source.test_x, source.info), torch.tensor(source.test_y))
    assert result["final"]["global_accuracy"] == alone


def test_the_exported_artifact_is_the_model_the_task_trains(tmp_path):
    """FedRolex slices with a rolling window while the service's `slicing` setting says
    `magnitude`: the artifact a device is sent must be cut with its task's channels, so its
    logits equal those of the model built from the task's download."""
    h = Harness(tmp_path, f"sqlite:///{tmp_path / 'coordinator.db'}", devices=2,
                strategy="fedrolex", slicing="magnitude",
                export={"enabled": True, "formats": ["onnx"], "verify_samples": 32})
    half = predict_peak_bytes(width_spec(BASE, 0.5), 48, 150, MemoryCoefficients.load())
    for agent in h.agents.values():  # memory for width 0.5, not more
        agent.profile = {**agent.profile, "memory_available_bytes": int(half / 0.9) + 1000}
    h.register_all()
    h.engine.tick()
    assert h.engine.round is not None
    source = load_dataset("fashion-mnist")
    x = to_tensor(source.test_x[:64], source.info)
    for device in h.agents:
        [(_, task_message)] = h.take(h.to_devices, "task", device)
        [(_, artifact_message)] = h.take(h.to_devices, "artifact", device)
        task = parse_header(decode_envelope(task_message))
        plan = SubmodelPlan.from_dict(task.plan)
        assert task.width_ratio < 1.0
        download = codec.decode(decode_envelope(task_message).payload,
                                expected_shapes=tensor_shapes(plan.spec))
        trained = build_model(plan.spec)
        trained.load_state_dict({k: torch.from_numpy(v.to_dense()) for k, v in download.items()})
        artifact = decode_envelope(artifact_message)
        assert artifact.type == MessageType.ARTIFACT
        onnx_bytes = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(artifact.payload)).read()
        session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        exported = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            expected = trained.eval()(x).numpy()
        assert np.abs(exported - expected).max() < 1e-4
