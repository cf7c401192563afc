"""Data sources (issue 23 items 5 and 6): a device trains on its own data, a simulation on any
labelled data, and bad samples are skipped and counted, never fatal.

Every source here is real files written by the test (Pillow images, scikit-learn's breast
cancer table as CSV, an npz, a user's Dataset module, an installed entry point), and every count
asserted is the number of broken samples the test wrote. The agent test starts the real
`fedprune-edge run` on a real Mosquitto and reads its REGISTER off the broker.
"""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image

from coordinator.config import ConfigError, load_config
from edge_sdk.agent.config import EdgeConfigError, load_edge_config
from edge_sdk.data import DataError
from edge_sdk.data.sources import DataSettings, device_data, federated_data, source_names
from edge_sdk.models import build_model, model_spec
from edge_sdk.protocol import RegisterHeader, decode_envelope, parse_header
from edge_sdk.settings import DPSettings, LossName, OptimizerName, TrainSettings
from edge_sdk.training import accuracy, chance_accuracy, train_locally
from edge_sdk.training.local import LOSSES, OPTIMIZERS
from harness.brokers import fleet_wire
from harness.device_tasks import first_task, restart_agent, send_task
from harness.devices import DEVICE, edge_agent_process, refusals_in
from harness.fleet import Harness
from harness.processes import stop_processes

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


# --- the files the tests write -------------------------------------------------------------------
def image_folder(root: Path, per_class: int = 6) -> dict[str, int]:
    """Solid-colour images of three classes in several sizes and modes (RGB, RGBA, palette),
    and what a reader must skip: a truncated PNG, a text file, a class not in the class list,
    a file beside the class folders, hidden files. Returns the bad files written, by reason."""
    for name, rgb in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = (10 + i, 12 + 2 * i)
            if i % 3 == 1:
                Image.new("RGBA", size, (*rgb, 255)).save(folder / f"{i}.png")
            elif i % 3 == 2:
                Image.new("RGB", size, rgb).convert("P").save(folder / f"{i}.gif")
            else:
                Image.new("RGB", size, rgb).save(folder / f"{i}.jpg", quality=100)
    whole = root / "red" / "0.jpg"
    (root / "red" / "truncated.jpg").write_bytes(whole.read_bytes()[:200])
    (root / "green" / "notes.txt").write_text("not an image")
    (root / "purple").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (128, 0, 128)).save(root / "purple" / f"{i}.png")
    (root / "labels.csv").write_text("a stray file\n")
    (root / ".DS_Store").write_bytes(b"\0\1")
    (root / "blue" / ".hidden.png").write_bytes(b"\0")
    return {"unreadable_image": 2, "unknown_label": 2, "outside_class_folder": 1}


def breast_cancer_csv(path: Path) -> dict[str, int]:
    """scikit-learn's table as CSV (label column `diagnosis`, the words), with four bad rows
    appended: a text cell, a label outside the classes, a short row, an infinite value."""
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer()
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([*table.feature_names, "diagnosis"])
        for x, y in zip(table.data, table.target):
            writer.writerow([*(f"{v:.6g}" for v in x), table.target_names[y]])
        good = [f"{v:.6g}" for v in table.data[0]]
        writer.writerow(["twelve", *good[1:], "benign"])          # row 571
        writer.writerow([*good, "healthy"])                       # row 572
        writer.writerow(good[:29])                                 # row 573
        writer.writerow([*good[:5], "inf", *good[6:], "malignant"])  # row 574
    return {"not_numeric": 1, "unknown_label": 1, "wrong_columns": 1, "not_finite": 1}


def split_sizes(usable: int, test_share: float = 0.2) -> tuple[int, int]:
    train = min(max(round((1 - test_share) * usable), 1), usable - 1)
    return train, usable - train


# --- sources -------------------------------------------------------------------------------------
def test_an_image_folder_is_read_converted_and_its_bad_files_counted(tmp_path):
    bad = image_folder(tmp_path / "photos")
    settings = DataSettings(source="imagefolder", path=str(tmp_path / "photos"),
                            classes=["red", "green", "blue"], input_shape=[3, 8, 8],
                            mean=[0.5], std=[0.25])
    loaded = device_data(settings)
    data = loaded.data
    assert loaded.skipped == bad
    assert (len(data.train_y), len(data.test_y)) == split_sizes(18)
    assert loaded.contract.input_shape == (3, 8, 8)
    assert loaded.contract.classes == ("red", "green", "blue")
    x = torch.cat([data.train_x, data.test_x])
    y = torch.cat([data.train_y, data.test_y])
    assert x.shape == (18, 3, 8, 8) and torch.bincount(y).tolist() == [6, 6, 6]
    # Every mode became RGB, every size 8x8, scaled to [0, 1] and normalised: (v - 0.5) / 0.25.
    # JPEG may move a saturated channel by a grey level or two.
    for label, rgb in enumerate(COLOURS.values()):
        expected = (torch.tensor(rgb, dtype=torch.float32) / 255 - 0.5) / 0.25
        got = x[y == label]
        assert torch.allclose(got, expected.reshape(1, 3, 1, 1).expand_as(got), atol=0.1)


def test_without_a_class_list_every_folder_is_a_class(tmp_path):
    image_folder(tmp_path / "photos")
    loaded = device_data(DataSettings(source="imagefolder", path=str(tmp_path / "photos"),
                                      input_shape=[1, 6, 6]))
    assert loaded.contract.classes == ("blue", "green", "purple", "red")
    assert loaded.skipped == {"unreadable_image": 2, "outside_class_folder": 1}
    assert len(loaded.data.train_y) + len(loaded.data.test_y) == 20
    assert loaded.data.train_x.shape[1:] == (1, 6, 6)


def test_a_csv_skips_bad_rows_and_labels_outside_the_classes_and_learns(tmp_path):
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer()
    bad = breast_cancer_csv(tmp_path / "tumours.csv")
    mean, std = table.data.mean(0), table.data.std(0)
    loaded = device_data(DataSettings(source="csv", path=str(tmp_path / "tumours.csv"),
                                      label_column="diagnosis", classes=["malignant", "benign"],
                                      mean=mean.tolist(), std=std.tolist(), seed=3))
    data = loaded.data
    assert loaded.skipped == bad
    assert (len(data.train_y), len(data.test_y)) == split_sizes(569)
    y = torch.cat([data.train_y, data.test_y])
    assert torch.bincount(y).tolist() == np.bincount(table.target).tolist()  # 212 / 357
    x = torch.cat([data.train_x, data.test_x])
    assert x.shape == (569, 30)
    standardised = (table.data.astype(np.float32) - mean) / std
    assert abs(float(x.sum()) - float(standardised.sum())) < 0.5  # the same cells, reordered
    # Trained on the device's split, scored on its held-out rows.
    model = build_model(model_spec("mlp", loaded.contract.input_shape, 2), seed=0)
    train_locally(model, data.train_x, data.train_y,
                  TrainSettings(local_epochs=8, batch_size=32, lr=0.05), {}, seed=0)
    assert accuracy(model, data.test_x, data.test_y) > chance_accuracy(data.test_y) + 0.25


def test_bad_rows_are_named_by_file_and_row(tmp_path, caplog):
    breast_cancer_csv(tmp_path / "tumours.csv")
    with caplog.at_level("WARNING", logger="fedprune.data"):
        device_data(DataSettings(source="csv", path=str(tmp_path / "tumours.csv"),
                                 label_column="diagnosis", classes=["malignant", "benign"]))
    line = caplog.records[-1].getMessage()
    for place in ("tumours.csv row 571: column 'mean radius' is 'twelve'",
                  "tumours.csv row 572: label 'healthy'",
                  "tumours.csv row 573: 29 cells, the header has 31",
                  "tumours.csv row 574"):
        assert place in line, line


def test_an_npz_with_users_is_partitioned_by_user_and_its_bad_rows_counted(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 18)).astype(np.float32)
    y = np.arange(60) % 3
    users = np.repeat([f"user-{i}" for i in range(6)], 10)
    x[[4, 9], 2] = np.nan
    y[7] = 5  # classes a, b, c: integer labels index them; 5 is none of them
    np.savez(tmp_path / "samples.npz", x=x, y=y, writer=users)
    settings = DataSettings(source="npz", path=str(tmp_path / "samples.npz"), classes=["a", "b", "c"],
                            input_shape=[2, 3, 3], user_column="writer", test_share=0.25)
    loaded = device_data(settings)
    assert loaded.skipped == {"not_finite": 2, "unknown_label": 1}
    assert loaded.data.train_x.shape[1:] == (2, 3, 3)
    assert len(loaded.data.train_y) + len(loaded.data.test_y) == 57

    run = federated_data(settings, clients=3, partition_spec="natural", seed=0)
    assert len(run.test_y) == round(0.25 * 57) and run.info.labels == ("a", "b", "c")
    # Each client holds whole users: its samples' rows come from its users only.
    rows = {tuple(np.round(r, 5)): u for r, u in zip(x.reshape(60, -1), users)}
    for shard in run.shards:
        held = {rows[tuple(np.round(r, 5))] for r in torch.cat([shard.train_x, shard.test_x])
                .reshape(-1, 18).numpy()}
        others = [s for s in run.shards if s is not shard]
        for other in others:
            theirs = {rows[tuple(np.round(r, 5))] for r in torch.cat([other.train_x, other.test_x])
                      .reshape(-1, 18).numpy()}
            assert not held & theirs


USER_MODULE = '''
import torch
from torch.utils.data import Dataset

class Items(Dataset):
    classes = ["even", "odd"]

    def __init__(self, count, offset):
        self.count, self.offset = count, offset

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        if i == 3:
            raise OSError("sector not readable")
        if i == 4:
            return "just a string"
        n = i + self.offset
        return torch.full((4,), float(n % 2)), n % 2

def load(split, count=20):
    return Items(count, 0 if split == "train" else 100)
'''


def test_a_users_dataset_function_next_to_the_config(tmp_path):
    (tmp_path / "fp_items_source.py").write_text(USER_MODULE)
    (tmp_path / "run.toml").write_text(textwrap.dedent("""
        clients = 2
        partition = "iid"
        [data]
        source = "fp_items_source:load"
        [data.options]
        count = 30
    """))
    config = load_config(tmp_path / "run.toml")
    run = federated_data(config.data_settings, config.clients, config.partition, config.seed)
    # Each split's item 3 raises and item 4 is no pair: skipped in both, the rest used.
    assert run.skipped == {"unreadable_item": 2, "not_a_pair": 2}
    assert len(run.test_y) == 28  # the function's own test split, not a share of the train one
    assert sum(len(s.train_y) + len(s.test_y) for s in run.shards) == 28
    assert run.info.labels == ("even", "odd") and run.info.input_shape == (4,)
    assert torch.equal(run.test_x[:, 0], run.test_y.float())  # labels follow their items


def test_an_entry_point_is_a_source_by_name(tmp_path, monkeypatch):
    (tmp_path / "fp_blob_source.py").write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import TensorDataset

        def blobs(size=24):
            x = torch.arange(size * 2, dtype=torch.float32).reshape(size, 2)
            x[5, 0] = float("inf")
            return TensorDataset(x, torch.arange(size) % 4)
    """))
    dist = tmp_path / "fp_blob_source-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fp-blob-source\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fedprune.data_sources]\nfp-blobs = fp_blob_source:blobs\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "fp-blobs" in source_names()
    loaded = device_data(DataSettings(source="fp-blobs", options={"size": 40}))
    assert loaded.skipped == {"not_finite": 1}
    assert len(loaded.data.train_y) + len(loaded.data.test_y) == 39
    assert loaded.contract == type(loaded.contract)((2,), ("0", "1", "2", "3"))


# --- refusals ------------------------------------------------------------------------------------
def test_a_source_with_nothing_usable_is_refused_naming_the_file_and_rows(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text("height,weight,label\n1.7,70,a\n1.8,heavy,b\n,80,a\n1.6,60\n")
    with pytest.raises(DataError) as refused:
        device_data(DataSettings(source="csv", path=str(path), label_column="label",
                                 classes=["x", "y"]))
    message = str(refused.value)
    assert str(path) in message and "no usable sample" in message
    assert "broken.csv row 3: column 'weight' is 'heavy'" in message
    assert "broken.csv row 4: column 'height' is empty" in message
    assert "broken.csv row 2: label 'a' is not one of the 2 classes" in message
    assert "broken.csv row 5: 2 cells, the header has 3" in message

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"image folder .*empty: no usable sample \(found nothing to read"):
        device_data(DataSettings(source="imagefolder", path=str(tmp_path / "empty"),
                                 input_shape=[1, 4, 4]))
    (tmp_path / "nothing.csv").write_text("")
    with pytest.raises(DataError, match="nothing.csv: empty; it needs a header row"):
        device_data(DataSettings(source="csv", path=str(tmp_path / "nothing.csv"), label_column="y"))
    (tmp_path / "pickled.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="pickled.npz cannot be read"):
        device_data(DataSettings(source="npz", path=str(tmp_path / "pickled.npz")))


def test_config_paths_are_read_from_the_config_folder_and_may_not_leave_it(tmp_path):
    device = tmp_path / "device"
    image_folder(device / "photos")
    (tmp_path / "elsewhere").mkdir()
    base = 'device_id = "d1"\n[data]\nsource = "imagefolder"\ninput_shape = [3, 8, 8]\n'
    (device / "edge.toml").write_text(base + 'path = "photos"\n')
    assert load_edge_config(device / "edge.toml").data.path == str(device / "photos")
    for path, problem in (("../elsewhere", "leads out of"), ("fotos", "does not exist"),
                          ("photos/red/0.jpg", "is not a folder")):
        (device / "edge.toml").write_text(base + f'path = "{path}"\n')
        with pytest.raises(EdgeConfigError, match=problem):
            load_edge_config(device / "edge.toml")
    (device / "edge.toml").write_text(base + 'path = "photos"\nlabel_column = "x"\n')
    with pytest.raises(EdgeConfigError, match="the imagefolder source does not read label_column"):
        load_edge_config(device / "edge.toml")
    with pytest.raises(ValueError, match="'red' listed more than once"):
        DataSettings(source="imagefolder", path=str(device / "photos"), input_shape=[3, 8, 8],
                     classes=["red", "green", "red"])
    # The old keys are still a benchmark shard.
    (device / "edge.toml").write_text('device_id = "d1"\n[data]\ndataset = "mnist"\nclients = 4\n'
                                      'device_index = 3\n')
    data = load_edge_config(device / "edge.toml").data
    assert (data.source, data.dataset, data.clients, data.device_index) == ("benchmark", "mnist", 4, 3)

    run = tmp_path / "run.toml"
    run.write_text('dataset = "mnist"\n[data]\nsource = "imagefolder"\npath = "device/photos"\n'
                   'input_shape = [3, 8, 8]\n')
    with pytest.raises(ConfigError, match="dataset: the data is named in \\[data\\]"):
        load_config(run)
    run.write_text('[data]\ndataset = "mnist"\nclients = 4\n')
    with pytest.raises(ConfigError, match="data.clients: a simulation's clients"):
        load_config(run)


def test_a_device_refuses_a_task_whose_model_does_not_fit_its_data(tmp_path, sqlite_url):
    image_folder(tmp_path / "photos")
    h = Harness(tmp_path, sqlite_url, devices=1)
    task = first_task(h)  # fedp3_cnn on Fashion-MNIST: (1, 28, 28), 10 classes
    restart_agent(h, data={"source": "imagefolder", "path": str(tmp_path / "photos"),
                           "input_shape": [3, 8, 8], "classes": ["red", "green", "blue"]})
    send_task(h, task)
    [refusal] = refusals_in(h.to_coordinator)
    assert refusal.code.value == "bad_task"
    assert "takes input (1, 28, 28) and has 10 classes" in refusal.message
    assert "data is (3, 8, 8) with 3 classes:" in refusal.message
    assert "red" not in refusal.message  # nothing of the data but counts leaves the device
    assert not (tmp_path / DEVICE / "model.pt").exists()


def test_an_edge_agent_on_an_image_folder_registers_its_usable_samples(tmp_path, broker):
    device = tmp_path / "device"
    bad = image_folder(device / "photos", per_class=7)
    (device / "edge.toml").write_text(textwrap.dedent(f"""
        device_id = "photo-1"
        broker = "{broker.url}"
        fleet = "test"
        state_dir = "{tmp_path / 'state'}"
        profile = "catalogue:rpi4-4gb"
        [data]
        source = "imagefolder"
        path = "photos"
        classes = ["red", "green", "blue"]
        input_shape = [3, 16, 16]
    """))
    wire = fleet_wire(broker.url, "photos")
    agent = edge_agent_process(device / "edge.toml", tmp_path / "agent.log", "photo-1").start()
    try:
        [registration] = wire.wait("register", 1, timeout=60)
        header = parse_header(decode_envelope(registration))
        assert isinstance(header, RegisterHeader)
        assert header.num_samples == split_sizes(21)[0]  # 3 x 7 written, the bad ones apart
        assert header.skipped == bad
    finally:
        stop_processes([agent])
        wire.close()


# --- loss and optimizer --------------------------------------------------------------------------
def test_loss_and_optimizer_names_are_the_registered_ones():
    assert set(get_args(LossName)) == set(LOSSES)
    assert set(get_args(OptimizerName)) == set(OPTIMIZERS)
    with pytest.raises(ValueError, match="'sgd' or 'adam'"):
        TrainSettings(optimizer="rmsprop")
    with pytest.raises(ValueError, match="label_smoothing applies to loss"):
        TrainSettings(label_smoothing=0.2)
    with pytest.raises(ValueError, match="momentum is SGD's"):
        TrainSettings(optimizer="adam", momentum=0.9)
    sent = TrainSettings(optimizer="adam", loss="label_smoothing", label_smoothing=0.05)
    assert TrainSettings.model_validate(sent.model_dump(mode="json")) == sent  # as a TASK carries it


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("loss", ["cross_entropy", "label_smoothing"])
def test_dp_training_learns_with_each_optimizer_and_loss(optimizer, loss):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, 10, generator=generator)
    y = (x @ torch.randn(10, 3, generator=generator)).argmax(1)
    model = build_model(model_spec("mlp", (10,), 3), seed=0)
    config = TrainSettings(optimizer=optimizer, loss=loss, lr=0.1 if optimizer == "sgd" else 0.01,
                           local_epochs=4, batch_size=60)
    report = train_locally(model, x[:500], y[:500], config, {}, seed=0,
                           dp=DPSettings(noise_multiplier=0.5), noise_multiplier=0.5)
    [(noise, rate, steps)] = report.privacy_history  # 9 Poisson batches an epoch, 4 epochs
    assert (noise, steps) == (0.5, 36) and rate == pytest.approx(1 / 9)
    assert accuracy(model, x[500:], y[500:]) > chance_accuracy(y[500:]) + 0.2
