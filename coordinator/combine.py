"""One round's updates into the next global model, the same way in the simulator and the service.

The strategy says whether uploads are averaged as values or as changes from the model each
device started from (FFGG's server step needs changes, which also makes a stale update mean
what it is); the aggregation rule (streaming mean by default, or a robust rule) combines them;
the strategy's `server_update` turns the aggregate into the new global state.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_sdk import codec

from .robust import AggregatorSettings, make_aggregator
from .strategies import Strategy


def change_from(update: Mapping[str, codec.SparseTensor], base: Mapping[str, np.ndarray]
                ) -> dict[str, codec.SparseTensor]:
    """Each uploaded entry's change from the model the device started from."""
    out = {}
    for name, tensor in update.items():
        start = base[name].reshape(-1)
        start = start if tensor.indices is None else start[tensor.indices]
        out[name] = codec.SparseTensor(tensor.shape, tensor.indices,
                                       (tensor.values - start).astype(np.float32))
    return out


class RoundCombiner:
    def __init__(self, strategy: Strategy, global_state: Mapping[str, np.ndarray],
                 aggregator: AggregatorSettings | None = None, seed: int = 0):
        self.strategy, self.global_state = strategy, global_state
        self.aggregator = make_aggregator({k: v.shape for k, v in global_state.items()}, aggregator,
                                          seed)

    def add(self, update: Mapping[str, codec.SparseTensor], weight: float,
            base: Mapping[str, np.ndarray] | None = None) -> None:
        """`update` in global indices; `base`: the state the device started from (default: this
        round's global state)."""
        if self.strategy.aggregates == "delta":
            update = change_from(update, self.global_state if base is None else base)
        self.aggregator.add_update(update, weight)

    def result(self) -> dict[str, np.ndarray]:
        if self.strategy.aggregates == "delta":
            zeros = {k: np.zeros_like(v) for k, v in self.global_state.items()}
            return self.strategy.server_update(dict(self.global_state), self.aggregator.apply(zeros))
        return self.strategy.server_update(dict(self.global_state),
                                           self.aggregator.apply(self.global_state))
