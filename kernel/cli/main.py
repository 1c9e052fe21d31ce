"""`ingestd ...`: run the daemon, load or backfill days, show status, usage and plugins.

Global options (`-c/--config`, `--log-level`) go before or after the subcommand; a
subcommand's positionals may follow its options."""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ..core.errors import ConfigErrors, IngestdError, StateError
from ..core.memory import use_system_memory_pool
from ..core.secrets import scrub
from ..plugin import API_VERSION
from . import commands  # noqa: F401  (registers every subcommand)
from .registry import EXIT_FAILED, EXIT_USAGE, OPTIONS, REGISTERED, ingestd_version

LOG_LEVELS = ["debug", "info", "warning", "error"]


class IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser that takes positionals after options too
    (`ingestd request backfill --from D --to D SRC`): argparse's intermixed parsing, which it
    cannot apply to a parser with subcommands, applied to each subcommand's own parser."""

    _mixing = False

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        if self._mixing:
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def _global_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    default_config = os.environ.get("INGESTD_CONFIG", "daemon.toml")
    p.add_argument("-c", "--config", default=default_config if defaults else argparse.SUPPRESS,
                   help="config file (default: $INGESTD_CONFIG or ./daemon.toml)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default=None if defaults else argparse.SUPPRESS,
                   help="log level for this run, instead of [daemon] log_level")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingestd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version",
                   version=f"ingestd {ingestd_version()} (plugin API {API_VERSION}, Python {sys.version.split()[0]})")
    _global_options(p, defaults=True)
    sub = p.add_subparsers(dest="command", required=True, parser_class=IntermixedParser)
    for name, cls in REGISTERED.items():
        command = cls()
        epilog = f"example:\n  {cls.example}" if cls.example else None
        sp = sub.add_parser(name, help=cls.help, description=cls.help, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _global_options(sp, defaults=False)
        command.arguments(sp)
        sp.set_defaults(handler=command.run)
    return p


class ScrubbedStream(io.TextIOBase):
    """stdout or stderr with every configured secret masked, whatever a command prints."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(scrub(text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]  # TextIOBase declares it read-only
        return self.stream.encoding


def main(argv: list[str] | None = None) -> int:
    sys.stdout = ScrubbedStream(sys.stdout)
    sys.stderr = ScrubbedStream(sys.stderr)
    try:
        return _main(argv)
    except BrokenPipeError:  # `ingestd status | head -3`: the reader is gone, which is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno() if sys.__stdout__ else 1)
        return 0


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    OPTIONS.log_level = args.log_level
    use_system_memory_pool()
    try:
        code = int(args.handler(args))
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught by main()
        return code
    except ConfigErrors as exc:
        print("configuration error:", file=sys.stderr)
        for e in exc.errors:
            print(f"  {e}", file=sys.stderr)
        return EXIT_USAGE
    except StateError as exc:
        print(f"state error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except IngestdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
