"""`ingestd load SOURCE --day D`: load (or reload) one day now."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ...engine.ingest import Outcome
from ...service.bootstrap import local_control
from ...service.control import ControlError
from ..registry import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Command, date_arg, setup


class Load(Command):
    name = "load"
    help = "load (or reload) one day of one source now"
    example = "ingestd load orders --day 2026-11-20"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source")
        parser.add_argument("--day", type=date_arg, required=True)

    def run(self, args: argparse.Namespace) -> int:
        config, plugins = setup(args.config)
        if args.source not in config.sources:
            print(f"unknown source {args.source!r} (configured: {', '.join(sorted(config.sources))})",
                  file=sys.stderr)
            return EXIT_USAGE

        async def work() -> int:
            async with local_control(config, plugins) as control:
                try:
                    out = await control.load(args.source, args.day, wait=True)
                except ControlError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return EXIT_USAGE
            assert isinstance(out, Outcome)
            detail = {"succeeded": f"generation {out.generation}, {out.rows} rows",
                      "emptied": f"generation {out.generation}, 0 rows: the day has no rows in the warehouse any more",
                      "empty": f"{out.reason or 'no rows'}; nothing written",
                      "held": out.reason or "",
                      "failed": out.reason or ""}[out.status]
            print(f"{args.source} {args.day}: {out.status}: {detail}")
            return EXIT_OK if out.status != "failed" else EXIT_FAILED

        return asyncio.run(work())
