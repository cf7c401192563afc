"""A multilayer perceptron for tabular rows, an ordinary PyTorch module.

fedprune hands `build` the shape of one row as the data source reads it and the number of
classes; the network flattens whatever that shape is, so it takes a row of features however the
source lays it out. Width pruning narrows both hidden layers per device; the output layer (the
last parametrised module the forward pass runs) is never pruned.
"""

from __future__ import annotations

import math

from torch import nn


class TabularMLP(nn.Module):
    def __init__(self, features: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(features, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden // 2), nn.ReLU(),
        )
        self.head = nn.Linear(hidden // 2, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return TabularMLP(math.prod(input_shape), num_classes)
