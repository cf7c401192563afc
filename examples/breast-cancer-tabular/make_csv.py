"""Write the Wisconsin breast cancer table (569 tumours, 30 measurements each) as CSV files.

The table ships inside scikit-learn, so this example needs no download. Each row is one
tumour's 30 cell-nucleus measurements (radius, texture, area, ...: the features, on their own
scales) and its diagnosis in the last column, `diagnosis`, as the words "malignant" or
"benign"; a fifth of the rows, the same ones every run, are kept apart as the test file:
    breast_cancer_train.csv, breast_cancer_test.csv
It prints the training file's per-column mean and standard deviation, as fedprune.toml's
[data] mean and std hold them: the features' scales differ by five orders of magnitude, and the
normalisation is part of the model's input contract (an exported model's manifest states it).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer


def write_csv(out: Path, test_share: float = 0.2, seed: int = 0) -> dict[str, int]:
    """The two files; returns their row counts."""
    table = load_breast_cancer()
    order = np.random.default_rng(seed).permutation(len(table.target))
    cut = round(test_share * len(order))
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, rows in (("train", order[cut:]), ("test", order[:cut])):
        with open(out / f"breast_cancer_{split}.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow([*(name.replace(" ", "_") for name in table.feature_names), "diagnosis"])
            for row in sorted(rows):
                writer.writerow([*(f"{v:.6g}" for v in table.data[row]),
                                 table.target_names[table.target[row]]])
        counts[split] = len(rows)
    return counts


def normalisation(train_csv: Path) -> tuple[list[float], list[float]]:
    """Per-feature mean and standard deviation of the training file, to 4 significant digits."""
    with open(train_csv, newline="") as file:
        rows = list(csv.reader(file))[1:]
    features = np.array([[float(v) for v in row[:-1]] for row in rows])
    return ([float(f"{v:.4g}") for v in features.mean(axis=0)],
            [float(f"{v:.4g}") for v in features.std(axis=0)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".", help="folder to write (default: %(default)s)")
    out = Path(parser.parse_args().out)
    counts = write_csv(out)
    print(f"wrote {counts['train']} training and {counts['test']} test rows; their [data] normalisation:")
    mean, std = normalisation(out / "breast_cancer_train.csv")
    print(f"mean = {mean}\nstd = {std}")


if __name__ == "__main__":
    main()
