"""`ingestd backfill SOURCE|--all --from D --to D`: stored durably first, then run here."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from typing import TextIO

from ...service.bootstrap import local_control
from ...service.control import ControlError
from ..registry import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Command, date_arg, setup


class Progress:
    """A progress bar on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO = sys.stdout):
        self.stream = stream
        self.tty = stream.isatty()

    def __call__(self, done: int, total: int, source: str, day: dt.date, status: str) -> None:
        if self.tty:
            width = 30
            filled = int(width * done / total) if total else width
            self.stream.write(f"\r[{'#' * filled}{'-' * (width - filled)}] {done}/{total} {source} {day} {status}   ")
            if done == total:
                self.stream.write("\n")
        else:
            self.stream.write(f"{done}/{total} {source} {day} {status}\n")
        self.stream.flush()


class Backfill(Command):
    name = "backfill"
    help = "load a range of days, stored durably and resumable"
    example = "ingestd backfill orders --from 2026-11-01 --to 2026-11-07"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", nargs="?")
        parser.add_argument("--all", action="store_true", help="every configured source")
        parser.add_argument("--from", dest="first", type=date_arg, required=True)
        parser.add_argument("--to", dest="last", type=date_arg, required=True)
        parser.add_argument("--request-id", help="idempotency key: the same id twice runs once")
        parser.add_argument("--missing", action="store_true",
                            help="only the days never loaded, failed or emptied (the others are skipped)")

    def run(self, args: argparse.Namespace) -> int:
        config, plugins = setup(args.config)
        if bool(args.all) == bool(args.source):
            print("name one SOURCE or --all", file=sys.stderr)
            return EXIT_USAGE

        async def work() -> int:
            async with local_control(config, plugins) as control:
                try:
                    sources = control.resolve_sources("*" if args.all else args.source)
                    found = None if args.request_id else await control.find_backfill(sources, args.first, args.last)
                    if found:
                        print(f"resuming backfill {found.id} ({found.day_from} to {found.day_to})")
                        b = found
                    else:
                        b, created = await control.submit_backfill(sources, args.first, args.last,
                                                                   request_id=args.request_id, origin="cli",
                                                                   missing=args.missing)
                        if not created:
                            print(f"backfill {b.id} with request id {args.request_id} exists already ({b.status})")
                            if b.status != "running":
                                return EXIT_OK
                        else:
                            skipped = f"; {b.skipped} source-days skipped as loaded already" if args.missing else ""
                            print(f"backfill {b.id} stored: {', '.join(sources)} from {args.first} to {args.last}"
                                  f"{skipped}")
                except ControlError as exc:
                    print(f"backfill refused: {exc}", file=sys.stderr)
                    return EXIT_USAGE
                status = await control.run_backfill(b.id, Progress())
            print(f"backfill {b.id}: {status}")
            return EXIT_OK if status == "done" else EXIT_FAILED

        return asyncio.run(work())
