"""Federated strategies: each turns (device, round) into a submodel plan.

Importing the package imports every module in it, and each strategy module registers its
strategies (`registry.register_strategy`): adding a strategy is adding one file here.
"""

import importlib
import pkgutil

from .base import DownloadBuilder, Strategy
from .registry import (StrategyEntry, build_strategy, register_strategy, strategy_entry, strategy_names,
                       strategy_sections, strategy_table)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DownloadBuilder", "Strategy", "StrategyEntry", "build_strategy", "register_strategy",
           "strategy_entry", "strategy_names", "strategy_sections", "strategy_table"]
