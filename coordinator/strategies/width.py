"""Width-scaled submodels: HeteroFL (Diao et al., 2021), FedRolex (Alam et al., 2022), FjORD
(Horvath et al., 2021).

All three give each device a width (its planned width in a `--fleet`, else `width_levels` by
device id) and train the full plan of that submodel; they differ in which channels a width keeps
and in how the device trains it:
- HeteroFL keeps the first ceil(r x C) channels of every hidden layer (a static prefix);
- FedRolex keeps a window that rolls by one channel per round, so every channel is trained;
- FjORD keeps the prefix like HeteroFL and trains it with ordered dropout: each batch samples a
  width p from the levels up to the device's own and runs the nested p-prefix of its submodel.
Aggregation is the coverage-aware mean: each entry over the devices whose submodel holds it.
"""

from __future__ import annotations

from edge_sdk.plan import SubmodelPlan, TensorPlan

from .base import Strategy


class HeteroFL(Strategy):
    name = "heterofl"
    slicing = "prefix"

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        return SubmodelPlan(device_index, round_number, self.spec,
                            tuple(TensorPlan(n) for n in self.all_tensors()),
                            aggregation_weight=float(num_samples), upload_dtype=self.upload_dtype)


class FedRolex(HeteroFL):
    name = "fedrolex"
    slicing = "rolling"


class FjORD(HeteroFL):
    name = "fjord"

    def __init__(self, spec, levels: tuple[float, ...], upload_dtype: str = "fp32", seed: int = 0):
        super().__init__(spec, upload_dtype, seed)
        if not levels or not all(0 < p <= 1 for p in levels):
            raise ValueError(f"fjord needs width levels in (0, 1], got {levels}")
        self.levels = tuple(sorted(set(levels)))

    def plan(self, device_index: int, round_number: int, num_samples: int) -> SubmodelPlan:
        # Levels are relative to the full model; the device maps them onto its own width.
        return SubmodelPlan(device_index, round_number, self.spec,
                            tuple(TensorPlan(n) for n in self.all_tensors()),
                            aggregation_weight=float(num_samples), upload_dtype=self.upload_dtype,
                            ordered_dropout=self.levels)
