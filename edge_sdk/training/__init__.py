"""Local (optionally differentially private) training and the device's privacy ledger."""

from .local import TrainReport, accuracy, chance_accuracy, dp_sampling, train_locally
from .privacy import PrivacyBudgetExceeded, PrivacyLedger

__all__ = ["TrainReport", "accuracy", "chance_accuracy", "dp_sampling", "train_locally",
           "PrivacyBudgetExceeded", "PrivacyLedger"]
