"""Loaders for the real image datasets used in the federated simulations.

Files are pinned by sha256 (see /work/shared/data/SOURCES.md) and parsed with
strict format checks, so a wrong or damaged file fails loudly instead of
producing a quietly different experiment.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import string
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..runtime.predictor import normalise

from .locate import DataError, download_enabled_by_default, ensure_file, resolve_data_dir

__all__ = [
    "DATASET_NAMES",
    "DatasetInfo",
    "FederatedSource",
    "load_dataset",
    "read_idx",
    "to_tensor",
]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    labels: tuple[str, ...]
    input_scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


# eq=False: numpy arrays make field-wise equality ambiguous; identity is what matters.
@dataclass(frozen=True, eq=False)
class FederatedSource:
    info: DatasetInfo
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_writers: np.ndarray | None
    test_writers: np.ndarray | None


# sha256 of every file, copied from shared/data/SOURCES.md.
_SHA256: dict[str, str] = {
    "fashion-mnist/t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    "fashion-mnist/train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "fashion-mnist/train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "mnist/t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "mnist/t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    "mnist/train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "mnist/train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "femnist-leaf-sample/test/all_data_0_niid_05_keep_0_test_9.json": "979c4ab82ccbc6de67656cfdfc7412900910099014a7c134d64a36347ca6be41",
    "femnist-leaf-sample/test/all_data_1_niid_05_keep_0_test_9.json": "e7dabc622469a0941c32ba03c14ba8c1f2f2c24e03378926f2b4d60a10f5a537",
    "femnist-leaf-sample/test/all_data_2_niid_05_keep_0_test_9.json": "86f292986d0843c50f08d069125f73fddd4fff59a990e6a4c7cc7fff472696b1",
    "femnist-leaf-sample/test/all_data_3_niid_05_keep_0_test_9.json": "99f701d9394a8516a4cb86eb96e3565bf8a405e490ae00487f882419ca86d6fc",
    "femnist-leaf-sample/test/all_data_4_niid_05_keep_0_test_9.json": "2a4c61b74d2efd1dcd6b7eaa6a970ca10da82f6b1f3b419839c6ae314e85b14b",
    "femnist-leaf-sample/test/all_data_5_niid_05_keep_0_test_9.json": "63b48265b8ccae669c770ce7846976dbd62e7b848e9c36563d93a364f0109607",
    "femnist-leaf-sample/train/all_data_0_niid_05_keep_0_train_9.json": "e52c8724a9a3ea3ff3fecc179b3f322efa25fe84a1d712a37ee94586f08123c6",
    "femnist-leaf-sample/train/all_data_1_niid_05_keep_0_train_9.json": "e7e9a1b23bc206e1feeb94d4f993d911ed950adc47e92ce52954597197b99c13",
    "femnist-leaf-sample/train/all_data_2_niid_05_keep_0_train_9.json": "a71f9d0d1ab95b98bb95f20cdcab02097125efab27d9ce341045cb07d565409d",
    "femnist-leaf-sample/train/all_data_3_niid_05_keep_0_train_9.json": "1623ade048b1c1991d3aa6d5a658dcb67e83fe1def41c2b2647f466f3f3c91db",
    "femnist-leaf-sample/train/all_data_4_niid_05_keep_0_train_9.json": "133facbc92bfaffe3b315a147cd458ca20e3283d3f48882ad72e953c4906e435",
    "femnist-leaf-sample/train/all_data_5_niid_05_keep_0_train_9.json": "2a2b8dccb528033995b0d29ddd953edf002242ed4869c99b23983570b37348de",
}

# Upstream base URL per data subdirectory; the part of a relative path after the
# subdirectory is appended to it.
_UPSTREAM: dict[str, str] = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "femnist-leaf-sample": (
        "https://raw.githubusercontent.com/slz-ai/leaf-torch/"
        "5a94e3b721bf5920a25d59d800481380602b7862/data/femnist/data/"
    ),
}

_FASHION_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FEMNIST_LABELS = tuple(string.digits + string.ascii_uppercase + string.ascii_lowercase)

# Mean/std were computed once over each full training set (after scaling) and are
# fixed here so normalisation never depends on which clients are sampled.
_INFOS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", (1, 28, 28), 10, _FASHION_LABELS, 255.0, (0.28604060,), (0.35302424,)
    ),
    "mnist": DatasetInfo(
        "mnist", (1, 28, 28), 10, tuple(string.digits), 255.0, (0.13066048,), (0.30810780,)
    ),
    "femnist": DatasetInfo(
        "femnist", (1, 28, 28), 62, _FEMNIST_LABELS, 1.0, (0.96204230,), (0.16321050,)
    ),
}

_ALIASES = {"fmnist": "fashion-mnist"}
DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "fmnist", "mnist", "femnist")

_FEMNIST_SHARDS = range(6)
_IDX_UBYTE = 0x08


def _canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _INFOS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """A dataset's shape, classes and normalisation without reading its files: what a
    coordinator that neither evaluates nor exports needs (the files are 55 MB in memory)."""
    return _INFOS[_canonical_name(name)]


def _file_list(name: str) -> list[str]:
    if name == "femnist":
        return [
            f"femnist-leaf-sample/{split}/all_data_{i}_niid_05_keep_0_{split}_9.json"
            for split in ("train", "test")
            for i in _FEMNIST_SHARDS
        ]
    return [
        f"{name}/{split}-{kind}-ubyte.gz"
        for split in ("train", "t10k")
        for kind in ("images-idx3", "labels-idx1")
    ]


def _url_for(rel_path: str) -> str:
    """A mirror serves the shared/data layout verbatim, which lets tests and
    air-gapped sites stand in for the upstream hosts."""
    mirror = os.environ.get("FEDPRUNE_MIRROR", "").strip()
    if mirror:
        return f"{mirror.rstrip('/')}/{rel_path}"
    subdir, tail = rel_path.split("/", 1)
    return _UPSTREAM[subdir] + tail


def read_idx(path: Path, expected_dims: tuple[int | None, ...]) -> np.ndarray:
    """Parse a gzip'd IDX file of unsigned bytes; None in expected_dims means any size.

    Checked independently of the sha256 so the parser is safe on any input.
    """
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a valid gzip file ({exc}); delete it and re-download") from exc
    ndim = len(expected_dims)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header truncated ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise DataError(
            f"{path}: bad IDX magic {raw[:4].hex()}, expected 000008{ndim:02x} "
            f"(unsigned bytes, {ndim} dimension(s))"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    for got, want in zip(dims, expected_dims):
        if want is not None and got != want:
            raise DataError(f"{path}: IDX dimensions {dims}, expected {expected_dims}")
    expected_len = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected_len:
        raise DataError(
            f"{path}: IDX payload is {len(raw)} bytes, expected exactly {expected_len} for dims {dims}"
        )
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    arr.setflags(write=False)
    return arr


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


def _load_idx_split(data_dir: Path, name: str, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    img_path = data_dir / f"{name}/{split}-images-idx3-ubyte.gz"
    lbl_path = data_dir / f"{name}/{split}-labels-idx1-ubyte.gz"
    images = read_idx(img_path, (None, 28, 28))
    labels = read_idx(lbl_path, (None,))
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"{lbl_path}: label {labels.max()} outside 0..{num_classes - 1}")
    x = images.reshape(len(images), 1, 28, 28)
    return _readonly(x), _readonly(labels.astype(np.int64))


def _read_leaf_shard(path: Path, num_classes: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            doc = json.load(fh)
        users, counts, user_data = doc["users"], doc["num_samples"], doc["user_data"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a LEAF FEMNIST JSON shard ({exc!r})") from exc
    if len(users) != len(counts):
        raise DataError(f"{path}: {len(users)} users but {len(counts)} num_samples entries")
    out = []
    for user, count in zip(users, counts):
        try:
            x = np.asarray(user_data[user]["x"], dtype=np.float32)
            y = np.asarray(user_data[user]["y"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: bad record for writer {user!r} ({exc!r})") from exc
        if x.shape != (count, 784) or y.shape != (count,):
            raise DataError(
                f"{path}: writer {user!r} has x{x.shape}, y{y.shape}, expected {count} samples of 784 values"
            )
        if count and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
            raise DataError(f"{path}: writer {user!r} has pixel values outside [0, 1]")
        if count and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{path}: writer {user!r} has labels outside 0..{num_classes - 1}")
        out.append((user, x, y))
    return out


def _load_femnist(data_dir: Path, num_classes: int) -> tuple[np.ndarray, ...]:
    splits: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for split in ("train", "test"):
        records = []
        for i in _FEMNIST_SHARDS:
            path = data_dir / f"femnist-leaf-sample/{split}/all_data_{i}_niid_05_keep_0_{split}_9.json"
            records.extend(_read_leaf_shard(path, num_classes))
        splits[split] = records
    # One index space over train and test so a writer is the same client in both.
    writer_ids = sorted({user for records in splits.values() for user, _, _ in records})
    index_of = {w: i for i, w in enumerate(writer_ids)}
    arrays = []
    for split in ("train", "test"):
        records = splits[split]
        x = np.concatenate([r[1] for r in records]).reshape(-1, 1, 28, 28)
        y = np.concatenate([r[2] for r in records])
        w = np.concatenate([np.full(len(r[2]), index_of[r[0]], dtype=np.int64) for r in records])
        arrays += [_readonly(x), _readonly(y), _readonly(w)]
    return tuple(arrays)


@functools.lru_cache(maxsize=4)
def _parse_cached(data_dir: str, name: str) -> FederatedSource:
    """Parsing is the slow part and simulations load the same data repeatedly, so
    keep a few parsed datasets; callers verify checksums before reaching here."""
    root = Path(data_dir)
    info = _INFOS[name]
    if name == "femnist":
        trx, try_, trw, tex, tey, tew = _load_femnist(root, info.num_classes)
        return FederatedSource(info, trx, try_, tex, tey, trw, tew)
    train_x, train_y = _load_idx_split(root, name, "train", info.num_classes)
    test_x, test_y = _load_idx_split(root, name, "t10k", info.num_classes)
    return FederatedSource(info, train_x, train_y, test_x, test_y, None, None)


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool | None = None) -> FederatedSource:
    """Load a dataset's official train/test splits as read-only arrays.

    download=None defers to FEDPRUNE_DOWNLOAD; files are always checksum-verified
    (cheaply, via a stat-keyed digest cache) before the cached parse is reused.
    """
    canonical = _canonical_name(name)
    root = resolve_data_dir(data_dir)
    allow = download_enabled_by_default() if download is None else bool(download)
    for rel_path in _file_list(canonical):
        ensure_file(root, rel_path, _SHA256[rel_path], _url_for(rel_path), allow)
    return _parse_cached(str(root), canonical)


def to_tensor(x: np.ndarray, info: DatasetInfo) -> torch.Tensor:
    """Scale and standardise per channel, as the exported models' input contract says.

    Works on (N, C, H, W) or one (C, H, W) sample; the arithmetic is the edge runtime's own, so
    training, evaluation and on-device inference see identical inputs.
    """
    arr = np.asarray(x)
    channels = len(info.mean)
    if arr.ndim < 3 or arr.shape[-3] != channels:
        raise ValueError(f"expected channel axis of size {channels} at position -3, got shape {arr.shape}")
    out = normalise(arr, info.input_shape, info.input_scale, info.mean, info.std)
    return torch.from_numpy(out[0] if arr.ndim == 3 else out)
