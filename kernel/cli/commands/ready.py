"""`ingestd ready SOURCE --day D`: the user's word that a day is complete; it loads now."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ...engine.ingest import Outcome
from ...service.bootstrap import local_control
from ...service.control import ControlError
from ..registry import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Command, date_arg, setup


class Ready(Command):
    name = "ready"
    help = ("mark a day complete and load it now, even if the source's ready_query says no; load windows "
            "leave it alone from then on")
    example = "ingestd ready orders --day 2026-11-20"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source")
        parser.add_argument("--day", type=date_arg, required=True)

    def run(self, args: argparse.Namespace) -> int:
        config, plugins = setup(args.config)

        async def work() -> int:
            async with local_control(config, plugins) as control:
                try:
                    out = await control.load(args.source, args.day, command="ready", wait=True)
                except ControlError as exc:
                    print(f"ready refused: {exc}", file=sys.stderr)
                    return EXIT_USAGE
            assert isinstance(out, Outcome)
            what = f"generation {out.generation}, {out.rows} rows" if out.status in ("succeeded", "emptied") \
                else (out.reason or "")
            print(f"{args.source} {args.day}: marked ready; {out.status}: {what}")
            return EXIT_OK if out.status != "failed" else EXIT_FAILED

        return asyncio.run(work())
