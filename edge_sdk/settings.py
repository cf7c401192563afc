"""Settings both sides read, declared once: the run's TOML sections, the TASK header's `train` and
`dp`, and what the device trains with are the same pydantic models.

They live on the SDK side because the device validates them on receipt (a TASK is hostile input
like any other), and the coordinator's configuration schema embeds them unchanged, so a key means
the same in `fedprune.toml`, on the wire and on the device.
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

AccountantName = Literal["rdp", "prv"]
# The model a device keeps, uses and is scored with under DP: see DPSettings.personal_model.
PersonalModelName = Literal["fine_tuned", "dp_trained"]
# What a device keeps between tasks: "model", its whole trained model (a real device, and the
# simulator's default: its own model is scored each round); "private", only the tensors it never
# sends (and its ledger and scores), so that thousands of simulated devices fit in memory.
DeviceState = Literal["model", "private"]
# The names edge_sdk/training/local.py registers (LOSSES, OPTIMIZERS); a device only looks them up.
LossName = Literal["cross_entropy", "label_smoothing"]
OptimizerName = Literal["sgd", "adam"]
ValueDtypeName = Literal["fp32", "fp16"]


def _widths(levels: list[float]) -> list[float]:
    if not all(0 < p <= 1 for p in levels):
        raise ValueError(f"widths must be in (0, 1], got {levels}")
    return levels


# Widths as fractions of a model's: width tiers, FjORD's dropout levels.
WidthLevels = Annotated[list[float], Field(min_length=1), AfterValidator(_widths)]


class Settings(BaseModel):
    """Base of every settings model: unknown keys are refused (a typo must not pass silently), and
    so are non-finite numbers: TOML has inf and nan literals, and a NaN passes every bound check."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrainSettings(Settings):
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(48, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # SGD's; Adam keeps its own moment estimates
    optimizer: OptimizerName = "sgd"
    loss: LossName = "cross_entropy"
    label_smoothing: float = Field(0.1, gt=0, lt=1)  # the share spread over all classes
    clip_norm: float | None = Field(10.0, gt=0)  # plain gradient clipping without DP (FedP3: 10)
    # Under DP a logical batch larger than this runs in physical chunks (Opacus virtual steps):
    # same privacy and the same update, less peak memory. The planner sets it per device.
    physical_batch_size: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _settings_of_the_chosen(self):
        """A key of a loss or optimizer that is not the chosen one would silently do nothing."""
        if self.label_smoothing != 0.1 and self.loss != "label_smoothing":
            raise ValueError(f"train.label_smoothing applies to loss = \"label_smoothing\", not "
                             f"{self.loss!r}; set train.loss = \"label_smoothing\" or drop it")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"train.momentum is SGD's; {self.optimizer!r} keeps its own moment "
                             "estimates: drop train.momentum or use optimizer = \"sgd\"")
        return self


class DPSettings(Settings):
    """DP-SGD: a noise multiplier, or a target epsilon for the whole run (the noise is then
    calibrated so that the planned steps spend exactly that), or neither (no DP)."""

    noise_multiplier: float | None = Field(None, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    # The epsilon past which the device refuses to train. On the device it is the device's own
    # (edge.toml); in the simulator the run's. Defaults to target_epsilon.
    epsilon_budget: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: AccountantName = "rdp"
    # What the device keeps, predicts with and is scored with. "fine_tuned": DP-SGD trains what
    # is sent; a second copy, fine-tuned from each download on the device's data without noise,
    # is the personal model. It never leaves the device and never feeds a gradient that is sent,
    # so the guarantee on everything sent is unchanged, and the device's own predictions are not
    # degraded by noise that protects nothing on the device. "dp_trained": the personal model is
    # the DP-SGD output itself (fedprune before 0.2).
    personal_model: PersonalModelName = "fine_tuned"
    # Epochs of that fine-tune per task. Training without noise costs a fraction of a DP-SGD
    # epoch, and nothing it does is sent, so it may run longer than the sent model's training.
    # 6: on docs/BENCHMARKS.md section 15's fleet (epsilon 8) personalized accuracy was 84.1%
    # (3 seeds) against 84.8% without DP; 3 epochs gave 80.2%.
    personal_epochs: int = Field(6, ge=1)

    @model_validator(mode="after")
    def _one_noise_source(self):
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("set dp.noise_multiplier or dp.target_epsilon, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    @property
    def budget(self) -> float | None:
        """The epsilon past which the device refuses to train (the target, unless set apart)."""
        return self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon

    def resolve_noise(self, sample_rate: float, planned_steps: int) -> float:
        """The noise multiplier these settings train at, for `planned_steps` steps at
        `sample_rate`: the given one, or the one that spends exactly target_epsilon over them."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        if self.target_epsilon is None:
            raise ValueError("DP is off (no dp.noise_multiplier or dp.target_epsilon): no noise")
        return calibrated_noise(self.target_epsilon, self.delta, sample_rate, planned_steps,
                                self.accountant)


@functools.lru_cache(maxsize=256)
def calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: AccountantName) -> float:
    """Opacus's noise multiplier for (target_epsilon, delta) over `steps` at `sample_rate`.

    Memoised because Opacus's search takes 1-2 s and every round asks again: the value is a
    pure function of these arguments, so a task gets exactly what a fresh search would give it,
    and nothing of an earlier task (its settings, or whether it was refused) reaches a later one.
    """
    from opacus.accountants.utils import get_noise_multiplier  # lazy: opacus costs ~4 s to import

    from .training.privacy import accountant_options

    return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                sample_rate=sample_rate, steps=steps, accountant=accountant,
                                **accountant_options(accountant))


class CodecSettings(Settings):
    """The run's tensor precisions; the planner may make a device's coarser, never finer."""

    upload_dtype: ValueDtypeName = "fp32"
    download_dtype: ValueDtypeName = "fp32"
