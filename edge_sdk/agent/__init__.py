"""The MQTT edge agent: `fedprune-edge run --config edge.toml`, or `EdgeAgent(config).run()`."""

from .config import EdgeSettings, load_edge_config
from .runner import EdgeAgent
from .state import DeviceState

__all__ = ["DeviceState", "EdgeAgent", "EdgeSettings", "load_edge_config"]
