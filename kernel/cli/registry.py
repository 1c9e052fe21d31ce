"""How CLI commands register themselves (as tox 4's do): a subclass of `Command` in a module of
`ingestd.cli.commands` is a subcommand, with its name, help, example, arguments and handler in
one place. `main` builds the parser from what registered."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import ClassVar, TextIO, cast

from ..core import logs
from ..core.config import Config, load_config
from ..core.secrets import register
from ..plugin.manager import LoadedPlugins, load_plugins
from . import terminal

EXIT_OK = 0
EXIT_FAILED = 1
"""A load, check or request failed."""
EXIT_USAGE = 2
"""Bad config or usage."""

REGISTERED: dict[str, type[Command]] = {}


@dataclass
class Options:
    """Global options of this invocation that `setup` applies (`--log-level`)."""

    log_level: str | None = None


OPTIONS = Options()


def ingestd_version() -> str:
    try:
        return version("ingestd")
    except PackageNotFoundError:
        return "unknown"


class Command:
    """One `ingestd` subcommand. Subclasses set `name`, `help` and `example`, add their options in
    `arguments`, and do their work in `run`, returning the exit code."""

    name: ClassVar[str]
    help: ClassVar[str]
    example: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in REGISTERED:
                raise RuntimeError(f"two CLI commands named {cls.name!r}")
            REGISTERED[cls.name] = cls

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's options and positionals."""

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def setup(path: str, *, log_to: TextIO = sys.stderr) -> tuple[Config, LoadedPlugins]:
    """Plugins loaded, the config read and validated, its secrets registered for scrubbing, files
    this process creates readable by their owner only (`[daemon] umask`), logging configured (at
    `--log-level` when given, else `[daemon] log_level`), above a progress bar when one is drawn."""
    plugins = load_plugins()
    config = load_config(path, plugins.registry, plugins.errors())
    register(config.secrets())
    os.umask(int(config.daemon.umask, 8))
    logs.configure(OPTIONS.log_level or config.daemon.log_level, stream=cast(TextIO, terminal.LogStream(log_to)))
    return config, plugins


def date_arg(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def days_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value}")
    return value


def instant_arg(text: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
