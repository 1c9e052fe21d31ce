"""structlog set-up: JSON lines when the stream is not a terminal (journald), console otherwise.

Every string in a log event is scrubbed of the configured secrets (`ingestd.core.secrets`) before
it is rendered. Lines are written by a thread of their own (`LineWriter`): logging never blocks
and never raises in the caller, so a stdout that is full (a stalled reader), closed (`ingestd run
| head -1`) or broken cannot stall a load or make the daemon miss a signal.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import sys
import threading
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from .secrets import SECRETS, register

QUEUE_LINES = 10_000
"""Lines waiting for a slow stream; more are dropped (and counted) rather than waited for."""


def set_secrets(values: list[str]) -> None:
    register(values)


def scrub(text: str) -> str:
    return SECRETS.text(text)


def _scrubber(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    return {k: SECRETS.value(v) for k, v in event_dict.items()} if SECRETS else event_dict


class LineWriter:
    """A file-like object whose `write` queues text for a writer thread and returns at once.
    Once the stream fails (a closed pipe), everything after is dropped; `dropped` counts what
    was lost to a full queue or a broken stream."""

    def __init__(self, stream: TextIO, capacity: int = QUEUE_LINES):
        self.stream = stream
        self.queue: queue.Queue[str | None] = queue.Queue(capacity)
        self.broken = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="ingestd-log", daemon=True)
        self._thread.start()
        atexit.register(self.close, 2.0)

    def write(self, text: str) -> int:
        if self.broken:
            self.dropped += 1
        else:
            try:
                self.queue.put_nowait(text)
            except queue.Full:
                self.dropped += 1
        return len(text)

    def flush(self) -> None:
        """Nothing to wait for: the writer thread flushes after each batch of lines."""

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (OSError, ValueError):
            return False

    def _run(self) -> None:
        while (text := self.queue.get()) is not None:
            parts = [text]
            while len(parts) < 512:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.queue.put(None)
                    break
                parts.append(more)
            if self.broken:
                continue
            try:
                self.stream.write("".join(parts))
                self.stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: drop from now on
                self.broken = True

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (waiting at most `timeout`), then stop the thread."""
        if self._thread.is_alive():
            try:
                self.queue.put(None, timeout=timeout)
            except queue.Full:
                return
            self._thread.join(timeout)


_writers: dict[int, LineWriter] = {}


def writer_for(stream: TextIO) -> LineWriter:
    """One writer per stream, however often logging is configured."""
    if isinstance(stream, LineWriter):
        return stream
    if id(stream) not in _writers:
        _writers[id(stream)] = LineWriter(stream)
    return _writers[id(stream)]


def configure(level: str = "info", json_output: bool | None = None, stream: TextIO | None = None) -> None:
    out = writer_for(stream or sys.stdout)
    if json_output is None:
        json_output = not out.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(
        colors=os.environ.get("NO_COLOR", "") == "")  # no-color.org
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
        logger_factory=structlog.PrintLoggerFactory(file=out),  # type: ignore[arg-type]  # a TextIO in all it uses
        cache_logger_on_first_use=False,
    )


def get(name: str = "ingestd") -> FilteringBoundLogger:
    logger: FilteringBoundLogger = structlog.get_logger(name)  # configure() makes it a filtering logger
    return logger
