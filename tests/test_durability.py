"""Durability across crashes and power loss: every writer of state uses device_profiles.files.

A power cut cannot be simulated in a test, so what makes a write survive one is observed
instead: the file is fsynced before it is renamed, and its directory after (os.fsync and
os.replace are wrapped, not replaced, and each fsynced descriptor is identified by what it
refers to). A crash between write and rename is simulated by making os.replace raise: the old
file must be intact and no temp file left behind. Private files are observed at creation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from pathlib import Path
from unittest import mock

import pytest
import torch

from device_profiles import catalogue_profile
from edge_sdk.agent import DeviceState, EdgeSettings
from edge_sdk.sizing import DevicePlan
from edge_sdk.checkpoint import Checkpoint, load_checkpoint
from edge_sdk.data.locate import _download
from edge_sdk.models import build_model, model_spec
from edge_sdk.runtime import BundleManifest
from edge_sdk.training import PrivacyLedger

SPEC = model_spec("fedp3_cnn", (1, 28, 28), 10)


# --- every writer of state, each writing version n of its file into `folder` -------------------
def _ledger(folder: Path, n: int) -> Path:
    DeviceState(folder).save_ledger(PrivacyLedger(1e-5, None, "rdp", [(1.0, 0.01, n)]))
    return folder / "ledger.json"


def _tasks(folder: Path, n: int) -> Path:
    DeviceState(folder).mark(f"r{n:06d}-task", "sent")
    return folder / "tasks.json"


def _outbox(folder: Path, n: int) -> Path:
    DeviceState(folder).put_outbox("r000001-task", b"update %d" % n)
    return folder / "outbox" / "r000001-task.bin"


def _checkpoint(folder: Path, n: int) -> Path:
    state = {k: v.clone() for k, v in build_model(SPEC, seed=n).state_dict().items()}
    Checkpoint(SPEC, state, "fedp3_cnn", "fashion-mnist", round=n).save(folder / "model.pt")
    return folder / "model.pt"


def _budget_plan(folder: Path, n: int) -> Path:
    DevicePlan(device_id="d", model="fedp3_cnn", width_ratio=1.0, batch_size=8, physical_batch_size=8,
               local_steps=n, local_samples=8, parameters=1, predicted_peak_bytes=1, memory_limit_bytes=1,
               download_bytes=1, upload_bytes=1, transfer_seconds=0, compute_seconds=0,
               deadline_seconds=60, fits=True).save(folder / "plan.json")
    return folder / "plan.json"


def _device_profile(folder: Path, n: int) -> Path:
    catalogue_profile("rpi4-4gb").model_copy(update={"name": f"pi-{n}"}).save(folder / "profile.json")
    return folder / "profile.json"


def _manifest(folder: Path, n: int) -> Path:
    BundleManifest(device_id="d", model="fedp3_cnn", spec={}, spec_digest="x", width_ratio=1.0,
                   dataset="fashion-mnist", input_shape=(1, 28, 28), input_scale=255.0, mean=(0.0,),
                   std=(1.0,), labels=("a",), parameters=n, nonzero_parameters=0, sparsity=0.0,
                   macs_per_sample=0, flops_per_sample=0, exporters={}, created_at="now"
                   ).save(folder / "manifest.json")
    return folder / "manifest.json"


def _edge_config(folder: Path, n: int) -> Path:
    return EdgeSettings(device_id="dev-0", password=f"secret-{n}").save(folder / "edge.toml")


def _downloaded(folder: Path, n: int) -> Path:
    source = folder.parent / "mirror" / f"v{n}.bin"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(b"dataset file, version %d" % n)
    _download(source.as_uri(), folder / "data.bin", hashlib.sha256(source.read_bytes()).hexdigest())
    return folder / "data.bin"


WRITERS = {"ledger": _ledger, "tasks": _tasks, "outbox": _outbox, "checkpoint": _checkpoint,
           "budget plan": _budget_plan, "device profile": _device_profile,
           "bundle manifest": _manifest, "edge config": _edge_config, "download": _downloaded}


@contextlib.contextmanager
def _observed():
    """Record fsyncs (of a file or a directory, by path) and renames, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append((f"fsync {kind}", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", str(Path(dst).resolve())))
        return real_replace(src, dst, **kwargs)

    with mock.patch("os.fsync", side_effect=fsync), mock.patch("os.replace", side_effect=replace):
        yield events


def _assert_durable(events: list[tuple[str, str]], target: Path) -> None:
    folder = str(target.parent.resolve())
    renamed = [i for i, e in enumerate(events) if e == ("replace", str(target.resolve()))]
    assert renamed, f"{target.name} was not renamed into place: {events}"
    last = renamed[-1]
    assert any(kind == "fsync file" and str(Path(path).parent) == folder
               for kind, path in events[:last]), f"the new {target.name} was not fsynced: {events}"
    assert ("fsync dir", folder) in events[last + 1:], \
        f"the directory was not fsynced after {target.name} was renamed: {events}"


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_every_writer_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, writer):
    folder = tmp_path / "state"
    folder.mkdir()
    with _observed() as events:
        target = writer(folder, 1)
    _assert_durable(events, target)


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_a_crash_between_write_and_rename_leaves_the_old_file_and_no_temp_file(tmp_path, writer):
    folder = tmp_path / "state"
    folder.mkdir()
    target = writer(folder, 1)
    old, listing = target.read_bytes(), sorted(os.listdir(target.parent))
    with mock.patch("os.replace", side_effect=OSError("simulated crash before the rename")), \
            pytest.raises(OSError, match="simulated crash"):
        writer(folder, 2)
    assert target.read_bytes() == old
    assert sorted(os.listdir(target.parent)) == listing, "a temp file was left behind"


def test_budget_plan_save_is_atomic(tmp_path):
    """It was a plain write_text: a crash mid-write left half a plan that no device could read."""
    target = _budget_plan(tmp_path, 1)
    with mock.patch("os.replace", side_effect=OSError("simulated crash")), pytest.raises(OSError):
        _budget_plan(tmp_path, 2)
    assert DevicePlan.load(target).local_steps == 1


def test_a_checkpoint_is_fsynced_and_its_hash_is_the_files(tmp_path):
    with _observed() as events:
        checkpoint = Checkpoint(SPEC, dict(build_model(SPEC, seed=0).state_dict()), "fedp3_cnn",
                                "fashion-mnist")
        digest = checkpoint.save(tmp_path / "model.pt")
    _assert_durable(events, tmp_path / "model.pt")
    assert digest == hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()
    assert torch.equal(load_checkpoint(tmp_path / "model.pt").state["layers.0.conv.weight"],
                       checkpoint.state["layers.0.conv.weight"])


# --- private files ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _creation_modes():
    """Modes of files as created by os.open (before a byte is written); chmod is forbidden."""
    modes: list[int] = []
    real_open = os.open

    def opened(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        if flags & os.O_CREAT:
            modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return fd

    never = AssertionError("a private file must be created 0600, not chmodded afterwards")
    with mock.patch("os.open", side_effect=opened), mock.patch("os.chmod", side_effect=never), \
            mock.patch("os.fchmod", side_effect=never):
        yield modes


def test_edge_config_with_a_password_is_never_readable_by_others(tmp_path):
    previous = os.umask(0)  # even with a permissive umask
    try:
        with _creation_modes() as modes:
            path = EdgeSettings(device_id="dev-0", password="s3cret").save(tmp_path / "edge.toml")
    finally:
        os.umask(previous)
    assert modes == [0o600]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_atomic_write_private_is_0600_from_creation_and_public_follows_the_umask(tmp_path):
    from device_profiles.files import atomic_write

    previous = os.umask(0o022)
    try:
        with _creation_modes() as modes:
            atomic_write(tmp_path / "key.pem", b"-----BEGIN PRIVATE KEY-----", private=True)
            atomic_write(tmp_path / "ca.crt", b"-----BEGIN CERTIFICATE-----")
    finally:
        os.umask(previous)
    assert modes == [0o600, 0o644]
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    # Replacing a private file keeps it private: the new inode is created 0600 too.
    with _creation_modes() as modes:
        atomic_write(tmp_path / "key.pem", b"rotated", private=True)
    assert modes == [0o600] and (tmp_path / "key.pem").read_bytes() == b"rotated"


# --- symlinks and folders ------------------------------------------------------------------------
def test_a_symlink_planted_at_a_temp_name_is_never_written_through(tmp_path):
    state = DeviceState(tmp_path / "device")
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    for name in ("ledger.json.partial", "ledger.json.tmp", ".ledger.json.tmp"):
        (state.root / name).symlink_to(outside)
    _ledger(state.root, 1)
    assert outside.read_text() == "untouched"
    assert not (state.root / "ledger.json").is_symlink()
    assert json.loads((state.root / "ledger.json").read_text())["ledger"]["history"] == [[1.0, 0.01, 1]]


def test_a_bundle_swap_is_fsynced_before_and_after_the_rename(tmp_path):
    state = DeviceState(tmp_path / "device")
    with _observed() as events:
        state.save_artifact({"round": 1}, "model-fp32.onnx.zst", b"one")
    staging = str(state.root.resolve() / "artifact.partial")
    swap = events.index(("replace", str(state.artifact_dir.resolve())))
    before = events[:swap]
    for name in ("manifest.json", "model-fp32.onnx.zst"):
        assert ("fsync file", f"{staging}/{name}") in before, f"{name} not fsynced: {events}"
    assert ("fsync dir", staging) in before
    assert ("fsync dir", str(state.root.resolve())) in events[swap + 1:]


def test_a_bundle_swap_cut_short_by_a_crash_leaves_the_old_bundle(tmp_path):
    state = DeviceState(tmp_path / "device")
    state.save_artifact({"round": 1}, "model-fp32.onnx.zst", b"one")
    real_replace = os.replace

    def crash_before_the_new_bundle_is_in_place(src, dst, **kwargs):
        if Path(src).name == "artifact.partial":
            raise OSError("simulated crash between the two renames")
        return real_replace(src, dst, **kwargs)

    with mock.patch("os.replace", side_effect=crash_before_the_new_bundle_is_in_place), \
            pytest.raises(OSError):
        state.save_artifact({"round": 2}, "model-fp32.onnx.zst", b"two")
    restarted = DeviceState(tmp_path / "device")
    assert json.loads((restarted.artifact_dir / "manifest.json").read_text()) == {"round": 1}
    assert (restarted.artifact_dir / "model-fp32.onnx.zst").read_bytes() == b"one"
