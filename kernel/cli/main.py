"""`ingestd ...`: run the daemon, load or backfill days, show status, usage and plugins."""

from __future__ import annotations

import argparse
import os
import sys

from ..core.errors import ConfigErrors, IngestdError, StateError
from ..core.memory import use_system_memory_pool
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


def main(argv: list[str] | None = None) -> int:
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
