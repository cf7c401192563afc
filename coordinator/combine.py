"""One round's updates into the next global model, the same way in the simulator and the service.

The strategy says whether uploads are averaged as values or as changes from the model each
device started from (FFGG's server step needs changes, which also makes a stale update mean
what it is); the aggregation rule (streaming mean by default, or a robust rule) combines them;
the strategy's `server_update` turns the aggregate into the new global state.

No device steers the round alone: its aggregation weight (its sample count, for sample-weighted
strategies) is capped at `aggregator.max_weight_ratio` (k, default 3) times the lower median of
the weights of the updates the round combines (`weight_cap`). A device that registered 1,000,000
samples, planned at 74,277, next to two of 60 weighs 180, not 99.8% of the round. The median is
only known once every weight is: a caller that knows them first (`weights`) has each update
folded in as it comes; otherwise the combiner holds the round's updates until `result()`.

Under user-level central DP (`central`, coordinator/central_dp.py) weights play no part: every
update, of values or of changes, is turned into its change from the state its device started
from, clipped, summed unweighted, noised and divided by the expected number of contributions;
the strategy's server step then takes the noised mean change (a delta strategy) or the global
state moved by it (a values strategy), as it takes the mean without DP.

Under secure aggregation (coordinator/secure_round.py) the coordinator never holds an update to
add: the round's `central` is then its `SecureAggregate`, the unmasked mean change per
coordinate, which goes through the same server step.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from edge_sdk import codec

from .central_dp import CentralRound
from .robust import AggregatorSettings, make_aggregator
from .strategies import Strategy

log = logging.getLogger(__name__)


def weight_cap(weights: Sequence[float], ratio: float | None) -> float:
    """The largest aggregation weight one update may carry in a round of `weights`: `ratio`
    times their lower median (a weight some update really has; with two updates the smaller,
    so neither of two outweighs the other more than `ratio` to 1). inf without a ratio."""
    if ratio is None or not weights:
        return math.inf
    return ratio * statistics.median_low(weights)


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
                 aggregator: AggregatorSettings | None = None, seed: int = 0,
                 weights: Sequence[float] | None = None, central: CentralRound | None = None):
        """`weights`: the weights of the updates the round will add, when the caller knows them
        before the first (the service's commit: its accepted tasks); each update is then folded
        in as it comes, and memory does not grow with the round. Without them the updates are
        held until `result()`, which knows the cap only then. `central`: the round's central-DP
        mechanism (weights are then only checked against `weights`, never applied), or a
        secure-aggregation round's aggregate (nothing is added; `mean_change` is all it has)."""
        self.strategy, self.global_state, self.central = strategy, global_state, central
        self.max_weight_ratio = (aggregator or AggregatorSettings()).max_weight_ratio
        self.aggregator = make_aggregator({k: v.shape for k, v in global_state.items()}, aggregator,
                                          seed)
        self.declared = None if weights is None else sorted(weights)
        self.cap = None if weights is None else weight_cap(weights, self.max_weight_ratio)
        self.added: list[float] = []
        self.held: list[tuple[dict[str, codec.SparseTensor], float]] = []

    def add(self, update: Mapping[str, codec.SparseTensor], weight: float,
            base: Mapping[str, np.ndarray] | None = None) -> None:
        """`update` in global indices; `base`: the state the device started from (default: this
        round's global state). A bad update is refused here (AggregationError), held or not."""
        if self.central is not None:
            change = change_from(update, self.global_state if base is None else base)
            self.aggregator.check(change)
            self.central.add(change)
            self.added.append(weight)
            return
        if self.strategy.aggregates == "delta":
            update = change_from(update, self.global_state if base is None else base)
        self.aggregator.check(update)
        self.added.append(weight)
        if self.cap is None:
            self.held.append((dict(update), weight))
        else:
            self._fold(update, weight)

    def _fold(self, update: Mapping[str, codec.SparseTensor], weight: float) -> None:
        if weight > self.cap:
            log.info("an update's aggregation weight %g is capped at %g (aggregator."
                     "max_weight_ratio %g x the round's median weight)", weight, self.cap,
                     self.max_weight_ratio)
        self.aggregator.add_update(update, min(weight, self.cap))

    def result(self) -> dict[str, np.ndarray]:
        if self.declared is not None and Counter(self.declared) != Counter(self.added):
            raise ValueError(f"the round declared update weights {self.declared} and added "
                             f"{sorted(self.added)}: the cap would not be the round's")
        if self.central is not None:
            return self._central_result()
        if self.cap is None:
            self.cap = weight_cap(self.added, self.max_weight_ratio)
            held, self.held = self.held, []
            for update, weight in held:
                self._fold(update, weight)
        if self.strategy.aggregates == "delta":
            zeros = {k: np.zeros_like(v) for k, v in self.global_state.items()}
            return self.strategy.server_update(dict(self.global_state), self.aggregator.apply(zeros))
        return self.strategy.server_update(dict(self.global_state),
                                           self.aggregator.apply(self.global_state))

    def _central_result(self) -> dict[str, np.ndarray]:
        """The noised mean change through the strategy's server step: as the change itself for a
        delta strategy, as the global state moved by it for a values strategy."""
        change = self.central.mean_change({k: v.shape for k, v in self.global_state.items()})
        if self.strategy.aggregates == "delta":
            return self.strategy.server_update(
                dict(self.global_state),
                {k: change[k].astype(np.float32) for k in self.global_state})
        moved = {k: (v.astype(np.float64) + change[k]).astype(v.dtype)
                 for k, v in self.global_state.items()}
        return self.strategy.server_update(dict(self.global_state), moved)
