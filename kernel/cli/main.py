"""`ingestd ...`: run the daemon, load or backfill days, show status, usage and plugins."""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import TextIO

from ..core.errors import ConfigErrors, IngestdError, StateError
from ..core.memory import use_system_memory_pool
from ..core.secrets import scrub
from . import commands  # noqa: F401  (registers every subcommand)
from .registry import EXIT_FAILED, EXIT_USAGE, REGISTERED


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingestd", description=__doc__)
    p.add_argument("-c", "--config", default=os.environ.get("INGESTD_CONFIG", "daemon.toml"),
                   help="config file (default: $INGESTD_CONFIG or ./daemon.toml)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, cls in REGISTERED.items():
        command = cls()
        epilog = f"example:\n  {cls.example}" if cls.example else None
        sp = sub.add_parser(name, help=cls.help, description=cls.help, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
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
    use_system_memory_pool()
    try:
        return int(args.handler(args))
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
