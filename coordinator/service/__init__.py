"""The coordinator service: round engine, MQTT link, persistence and the HTTP API."""

from .config import ServiceSettings
from .engine import RoundEngine
from .service import CoordinatorService
from .store import Store

__all__ = ["CoordinatorService", "RoundEngine", "ServiceSettings", "Store"]
