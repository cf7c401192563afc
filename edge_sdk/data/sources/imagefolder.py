"""`source = "imagefolder"`: a folder with one sub-folder of images per class.

Images are read with Pillow, converted to the model's channels (1: L, 3: RGB, 4: RGBA), turned
upright by their EXIF orientation (phone pictures), resized to its H x W and scaled to [0, 1].
A file Pillow cannot read (corrupt, truncated, not an image, a decompression bomb) is skipped.
Hidden files and folders (`.DS_Store`, `.thumbnails`) are not data and are passed over silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..locate import DataError
from .records import Record, Records, SkipLog
from .registry import POOLED_KEYS, Part, SourceKind
from .settings import DataSettings

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_HELP = "a folder with one sub-folder of images per class: path/<class>/<image>"


def _check(settings: DataSettings) -> None:
    shape = settings.input_shape
    if shape is None or len(shape) != 3 or shape[0] not in _MODES:
        raise ValueError("input_shape: the imagefolder source needs the model's input as "
                         "[channels, height, width] with 1, 3 or 4 channels, e.g. [3, 32, 32]")


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def read(settings: DataSettings, part: Part, skips: SkipLog) -> Records | None:
    folder = settings.path if part == "train" else settings.test_path
    if folder is None:
        return None
    root = Path(folder)
    try:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    except OSError as exc:
        raise DataError(f"image folder {root} cannot be listed ({exc.strerror or exc})") from None
    return Records(_records(root, class_dirs, settings, skips), f"image folder {root}",
                   tuple(p.name for p in class_dirs), input_scale=255.0)


def _records(root: Path, class_dirs: list[Path], settings: DataSettings,
             skips: SkipLog) -> Iterator[Record]:
    for stray in sorted(p for p in root.iterdir() if p.is_file() and _visible(p)):
        skips.skip("outside_class_folder", stray.name, "a file beside the class folders")
    channels, height, width = settings.input_shape
    for class_dir in class_dirs:
        try:
            files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        except OSError as exc:  # one unreadable folder is one class missing here, not fatal
            skips.skip("unreadable_folder", class_dir.name, exc.strerror or str(exc))
            continue
        for file in files:
            relative = file.relative_to(root)
            if not all(_visible(Path(part)) for part in relative.parts):
                continue
            image = _image(file, _MODES[channels], (width, height), skips, str(relative))
            if image is not None:
                yield Record(image, class_dir.name, str(relative))


def _image(file: Path, mode: str, size: tuple[int, int], skips: SkipLog,
           where: str) -> np.ndarray | None:
    """(C, H, W) float32 in [0, 1], or None (skipped) when Pillow cannot read the file."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened).convert(mode)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    except Exception as exc:  # noqa: BLE001 - any file Pillow fails on is a bad sample, not fatal
        skips.skip("unreadable_image", where, f"{type(exc).__name__}: {exc}"[:160])
        return None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


KIND = SourceKind("imagefolder", read, keys=POOLED_KEYS, path="required", path_type="folder",
                  path_help=_HELP, check=_check)
