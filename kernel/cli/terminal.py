"""What the CLI does on a terminal: colour (off with `NO_COLOR`, `TERM=dumb` or when not a
terminal), a progress bar that log lines never tear (`LogStream` writes each whole line above
it, then draws it again), the calendar row of `status --calendar`, and Ctrl-C that stops
gently, then says what it waits for, then stops at once."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO


def color_enabled(stream: TextIO) -> bool:
    """Colour on `stream`: a terminal, and neither `NO_COLOR` (https://no-color.org) nor `TERM=dumb`."""
    if os.environ.get("NO_COLOR", "") != "" or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


CODES = {"green": "32", "dark_green": "32;2", "grey": "90", "yellow": "33", "red": "31", "blue": "34", "bold": "1",
         "magenta": "35"}


def paint(text: str, colour: str, on: bool) -> str:
    return f"\x1b[{CODES[colour]}m{text}\x1b[0m" if on and colour in CODES else text


# -- a progress bar that log lines do not tear ---------------------------------------------------

_lock = threading.RLock()
_active: Bar | None = None


class LogStream:
    """A text stream for the logger: writes each complete line above the active progress bar
    (clears the bar's line, writes, draws the bar again); with no bar, writes through."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        with _lock:
            self._pending += text
            if "\n" not in self._pending:
                return len(text)
            lines, _, self._pending = self._pending.rpartition("\n")
            bar = _active
            if bar is not None:
                bar.clear()
            self.stream.write(lines + "\n")
            self.stream.flush()
            if bar is not None:
                bar.draw()
        return len(text)

    def flush(self) -> None:
        with _lock:
            if self._pending:
                self.stream.write(self._pending)
                self._pending = ""
            self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Bar:
    """Days done of total, rows/s and ETA: one line redrawn on a terminal, a plain line per
    finished day otherwise."""

    def __init__(self, stream: TextIO | None = None, *, width: int = 28):
        self.stream = stream or sys.stdout
        self.tty = _isatty(self.stream)
        self.colour = color_enabled(self.stream)
        self.width = width
        self.started = time.monotonic()
        self.done = self.total = self.rows = 0
        self.last = ""
        self._shown = False

    def __enter__(self) -> Bar:
        global _active
        if self.tty:
            with _lock:
                _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        with _lock:
            if _active is self:
                _active = None
                if self._shown:
                    self.stream.write("\n")
                    self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        filled = int(self.width * self.done / self.total) if self.total else 0
        bar = paint("#" * filled, "green", self.colour) + "-" * (self.width - filled)
        rate = f"{self.rows / elapsed:,.0f} rows/s" if self.rows else "- rows/s"
        eta = _duration(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        if self.total and self.done >= self.total:
            eta = f"took {_duration(elapsed)}"
        else:
            eta = f"ETA {eta}"
        return f"[{bar}] {self.done}/{self.total} days  {rate}  {eta}  {self.last}"

    def update(self, done: int | None = None, total: int | None = None, rows: int | None = None,
               last: str | None = None) -> None:
        with _lock:
            finished_day = done is not None and done != self.done
            self.done = self.done if done is None else done
            self.total = self.total if total is None else total
            self.rows = self.rows if rows is None else rows
            self.last = self.last if last is None else last
            if self.tty:
                self.draw()
            elif finished_day:
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def draw(self) -> None:
        self.stream.write("\r\x1b[2K" + self.line())
        self.stream.flush()
        self._shown = True

    def say(self, text: str, stream: TextIO | None = None) -> None:
        """A message above the bar."""
        with _lock:
            self.clear()
            out = stream or sys.stderr
            out.write(text + "\n")
            out.flush()
            if self.tty and _active is self:
                self.draw()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def say(text: str) -> None:
    """A line on stderr, above the progress bar if one is drawn."""
    bar = _active
    if bar is not None:
        bar.say(text)
    else:
        print(text, file=sys.stderr, flush=True)


# -- Ctrl-C ------------------------------------------------------------------------------------------

class Interrupts:
    """SIGINT in a foreground command: the first asks the work to stop gently (`gentle`), the
    second says what it is still waiting for (`waiting`), the third cancels the work."""

    def __init__(self, *, gentle: Callable[[], str], waiting: Callable[[], list[str]]):
        self.gentle = gentle
        self.waiting = waiting
        self.presses = 0
        self.task: asyncio.Task[Any] | None = None

    def press(self) -> None:
        self.presses += 1
        if self.presses == 1:
            say(self.gentle() + " (Ctrl-C again: what it waits for)")
        elif self.presses == 2:
            what = self.waiting()
            say("still waiting for: " + ("; ".join(what) if what else "the state store to close")
                + " — Ctrl-C once more to stop now (a running load is rolled back: the previous generation stays)")
        else:
            say("stopping now")
            if self.task is not None:
                self.task.cancel()


async def interruptible(interrupts: Interrupts, work: Any) -> Any:
    """Await `work` with SIGINT handled by `interrupts` (on the running loop)."""
    import signal

    loop = asyncio.get_running_loop()
    task: asyncio.Task[Any] = asyncio.ensure_future(work)
    interrupts.task = task
    loop.add_signal_handler(signal.SIGINT, interrupts.press)
    try:
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGINT)


# -- the calendar -------------------------------------------------------------------------------------

CELLS = {  # state: (letter without colour, colour)
    "loaded": ("L", "green"), "reloaded": ("R", "dark_green"), "empty": ("e", "grey"), "emptied": ("E", "magenta"),
    "held": ("H", "yellow"), "failed": ("F", "red"), "loading": ("~", "blue"), "missing": (".", "grey"),
}


def calendar_row(cells: list[dict[str, Any]], colour: bool) -> str:
    """One source's days as one row: a coloured block per day, or its letter without colour."""
    if not colour:
        return "".join(CELLS.get(c["state"], ("?", ""))[0] for c in cells)
    return "".join(paint("■" if c["state"] != "missing" else "·", CELLS.get(c["state"], ("?", "grey"))[1], True)
                   for c in cells)


def calendar_legend(colour: bool) -> str:
    parts = []
    for state, (letter, col) in CELLS.items():
        mark = paint("■" if state != "missing" else "·", col, True) if colour else letter
        parts.append(f"{mark} {state}")
    return "  ".join(parts)
