"""Logging set-up from the `logging` settings: generic text or one JSON object per line."""

from __future__ import annotations

import logging
import logging.config
import os
from datetime import UTC, datetime
from typing import Any

import orjson

from proxy.config.sections import LogFormat, LoggingSettings


class JsonFormatter(logging.Formatter):
    def __init__(self, event_field: str = "message") -> None:
        super().__init__()
        self.event_field = event_field

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": os.getpid(),
            self.event_field: record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def logging_config(settings: LoggingSettings) -> dict[str, Any]:
    formatter: dict[str, Any] = (
        {"()": JsonFormatter, "event_field": settings.log_event_field_name}
        if settings.log_format == LogFormat.json
        else {"format": "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"}
    )
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default"}},
        "root": {"handlers": ["default"], "level": settings.log_level.value},
        "loggers": {
            "granian.access": {"level": "INFO" if settings.enable_access_log else "WARNING"},
            "httpx": {"level": "WARNING"},
        },
    }
    # `logging.override` merges formatters, handlers and loggers into this dictConfig, as in the Python proxy.
    for section in ("formatters", "handlers", "loggers"):
        config[section].update(settings.override.get(section) or {})
    return config


def configure_logging(settings: LoggingSettings) -> None:
    logging.config.dictConfig(logging_config(settings))
