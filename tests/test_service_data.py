"""The coordinator service on a user's own data (issue 23, "any model, any data"): coordinator.toml's
[data] declares the fleet's input contract and names the held-out samples the global model is
evaluated on and exports are verified on; or declares the contract alone.

Real files throughout: scikit-learn's handwritten digits 0, 1 and 2 written as 8x8 grey PNGs into
image folders (the coordinator's, and each device's own), read at a 3x16x16 input the benchmarks
never use; real edge agents train on their folders; real ONNX exports. What the engine evaluates
on is checked against the test's own reading of the PNGs with Pillow.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from coordinator.cli import main
from coordinator.config import ConfigError, load_config
from coordinator.heldout import checkpoint_held_out, held_out_data
from coordinator.service import RoundEngine, ServiceSettings, Store
from coordinator.simulation import run_simulation
from edge_sdk.agent import EdgeAgent, EdgeSettings
from edge_sdk.checkpoint import load_checkpoint
from edge_sdk.data import DataError
from edge_sdk.data.sources import DataSettings, device_data, federated_data
from edge_sdk.plan import SubmodelPlan
from edge_sdk.protocol import Topics, decode_envelope, parse_header
from edge_sdk.runtime import BundleManifest, load_manifest
from edge_sdk.training import accuracy
from harness.devices import capture
from harness.fleet import Clock

FOLDERS = {0: "zero", 1: "one", 2: "two"}  # digit -> class folder
CLASSES = ("one", "two", "zero")           # an image folder's classes: its sorted folder names
SHAPE = (3, 16, 16)
MEAN, STD = 0.3, 0.4
TOPICS = Topics("test")
IMAGES = 'source = "imagefolder"\ninput_shape = [3, 16, 16]\nmean = [0.3]\nstd = [0.4]\n'


def digit_folder(root: Path, which: slice) -> Path:
    """The digits `which` of each class (by order of appearance) as PNGs, one folder per class."""
    digits = load_digits()
    for label, name in FOLDERS.items():
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[which]:
            pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i:04d}.png")
    return root


def read_as_the_model_takes_them(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The folder's images as RGB at 16x16, scaled to [0, 1] and standardised, with their
    class indices: the test's own reading, in the folder's order."""
    xs, ys = [], []
    for label, name in enumerate(CLASSES):
        for file in sorted((root / name).iterdir()):
            with Image.open(file) as image:
                rgb = image.convert("RGB").resize(SHAPE[:0:-1], Image.Resampling.BILINEAR)
            xs.append((np.asarray(rgb, np.float32).transpose(2, 0, 1) / np.float32(255) - MEAN) / STD)
            ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def coordinator_toml(folder: Path, db_url: str, data: str, evaluate: bool = True,
                     export: bool = True) -> ServiceSettings:
    """coordinator.toml in `folder` (the [data] paths are read from there) with the [data] table
    `data`, loaded as `fedprune coordinator serve` loads it."""
    (folder / "coordinator.toml").write_text(textwrap.dedent(f"""\
        strategy = "fedavg"
        evaluate = {str(evaluate).lower()}
        state_dir = "{folder / 'state'}"
        database = "{db_url}"
        http_port = 0
        [broker]
        fleet = "test"
        [rounds]
        total = 1
        devices_per_round = 2
        min_devices = 2
        registration_grace_seconds = 0
        deadline_seconds = 60
        [train]
        lr = 0.05
        [export]
        enabled = {str(export).lower()}
        formats = ["onnx"]
        verify_samples = 32
        """) + data)
    return load_config(folder / "coordinator.toml", schema=ServiceSettings)


def devices_on_their_folders(tmp_path: Path, published: list) -> dict[str, EdgeAgent]:
    """Two real agents, each on its own folder of 40 digits per class (disjoint from the
    coordinator's), with the same [data] contract."""
    agents = {}
    for n, device in enumerate(("dev-0", "dev-1")):
        photos = digit_folder(tmp_path / device / "photos", slice(30 + 40 * n, 70 + 40 * n))
        config = EdgeSettings(device_id=device, fleet="test", state_dir=str(tmp_path / device / "state"),
                              profile="catalogue:rpi4-4gb",
                              data={"source": "imagefolder", "path": str(photos),
                                    "input_shape": list(SHAPE), "mean": [MEAN], "std": [STD]})
        agents[device] = EdgeAgent(config, publish=capture(published))
    return agents


def sent(messages: list, kind: str) -> list[tuple[str, str, bytes]]:
    """(device, topic, message) of every message of `kind`, taken out of `messages`."""
    picked = [(t, p) for t, p in messages if TOPICS.device_of(t)[0] == kind]
    for item in picked:
        messages.remove(item)
    return [(TOPICS.device_of(t)[1], t, p) for t, p in picked]


def test_a_coordinator_on_an_image_folder_plans_evaluates_and_exports_for_it(tmp_path, sqlite_url):
    digit_folder(tmp_path / "central", slice(0, 10))
    holdout = digit_folder(tmp_path / "holdout", slice(10, 30))
    config = coordinator_toml(tmp_path, sqlite_url, '[data]\npath = "central"\ntest_path = "holdout"\n'
                              + IMAGES)
    to_devices: list = []
    engine = RoundEngine(config, Store(sqlite_url), lambda t, p: to_devices.append((t, p)),
                         clock=Clock())

    # The contract is the folder's; the held-out set is exactly test_path's images.
    assert (engine.info.input_shape, engine.info.labels, engine.info.input_scale) == (SHAPE, CLASSES, 255.0)
    assert (engine.spec.input_shape, engine.spec.num_classes) == (SHAPE, 3)
    expected_x, expected_y = read_as_the_model_takes_them(holdout)
    assert torch.allclose(engine.test_x, expected_x, atol=1e-5)
    assert torch.equal(engine.test_y, expected_y)

    to_coordinator: list = []
    agents = devices_on_their_folders(tmp_path, to_coordinator)
    for device, agent in agents.items():
        engine.handle(TOPICS.register(device), agent._registration())
    engine.tick()

    tasks = sent(to_devices, "task")
    assert len(tasks) == 2
    for _, _, message in tasks:
        plan = SubmodelPlan.from_dict(parse_header(decode_envelope(message)).plan)
        assert (plan.spec.input_shape, plan.spec.num_classes) == (SHAPE, 3)
    artifacts = sent(to_devices, "artifact")
    assert len(artifacts) == 2
    for _, _, message in artifacts:
        manifest = BundleManifest.model_validate(parse_header(decode_envelope(message)).manifest)
        assert manifest.labels == CLASSES and manifest.input_shape == SHAPE
        assert (manifest.input_layout, manifest.input_scale) == ("NCHW", 255.0)
        assert manifest.mean == (MEAN,) * 3 and manifest.std == (STD,) * 3
        assert manifest.dataset == "imagefolder:central"
        # Verified on the first 32 held-out images: the manifest records the accuracy on them.
        parity = manifest.artifacts[0].parity
        assert parity.samples == 32
        assert parity.torch_accuracy == pytest.approx(accuracy(engine.pipeline.model_at(manifest.width_ratio),
                                                               expected_x[:32], expected_y[:32]))

    for device, topic, message in tasks + artifacts:  # the devices accept and train on their data
        agents[device].handle(topic, message)
    updates = sent(to_coordinator, "update")
    assert sorted(device for device, _, _ in updates) == ["dev-0", "dev-1"]
    for _, topic, message in updates:
        engine.handle(topic, message)
    engine.tick()

    committed = engine.store.last_committed()
    assert committed.number == 1 and committed.summary["accepted"] == 2
    checkpoint = load_checkpoint(committed.checkpoint)
    model = checkpoint.build()
    assert committed.summary["global_accuracy"] == pytest.approx(accuracy(model, expected_x, expected_y))
    # The checkpoint carries the contract: it exports later without the data.
    assert checkpoint_held_out(checkpoint, None).info == engine.info


def test_without_test_path_the_coordinator_holds_out_what_a_simulation_would(tmp_path):
    central = digit_folder(tmp_path / "central", slice(0, 20))
    settings = DataSettings(source="imagefolder", path=str(central), input_shape=SHAPE,
                            mean=[MEAN], std=[STD], test_share=0.25)
    held = held_out_data(settings)
    simulated = federated_data(settings, 3, "iid", seed=7)
    assert len(held.y) == 15 and torch.equal(held.x, simulated.test_x)
    assert torch.equal(held.y, simulated.test_y)


CONTRACT = ('[data]\nsource = "contract"\ninput_shape = [3, 16, 16]\nclasses = ["one", "two", "zero"]\n'
            'mean = [0.3]\nstd = [0.4]\ninput_scale = 255\n')


def test_a_contract_without_samples_builds_the_model_and_verifies_on_random_inputs(tmp_path, sqlite_url):
    (tmp_path / "refused").mkdir()
    with pytest.raises(ConfigError, match="evaluate: \\[data\\] declares only the input contract"):
        coordinator_toml(tmp_path / "refused", sqlite_url, CONTRACT)

    config = coordinator_toml(tmp_path, sqlite_url, CONTRACT, evaluate=False, export=False)
    to_devices: list = []
    engine = RoundEngine(config, Store(sqlite_url), lambda t, p: to_devices.append((t, p)),
                         clock=Clock())
    assert (engine.info.labels, engine.info.input_scale, engine.info.mean) == (CLASSES, 255.0, (MEAN,) * 3)
    assert engine.test_x is None
    inputs, labels = engine._verify_inputs
    assert inputs.shape == (32, *SHAPE) and inputs.std() > 0.5 and labels is None  # seeded random
    again, _ = RoundEngine(config, Store(sqlite_url), lambda t, p: None, clock=Clock())._verify_inputs
    np.testing.assert_array_equal(inputs, again)

    for device, agent in devices_on_their_folders(tmp_path, []).items():
        engine.handle(TOPICS.register(device), agent._registration())
    engine.tick()
    for _, _, message in sent(to_devices, "task"):
        plan = SubmodelPlan.from_dict(parse_header(decode_envelope(message)).plan)
        assert (plan.spec.input_shape, plan.spec.num_classes) == (SHAPE, 3)
    with pytest.raises(DataError, match="the contract source holds no samples"):
        device_data(config.data)


def test_contradictory_data_configs_are_refused_with_what_to_do(tmp_path, capsys):
    digit_folder(tmp_path / "central", slice(0, 4))
    cases = {
        f'dataset = "mnist"\n[data]\npath = "central"\n{IMAGES}':
            "dataset: the data is named in [data]; set data.source and its keys there",
        '[data]\ndataset = "mnist"\ndevice_index = 3\n':
            "data.device_index: clients, partition and device_index pick a device's shard",
        '[data]\nsource = "contract"\ninput_shape = [3, 16, 16]\n':
            "data: classes: the contract source declares the model's input",
        f'[data]\npath = "central"\ninput_scale = 255\n{IMAGES}':
            "the imagefolder source does not read input_scale",
    }
    for body, message in cases.items():
        (tmp_path / "coordinator.toml").write_text("evaluate = false\n" + body)
        assert main(["coordinator", "serve", "--config", str(tmp_path / "coordinator.toml")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_a_data_simulation_exports_once_normalised_and_its_checkpoint_exports_by_its_contract(
        tmp_path, capsys):
    digit_folder(tmp_path / "digits", slice(0, 60))
    (tmp_path / "fedprune.toml").write_text(textwrap.dedent(f"""\
        strategy = "fedavg"
        clients = 1
        rounds = 1
        partition = "iid"
        export_dir = "{tmp_path / 'exports'}"
        export_formats = ["onnx"]
        [train]
        local_epochs = 2
        batch_size = 8
        optimizer = "adam"
        lr = 0.003
        [data]
        path = "digits"
        """) + IMAGES)
    config = load_config(tmp_path / "fedprune.toml")
    result = run_simulation(config, progress=False)
    [export] = result.exports
    manifest = load_manifest(export["dir"])
    assert manifest.labels == CLASSES and manifest.input_shape == SHAPE
    # Verified on the client's own test split as the model takes it: once normalised.
    test = federated_data(config.data, 1, "iid", config.seed).shards[0]
    model = load_checkpoint(Path(export["dir"]) / "checkpoint.pt").build()
    once = accuracy(model, test.test_x, test.test_y)
    twice = accuracy(model, (test.test_x / 255 - MEAN) / STD, test.test_y)
    assert abs(once - twice) > 0.2, (once, twice)  # the check can tell the two apart
    assert manifest.artifacts[0].parity.torch_accuracy == pytest.approx(once)

    # `fedprune export` of the run's global checkpoint: the run's contract, random inputs.
    code = main(["export", "--checkpoint", str(tmp_path / "exports" / "global" / "checkpoint.pt"),
                 "--format", "onnx", "--out", str(tmp_path / "global"), "--verify-samples", "16"])
    out = capsys.readouterr().out
    assert code == 0 and "16 seeded random inputs" in out, out
    exported = json.loads((tmp_path / "global" / "manifest.json").read_text())
    assert exported["labels"] == list(CLASSES) and exported["input_shape"] == list(SHAPE)
    assert (exported["input_scale"], exported["mean"]) == (255.0, [MEAN] * 3)
    assert exported["artifacts"][0]["parity"]["accuracy"] is None
