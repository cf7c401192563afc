"""Secure aggregation (SecAgg+) with distributed discrete Gaussian noise, as a library both the
device and the coordinator import; docs/PROTOCOL.md, "Secure aggregation", is its contract."""

from .client import SecAggClient
from .errors import SecAggError
from .params import RoundParams
from .server import SecAggResult, SecAggServer

__all__ = ["RoundParams", "SecAggClient", "SecAggError", "SecAggResult", "SecAggServer"]
