"""Loading, verification, download and data-dir resolution against the real files."""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_sdk.data import DataError, ensure_file, load_dataset, read_idx, resolve_data_dir, to_tensor
from edge_sdk.data import datasets as ds
from edge_sdk.data import locate

LABELS_REL = "fashion-mnist/train-labels-idx1-ubyte.gz"
LABELS_SHA = ds._SHA256[LABELS_REL]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    root = resolve_data_dir()
    if not (root / LABELS_REL).is_file():
        pytest.fail(f"shared data not found under {root}; run the tests from the repository root")
    return root


@pytest.fixture(scope="module")
def fmnist(data_dir):
    return load_dataset("fashion-mnist", data_dir=data_dir, download=False)


@pytest.fixture(scope="module")
def femnist(data_dir):
    return load_dataset("femnist", data_dir=data_dir, download=False)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass


@pytest.fixture
def serve():
    """Serve a directory on 127.0.0.1 (free port) in a thread; yields a URL factory."""
    servers = []

    def start(directory: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- loading ----------------------------------------------------------------------------


def test_fashion_mnist_shapes_and_labels(fmnist):
    assert fmnist.train_x.shape == (60000, 1, 28, 28)
    assert fmnist.test_x.shape == (10000, 1, 28, 28)
    assert fmnist.train_x.dtype == np.uint8 and fmnist.test_x.dtype == np.uint8
    assert fmnist.train_y.dtype == np.int64 and fmnist.train_y.shape == (60000,)
    assert fmnist.test_y.shape == (10000,)
    assert fmnist.info.num_classes == 10 and len(fmnist.info.labels) == 10
    assert fmnist.train_y.min() == 0 and fmnist.train_y.max() == 9
    assert set(np.unique(fmnist.test_y)) == set(range(10))
    assert np.bincount(fmnist.train_y).tolist() == [6000] * 10
    assert fmnist.train_writers is None and fmnist.test_writers is None


def test_arrays_are_read_only(fmnist):
    with pytest.raises(ValueError):
        fmnist.train_x[0, 0, 0, 0] = 1
    with pytest.raises(ValueError):
        fmnist.train_y[0] = 1


def test_load_is_cached_and_alias_works(fmnist, data_dir):
    assert load_dataset("fmnist", data_dir=data_dir, download=False) is fmnist


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="fashion-mnist.*mnist.*femnist"):
        load_dataset("cifar-10", download=False)


def test_to_tensor_normalises(fmnist):
    x = to_tensor(fmnist.train_x, fmnist.info)
    assert x.dtype == torch.float32 and x.shape == (60000, 1, 28, 28)
    assert abs(x.mean().item()) < 1e-3
    assert abs(x.std().item() - 1.0) < 1e-3
    one = to_tensor(fmnist.train_x[0], fmnist.info)
    assert torch.equal(one, x[0])


def test_femnist(femnist):
    info = femnist.info
    assert info.num_classes == 62 and len(info.labels) == 62 and info.input_scale == 1.0
    assert info.labels[10] == "A" and info.labels[36] == "a"
    assert femnist.train_x.shape == (4536, 1, 28, 28) and femnist.test_x.shape == (518, 1, 28, 28)
    assert femnist.train_x.dtype == np.float32
    assert femnist.train_x.min() >= 0.0 and femnist.train_x.max() <= 1.0
    assert femnist.train_y.min() >= 0 and femnist.train_y.max() <= 61
    assert len(np.unique(femnist.train_writers)) == 31
    assert femnist.train_writers.shape == femnist.train_y.shape
    assert femnist.test_writers.shape == femnist.test_y.shape
    # One index space: every test writer also has training data.
    assert set(np.unique(femnist.test_writers)) <= set(np.unique(femnist.train_writers))
    # LEAF stores background as 1.0, so the mean is close to 1.
    assert femnist.train_x.mean() > 0.9
    x = to_tensor(femnist.train_x, info)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1.0) < 1e-3


# --- verification -------------------------------------------------------------------------


def test_corrupted_file_rejected(data_dir, tmp_path):
    target = tmp_path / LABELS_REL
    target.parent.mkdir(parents=True)
    raw = bytearray((data_dir / LABELS_REL).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        ensure_file(tmp_path, LABELS_REL, LABELS_SHA, url=None, download=False)
    msg = str(err.value)
    assert str(target) in msg and "sha256" in msg and LABELS_SHA in msg


def test_valid_copy_accepted_and_verification_cached(data_dir, tmp_path, monkeypatch):
    target = tmp_path / LABELS_REL
    target.parent.mkdir(parents=True)
    shutil.copyfile(data_dir / LABELS_REL, target)
    assert ensure_file(tmp_path, LABELS_REL, LABELS_SHA, url=None, download=False) == target

    def no_rehash(*_a, **_k):
        raise AssertionError("file was hashed again")

    monkeypatch.setattr(locate.hashlib, "sha256", no_rehash)
    assert ensure_file(tmp_path, LABELS_REL, LABELS_SHA, url=None, download=False) == target


def test_missing_file_names_expected_path(tmp_path):
    with pytest.raises(DataError) as err:
        ensure_file(tmp_path, LABELS_REL, LABELS_SHA, url="http://127.0.0.1:9/x", download=False)
    msg = str(err.value)
    assert str(tmp_path / LABELS_REL) in msg and "FEDPRUNE_DATA" in msg


def test_missing_dataset_via_load(tmp_path):
    with pytest.raises(DataError, match="missing data file"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_idx_parser_rejects_truncated_file(data_dir, tmp_path):
    with gzip.open(data_dir / LABELS_REL, "rb") as fh:
        raw = fh.read()
    assert read_idx(data_dir / LABELS_REL, (None,)).shape == (60000,)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as fh:
        fh.write(raw[:-10])
    with pytest.raises(DataError, match="short.gz.*expected exactly"):
        read_idx(short, (None,))
    wrong_magic = tmp_path / "magic.gz"
    with gzip.open(wrong_magic, "wb") as fh:
        fh.write(b"\x00\x00\x08\x03" + raw[4:])
    with pytest.raises(DataError, match="magic.gz.*magic"):
        read_idx(wrong_magic, (None,))
    cut_gzip = tmp_path / "cut.gz"
    cut_gzip.write_bytes((data_dir / LABELS_REL).read_bytes()[:1000])
    with pytest.raises(DataError, match="cut.gz"):
        read_idx(cut_gzip, (None,))


# --- download -------------------------------------------------------------------------------


def test_download_verifies_and_installs(data_dir, tmp_path, serve):
    served = tmp_path / "served"
    (served / "fashion-mnist").mkdir(parents=True)
    for name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copyfile(data_dir / "fashion-mnist" / name, served / "fashion-mnist" / name)
    base = serve(served)
    dest = tmp_path / "dest"
    path = ensure_file(dest, LABELS_REL, LABELS_SHA, url=f"{base}/{LABELS_REL}", download=True)
    assert path == dest / LABELS_REL
    assert path.read_bytes() == (data_dir / LABELS_REL).read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left


def test_download_with_wrong_content_is_discarded(data_dir, tmp_path, serve):
    served = tmp_path / "served"
    (served / "fashion-mnist").mkdir(parents=True)
    # Right name, wrong bytes: the test-labels file served as the train-labels file.
    shutil.copyfile(data_dir / "fashion-mnist/t10k-labels-idx1-ubyte.gz", served / LABELS_REL)
    base = serve(served)
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="sha256"):
        ensure_file(dest, LABELS_REL, LABELS_SHA, url=f"{base}/{LABELS_REL}", download=True)
    assert not (dest / LABELS_REL).exists()
    leftovers = list((dest / "fashion-mnist").iterdir()) if (dest / "fashion-mnist").exists() else []
    assert leftovers == []


def test_download_http_error_is_data_error(tmp_path, serve):
    base = serve(tmp_path)
    with pytest.raises(DataError, match="could not download"):
        ensure_file(tmp_path / "dest", LABELS_REL, LABELS_SHA, url=f"{base}/nope.gz", download=True)


def test_load_dataset_from_mirror(data_dir, tmp_path, serve, monkeypatch):
    served = tmp_path / "served"
    (served / "mnist").mkdir(parents=True)
    for f in (data_dir / "mnist").iterdir():
        os.symlink(f, served / "mnist" / f.name)
    monkeypatch.setenv("FEDPRUNE_MIRROR", serve(served) + "/")
    src = load_dataset("mnist", data_dir=tmp_path / "dest", download=True)
    assert src.train_x.shape == (60000, 1, 28, 28) and src.test_y.shape == (10000,)
    assert src.info.labels == tuple("0123456789")
    assert (tmp_path / "dest/mnist/train-images-idx3-ubyte.gz").is_file()


def test_download_env_default(monkeypatch):
    monkeypatch.delenv("FEDPRUNE_DOWNLOAD", raising=False)
    assert locate.download_enabled_by_default()
    monkeypatch.setenv("FEDPRUNE_DOWNLOAD", "0")
    assert not locate.download_enabled_by_default()


def test_download_disabled_by_env_for_load(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRUNE_DOWNLOAD", "0")
    with pytest.raises(DataError, match="disabled"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


# --- resolution order ------------------------------------------------------------------


def test_resolve_order(tmp_path, monkeypatch):
    cwd = tmp_path / "work" / "main"
    cwd.mkdir(parents=True)
    shared = tmp_path / "work" / "shared" / "data"
    shared.mkdir(parents=True)
    env_dir = tmp_path / "env"
    explicit = tmp_path / "explicit"
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("FEDPRUNE_DATA", raising=False)
    assert resolve_data_dir() == shared.resolve()
    monkeypatch.setenv("FEDPRUNE_DATA", str(env_dir))
    assert resolve_data_dir() == env_dir.resolve()
    assert resolve_data_dir(explicit) == explicit.resolve()
    assert resolve_data_dir(str(explicit)) == explicit.resolve()


def test_resolve_falls_back_to_repo_then_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDPRUNE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data here
    repo_shared = tmp_path / "repo_shared"
    repo_shared.mkdir()
    monkeypatch.setattr(locate, "_repo_shared_data", lambda: repo_shared)
    assert resolve_data_dir() == repo_shared.resolve()
    monkeypatch.setattr(locate, "_repo_shared_data", lambda: tmp_path / "absent")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cache = resolve_data_dir()
    assert cache == (tmp_path / "home/.cache/fedprune/data").resolve() and cache.is_dir()
