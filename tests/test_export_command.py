"""Exporting from the command line: `fedprune export` with a device plan writes the width-sliced
bundle and its manifest; a file that is not a checkpoint is a clear error; a sliced checkpoint is
not sliced again; `fedprune simulate --export-dir` exports every client's final model."""

from __future__ import annotations

import json

import pytest
import torch

from coordinator.cli import main
from coordinator.exporting import submodel
from edge_sdk.checkpoint import CheckpointError, load_checkpoint
from edge_sdk.runtime import load_manifest
from harness.exports import device_plan


def test_export_with_a_plan_writes_the_sliced_bundle_and_manifest(trained, tmp_path, capsys):
    device_plan(0.25, tmp_path)
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


def test_exporting_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    assert main(["export", "--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable torch checkpoint" in capsys.readouterr().err
    torch.save({"weights": torch.zeros(2)}, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match="not a fedprune checkpoint"):
        load_checkpoint(tmp_path / "y.pt")


def test_a_sliced_checkpoint_cannot_be_sliced_again(trained):
    half = submodel(trained, 0.5)
    assert half.width_ratio == 0.5 and half.spec.keep and half.sha256 is None
    assert submodel(half, 0.5) is half
    with pytest.raises(CheckpointError, match="from the global checkpoint"):
        submodel(half, 0.25)


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
