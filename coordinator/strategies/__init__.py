"""Federated strategies: each turns (device, round) into a submodel plan."""

from .base import DownloadBuilder, Strategy
from .fedavg import FedAvg
from .feddp import FedDP, FedDPConfig
from .fedp3 import FedP3, FedP3Config, parse_selection
from .ffgg import FFGG, FFGGConfig
from .hidenseek import HideNseek, HideNseekConfig, synflow_masks
from .personal import FedPer, FedRep, LocalOnly, PersonalConfig
from .registry import STRATEGIES, build_strategy
from .width import FedRolex, FjORD, HeteroFL

__all__ = ["STRATEGIES", "DownloadBuilder", "FFGG", "FFGGConfig", "FedAvg", "FedDP", "FedDPConfig",
           "FedP3", "FedP3Config", "FedPer", "FedRep", "FedRolex", "FjORD", "HeteroFL", "LocalOnly",
           "HideNseek", "HideNseekConfig", "PersonalConfig", "Strategy", "build_strategy",
           "parse_selection", "synflow_masks"]
