"""The services' logs: plain lines for a person at a terminal, one JSON object per line (time,
level, logger, message, and extra fields) for a log collector (journald, a file, a pipe)."""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", json_lines: bool = True, path: str | None = None) -> None:
    handler = logging.FileHandler(path) if path else logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fedprune")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


LOG_FORMATS = ("auto", "plain", "json")


def wants_json(log_format: str) -> bool:
    """`auto`: plain on a terminal, JSON lines otherwise (what a collector parses)."""
    return log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
