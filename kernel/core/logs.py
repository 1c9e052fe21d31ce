"""structlog set-up: JSON lines when stdout is not a terminal (journald), console otherwise.
Every string in a log event is scrubbed of the configured secrets before it is rendered."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

_secrets: list[str] = []


def set_secrets(values: list[str]) -> None:
    _secrets[:] = sorted({v for v in values if v and len(v) >= 3}, key=len, reverse=True)


def scrub(text: str) -> str:
    for s in _secrets:
        if s in text:
            text = text.replace(s, "***")
    return text


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub_value(v) for v in value]
    return value


def _scrubber(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    return {k: _scrub_value(v) for k, v in event_dict.items()} if _secrets else event_dict


def configure(level: str = "info", json_output: bool | None = None, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    if json_output is None:
        json_output = not stream.isatty()
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _scrubber,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get(name: str = "ingestd") -> FilteringBoundLogger:
    logger: FilteringBoundLogger = structlog.get_logger(name)  # configure() makes it a filtering logger
    return logger
