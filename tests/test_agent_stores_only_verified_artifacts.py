"""The edge agent stores an exported model (ARTIFACT) only as its manifest describes it and under
its own names: an artifact name or manifest path that is a path writes nothing and is refused
(bad_artifact); a genuine artifact is stored as model-<precision>.<format>.zst and runs; one whose
bytes do not match its manifest is refused, not stored, and the previous bundle is kept. One of
an older round than the device has acted on (which would roll its model back), or from an older
leader epoch (a deposed leader), is refused as stale and not stored, across a restart too.

Every test looks at what the device really does: the files on disk (inside and outside its state
directory) and the REFUSAL it sends with its reason. The bundle is a real export (ONNX fp32,
verified in onnxruntime).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import zstandard

from edge_sdk.data import to_tensor
from edge_sdk.models import build_model, model_spec
from edge_sdk.protocol import MessageType, encode_envelope
from edge_sdk.runtime import Predictor, load_manifest
from export import export_bundle
from harness.device_tasks import first_task, send_task, task_variant
from harness.devices import DEVICE, TOPICS, captured_agent, files_outside, refusals_in
from harness.fleet import Harness


def _export(fmnist, out: Path, seed: int) -> Path:
    """A real exported bundle (ONNX fp32, verified in onnxruntime), as the engine ships them."""
    spec = model_spec("fedp3_cnn", (1, 28, 28), 10)
    export_bundle(build_model(spec, seed=seed), out, spec=spec, info=fmnist.info, device_id="width-1",
                  verify_x=to_tensor(fmnist.test_x[:16], fmnist.info).numpy(), round_number=0,
                  formats=("onnx",))
    return out


@pytest.fixture(scope="module")
def bundle(fmnist, tmp_path_factory) -> Path:
    return _export(fmnist, tmp_path_factory.mktemp("bundle"), seed=0)


@pytest.fixture(scope="module")
def other_bundle(fmnist, tmp_path_factory) -> Path:
    """Another model's bundle: which of the two the device stored tells what it did."""
    return _export(fmnist, tmp_path_factory.mktemp("other-bundle"), seed=1)


def _artifact(bundle: Path, *, round_number: int = 0, task: str = "task-1", manifest=None,
              artifact: str | None = None, payload: bytes | None = None,
              leader_epoch: int = 0) -> bytes:
    """An ARTIFACT message like the engine's (_send_artifacts), with any part replaced."""
    real = json.loads((bundle / "manifest.json").read_text())
    entry = real["artifacts"][0]
    return encode_envelope(MessageType.ARTIFACT, {
        "device_id": DEVICE, "round": round_number, "task": task,
        "manifest": real if manifest is None else manifest,
        "artifact": entry["compressed_path"] if artifact is None else artifact,
        "leader_epoch": leader_epoch},
        (bundle / entry["compressed_path"]).read_bytes() if payload is None else payload)


def _stored_model(state_root: Path) -> str:
    """The sha256 of the model the device keeps as its exported bundle."""
    return json.loads((state_root / "artifact" / "manifest.json").read_text())["artifacts"][0]["sha256"]


def _sha256(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["artifacts"][0]["sha256"]


def _renamed(bundle: Path, name: str, field: str = "compressed_path") -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"][0][field] = name
    return manifest


@pytest.mark.parametrize("evil", ["../../escaped.pth", "ABSOLUTE", "../artifact.old/../../x.pth",
                                  "sub/dir.zst"])
def test_an_artifact_name_that_is_a_path_writes_nothing_and_is_refused(tmp_path, bundle, evil):
    outside = tmp_path / "site-packages"
    outside.mkdir()
    if evil == "ABSOLUTE":  # a .pth in site-packages runs on the next interpreter start
        evil = str(outside / "fedprune-evil.pth")
    agent, sent = captured_agent(tmp_path)
    before = files_outside(tmp_path, agent.state.root)
    agent.handle(TOPICS.artifact(DEVICE), _artifact(
        bundle, round_number=3, task="task-7", manifest=_renamed(bundle, evil), artifact=evil))
    assert files_outside(tmp_path, agent.state.root) == before, "wrote outside the state dir"
    assert not agent.state.artifact_dir.exists()
    refusals = refusals_in(sent)
    assert [(r.code.value, r.round, r.task) for r in refusals] == [("bad_artifact", 4, "task-7")]
    assert "not a plain file name" in refusals[0].message
    assert agent.state.tasks() == {}  # a refused artifact does not touch the task it came with


def test_a_plain_path_in_the_manifest_that_escapes_is_refused(tmp_path, bundle):
    """`path` (the uncompressed name) is as hostile as `compressed_path`."""
    agent, sent = captured_agent(tmp_path)
    agent.handle(TOPICS.artifact(DEVICE), _artifact(
        bundle, manifest=_renamed(bundle, "../../../model.onnx", "path")))
    refusals = refusals_in(sent)
    assert [r.code.value for r in refusals] == ["bad_artifact"]
    assert "../../../model.onnx" in refusals[0].message
    assert not agent.state.artifact_dir.exists()


def test_a_genuine_artifact_is_stored_under_the_devices_own_names_and_runs(tmp_path, bundle, fmnist):
    agent, sent = captured_agent(tmp_path)
    real = json.loads((bundle / "manifest.json").read_text())
    # A plain but foreign name: the device still chooses the file name itself.
    agent.handle(TOPICS.artifact(DEVICE), _artifact(
        bundle, manifest=_renamed(bundle, "whatever-the-sender-says.zst"),
        artifact="whatever-the-sender-says.zst"))
    assert refusals_in(sent) == []
    stored = sorted(p.name for p in agent.state.artifact_dir.iterdir())
    assert stored == ["manifest.json", "model-fp32.onnx.zst"]
    manifest = load_manifest(agent.state.artifact_dir)
    assert (manifest.artifacts[0].path, manifest.artifacts[0].compressed_path) == \
        ("model-fp32.onnx", "model-fp32.onnx.zst")
    assert manifest.artifacts[0].sha256 == real["artifacts"][0]["sha256"]
    predictor = Predictor.open(agent.state.artifact_dir, fmt="onnx")
    assert predictor.logits(fmnist.test_x[:4]).shape == (4, 10)
    assert not any(p.name.startswith("artifact.") for p in agent.state.root.iterdir())


@pytest.mark.parametrize("damage", ["sha256", "payload", "bytes", "not zstd", "bomb"])
def test_an_artifact_that_does_not_match_its_manifest_is_refused_and_not_stored(tmp_path, bundle,
                                                                                damage):
    agent, sent = captured_agent(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["artifacts"][0]
    packed = (bundle / entry["compressed_path"]).read_bytes()
    if damage == "sha256":
        entry["sha256"] = hashlib.sha256(b"another model").hexdigest()
    elif damage == "payload":  # a well-formed frame of the right size, but another model
        packed = zstandard.ZstdCompressor().compress(bytes(entry["bytes"]))
        entry["compressed_bytes"] = len(packed)
    elif damage == "bytes":
        entry["bytes"] += 1
    elif damage == "not zstd":
        packed = bytes(len(packed))
    else:  # 64 MiB of zeros in a few kB: the device stops one byte past the manifest's size
        packed = zstandard.ZstdCompressor().compress(bytes(64 << 20))
        entry["compressed_bytes"] = len(packed)
    agent.handle(TOPICS.artifact(DEVICE), _artifact(bundle, manifest=manifest, payload=packed))
    refusals = refusals_in(sent)
    assert [(r.code.value, r.round) for r in refusals] == [("bad_artifact", 1)]
    assert not agent.state.artifact_dir.exists()


def test_an_artifact_that_is_refused_keeps_the_previous_bundle(tmp_path, bundle):
    agent, sent = captured_agent(tmp_path)
    agent.handle(TOPICS.artifact(DEVICE), _artifact(bundle))
    before = {p.name: p.read_bytes() for p in agent.state.artifact_dir.iterdir()}
    agent.handle(TOPICS.artifact(DEVICE), _artifact(
        bundle, manifest=_renamed(bundle, "../../x"), artifact="../../x"))
    assert {p.name: p.read_bytes() for p in agent.state.artifact_dir.iterdir()} == before
    assert [r.code.value for r in refusals_in(sent)] == ["bad_artifact"]


def test_an_artifact_of_an_older_round_or_leader_epoch_is_refused_stale_and_not_stored(
        tmp_path, bundle, other_bundle):
    """Before: any artifact was stored, so a replay or a deposed leader rolled the model back."""
    agent, sent = captured_agent(tmp_path)
    agent.handle(TOPICS.artifact(DEVICE), _artifact(bundle, round_number=4, leader_epoch=2))
    assert refusals_in(sent) == [] and _stored_model(agent.state.root) == _sha256(bundle)
    for restarted in (False, True):
        if restarted:
            agent, sent = captured_agent(tmp_path)
        agent.handle(TOPICS.artifact(DEVICE), _artifact(other_bundle, round_number=3, task="t-3",
                                                        leader_epoch=2))
        agent.handle(TOPICS.artifact(DEVICE), _artifact(other_bundle, round_number=6, task="t-6",
                                                        leader_epoch=1))
        refusals = refusals_in(sent)
        assert [(r.code.value, r.round, r.task) for r in refusals] == \
            [("stale", 4, "t-3"), ("stale", 7, "t-6")]
        assert "older than round 5, which this device has already acted on" in refusals[0].message
        assert "leader epoch 1, older than epoch 2" in refusals[1].message
        assert _stored_model(agent.state.root) == _sha256(bundle)
        sent.clear()
        # The same round again is a redelivery, not stale.
        agent.handle(TOPICS.artifact(DEVICE), _artifact(bundle, round_number=4, leader_epoch=2))
        assert refusals_in(sent) == []
    agent.handle(TOPICS.artifact(DEVICE), _artifact(other_bundle, round_number=5, leader_epoch=3))
    assert refusals_in(sent) == [] and _stored_model(agent.state.root) == _sha256(other_bundle)


def test_the_artifact_sent_with_a_task_is_the_one_its_round_starts_from(tmp_path, sqlite_url,
                                                                        bundle, other_bundle):
    """ArtifactHeader.round is the global model's: the artifact of round 2 comes with (and is not
    older than) the task of round 3; the artifact of round 1 is older than that task."""
    h = Harness(tmp_path, sqlite_url, devices=1)
    send_task(h, task_variant(first_task(h), round=3, task="t-3"))
    assert len(h.take(h.to_coordinator, "update", DEVICE)) == 1
    agent = h.agents[DEVICE]
    agent.handle(TOPICS.artifact(DEVICE), _artifact(bundle, round_number=2, task="t-3"))
    agent.handle(TOPICS.artifact(DEVICE), _artifact(other_bundle, round_number=1, task="t-2"))
    assert [(r.code.value, r.round) for r in refusals_in(h.to_coordinator)] == [("stale", 2)]
    assert _stored_model(agent.state.root) == _sha256(bundle)
