"""Local (optionally differentially private) training and the device's privacy ledger."""

from .local import TrainConfig, TrainReport, accuracy, chance_accuracy, dp_sampling, train_locally
from .privacy import DPConfig, PrivacyBudgetExceeded, PrivacyLedger

__all__ = ["TrainConfig", "TrainReport", "accuracy", "chance_accuracy", "dp_sampling", "train_locally", "DPConfig",
           "PrivacyBudgetExceeded", "PrivacyLedger"]
