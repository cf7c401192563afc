"""The MQTT edge agent: `fedprune edge run --config edge.toml`, or `EdgeAgent(config).run()`."""

from .config import EdgeConfig, load_edge_config
from .runner import EdgeAgent
from .state import DeviceState

__all__ = ["DeviceState", "EdgeAgent", "EdgeConfig", "load_edge_config"]
