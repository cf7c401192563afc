"""Write the Wisconsin breast cancer table (569 tumours, 30 measurements each) as CSV files.

The table ships inside scikit-learn, so this example needs no download. Each row is one
tumour's 30 cell-nucleus measurements (radius, texture, area, ...: the features, on their own
scales) and its diagnosis in the last column, `diagnosis`, as the words "malignant" or
"benign"; a fifth of the rows, the same ones every run, are kept apart as the test file:
    breast_cancer_train.csv, breast_cancer_test.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer


def write_csv(out: Path, test_share: float = 0.2, seed: int = 0) -> dict[str, int]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".", help="folder to write (default: %(default)s)")
    counts = write_csv(Path(parser.parse_args().out))
    print(f"wrote {counts['train']} training and {counts['test']} test rows")


if __name__ == "__main__":
    main()
