"""Federated strategies: each turns (device, round) into a submodel plan."""

from .base import DownloadBuilder, Strategy
from .fedavg import FedAvg
from .fedp3 import FedP3, FedP3Config, parse_selection

__all__ = ["DownloadBuilder", "Strategy", "FedAvg", "FedP3", "FedP3Config", "parse_selection"]
