"""From a source's raw records to finished tensors, with every bad record skipped and counted.

Every kind of source (image folder, CSV, npz, a user's function) yields `Record`s: one raw sample,
its raw label and where it came from. The rules that hold for all of them live here, once: the
values must be numbers, finite, and of the model's input shape; the label must be one of the
classes. A record that breaks a rule is skipped and counted by reason (`SkipLog`), with the first
few places it happened, because a device's own data always has a broken file or a typo somewhere
and one of them must not stop the device from training on the rest.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..locate import DataError

log = logging.getLogger("fedprune.data")

# A reason is a key of REGISTER's `skipped` (edge_sdk/protocol/messages.py bounds it the same way).
REASON = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
EXAMPLES = 3  # places kept per reason: enough to find the pattern, few enough to read


@dataclass(frozen=True)
class Record:
    """One raw sample: `where` names it for a person ("cats/003.jpg", "data.csv row 7")."""

    x: Any
    label: Any
    where: str
    user: Any = None


@dataclass
class Records:
    """What a kind read: its records, the file or function they come from, the class list the
    data itself implies (an image folder's sub-folders), and what raw values were divided by
    (an image's 255), which an exported model's input contract states."""

    items: Iterable[Record]
    origin: str
    classes: tuple[str, ...] | None = None
    input_scale: float = 1.0


@dataclass
class SkipLog:
    """Skipped records by reason, with the first few places each happened."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        if not REASON.match(reason):
            raise ValueError(f"skip reason {reason!r} must be lower_snake_case, at most 40 characters")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES:
            shown.append(f"{where}: {detail}"[:300] if detail else where[:300])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """`reason N (first: place; place)` per reason, most frequent first."""
        return "; ".join(f"{reason} {count} (first: {', '.join(self.examples[reason])})"
                         for reason, count in sorted(self.counts.items(), key=lambda kv: -kv[1]))


@dataclass(frozen=True, eq=False)
class Samples:
    """Usable samples: x float32 of shape (N, *input_shape), normalised; y int64 class indices."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]
    input_scale: float
    users: np.ndarray | None = None  # int64 user ids (the natural partition), when the data has them

    def subset(self, index: np.ndarray) -> Samples:
        picked = torch.from_numpy(np.asarray(index, dtype=np.int64))
        return Samples(self.x[picked], self.y[picked], self.classes, self.input_shape,
                       self.input_scale, None if self.users is None else self.users[index])


def collect(records: Records, skips: SkipLog, *, input_shape: tuple[int, ...] | None,
            classes: tuple[str, ...] | None, mean: tuple[float, ...] | None = None,
            std: tuple[float, ...] | None = None, users: bool = False,
            minimum: int = 1) -> Samples:
    """The usable samples of `records`. `input_shape` None: the first usable record's; `classes`
    None: the kind's, else the labels' (integers 0..max, or sorted names). Refuses (DataError)
    with the first failures named when fewer than `minimum` samples are usable."""
    xs: list[np.ndarray] = []
    keys: list[str] = []
    places: list[str] = []
    owners: list[str] = []
    seen = 0
    for record in records.items:
        seen += 1
        x = _values(record, skips, input_shape)
        if x is None:
            continue
        if input_shape is None:
            input_shape = tuple(int(d) for d in x.shape) or (1,)
            x = x.reshape(input_shape)
        key, problem = label_key(record.label)
        if key is None:
            skips.skip(problem, record.where, f"label {_shown(record.label)}")
            continue
        if users:
            owner, _ = label_key(record.user)
            if owner is None:
                skips.skip("missing_user", record.where, f"user {_shown(record.user)}")
                continue
            owners.append(owner)
        xs.append(x)
        keys.append(key)
        places.append(record.where)
    if classes is None:
        classes = records.classes or default_classes(keys)
    lookup = class_lookup(classes)
    kept, labels = [], []
    for i, key in enumerate(keys):
        index = lookup(key)
        if index is None:
            skips.skip("unknown_label", places[i], f"label {key!r} is not one of the "
                       f"{len(classes)} classes")
            continue
        kept.append(i)
        labels.append(index)
    if len(kept) < minimum:
        what = "no usable sample" if not kept else f"only {len(kept)} usable sample(s)"
        found = f"{seen} record(s)" if seen else "nothing to read"
        raise DataError(f"{records.origin}: {what} (found {found}; need at least {minimum})"
                        + (f"; skipped: {skips.summary()}" if skips.total else ""))
    x = torch.from_numpy(np.stack([xs[i] for i in kept]).astype(np.float32, copy=False))
    if mean is not None or std is not None:
        x = normalised(x, mean, std)
    ids = None
    if users:
        _, ids = np.unique(np.asarray([owners[i] for i in kept]), return_inverse=True)
        ids = ids.astype(np.int64)
    return Samples(x, torch.tensor(labels, dtype=torch.int64), tuple(classes), input_shape,
                   records.input_scale, ids)


def _values(record: Record, skips: SkipLog, input_shape: tuple[int, ...] | None) -> np.ndarray | None:
    """The record's values as float32 of `input_shape` (a flat row of the right size is
    reshaped), or None when they are not numbers, not finite or not of that shape."""
    raw = record.x
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    try:
        x = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as exc:
        skips.skip("not_numeric", record.where, str(exc)[:120])
        return None
    if x.size == 0:
        skips.skip("wrong_shape", record.where, "no values")
        return None
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        skips.skip("not_finite", record.where, f"{bad} value(s) NaN or infinite")
        return None
    if input_shape is not None:
        if x.size != math.prod(input_shape):
            skips.skip("wrong_shape", record.where, f"shape {tuple(x.shape)}, not {tuple(input_shape)}")
            return None
        x = x.reshape(input_shape)
    return x


def label_key(raw: Any) -> tuple[str | None, str]:
    """A raw label as a class name (integers as "3", whatever type they came in), or (None,
    the reason it is not one)."""
    if isinstance(raw, torch.Tensor):
        if raw.numel() != 1:
            return None, "unknown_label"
        raw = raw.item()
    if isinstance(raw, np.generic):
        raw = raw.item()
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, bool):
        return str(int(raw)), ""
    if isinstance(raw, int):
        return str(raw), ""
    if isinstance(raw, float):
        if math.isnan(raw):
            return None, "missing_label"
        return (str(int(raw)), "") if raw.is_integer() else (None, "unknown_label")
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            return None, "missing_label"
        if text.lower() in ("nan", "na", "null", "none"):
            return None, "missing_label"
        try:
            number = float(text)
        except ValueError:
            return text, ""
        return (str(int(number)), "") if number.is_integer() else (text, "")
    if raw is None:
        return None, "missing_label"
    return None, "unknown_label"


def _integer(key: str) -> int | None:
    return int(key) if re.fullmatch(r"-?\d+", key) else None


def default_classes(keys: list[str]) -> tuple[str, ...]:
    """Integer labels 0..max (they are class indices already); otherwise the sorted names."""
    numbers = [_integer(key) for key in set(keys)]
    if numbers and all(n is not None and n >= 0 for n in numbers):
        return tuple(str(i) for i in range(max(numbers) + 1))
    return tuple(sorted(set(keys)))


def class_lookup(classes: tuple[str, ...]):
    """key -> class index, or None. A label is a class by name; an integer label is an index
    into the classes as well when no class is named by an integer (labels 0/1 for
    classes = ["benign", "malignant"])."""
    names = {name: i for i, name in enumerate(classes)}
    by_index = not any(_integer(name) is not None for name in classes)

    def lookup(key: str) -> int | None:
        if key in names:
            return names[key]
        number = _integer(key) if by_index else None
        return number if number is not None and 0 <= number < len(classes) else None

    return lookup


def normalised(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel (axis 1), one value or one per channel."""
    channels = x.shape[1] if x.ndim > 1 else 1
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean_t = torch.tensor(mean if mean is not None else (0.0,), dtype=torch.float32)
    std_t = torch.tensor(std if std is not None else (1.0,), dtype=torch.float32)
    for name, values in (("mean", mean_t), ("std", std_t)):
        if len(values) not in (1, channels):
            raise DataError(f"[data] {name} has {len(values)} values; give one, or one per channel "
                            f"({channels})")
    return (x - mean_t.reshape(shape)) / std_t.reshape(shape)


def _shown(value: Any) -> str:
    return repr(value)[:60]


def report(skips: SkipLog, origin: str, usable: int) -> None:
    """One log line: how many samples were usable, what was skipped and where first."""
    if skips.total:
        log.warning("%s: %d usable sample(s), %d skipped: %s", origin, usable, skips.total,
                    skips.summary())
    else:
        log.info("%s: %d usable sample(s)", origin, usable)
