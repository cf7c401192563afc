"""Write scikit-learn's handwritten digits as a folder of 16x16 RGB PNG images, one folder per class.

The digits (1,797 scans of 8x8 pixels, 16 grey levels, from the UCI optical recognition set) ship
inside scikit-learn, so this example needs no download. Each image is scaled up with bilinear
interpolation and saved as RGB, the layout a camera's pictures sorted by class would have:
    images/train/<digit>/<n>.png   (80%)
    images/test/<digit>/<n>.png    (20%, the same split for every run)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

SIZE = 16


def write_images(out: Path, test_share: float = 0.2, seed: int = 0) -> dict[str, int]:
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    test = set(order[:round(test_share * len(order))].tolist())
    counts = {"train": 0, "test": 0}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        split = "test" if index in test else "train"
        folder = out / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((pixels * (255 / 16)).astype(np.uint8))
        grey.resize((SIZE, SIZE), Image.Resampling.BILINEAR).convert("RGB").save(folder / f"{index}.png")
        counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="images", help="folder to write (default: %(default)s)")
    counts = write_images(Path(parser.parse_args().out))
    print(f"wrote {counts['train']} training and {counts['test']} test images")


if __name__ == "__main__":
    main()
