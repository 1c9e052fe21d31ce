"""`ingestd cancel BACKFILL_ID`: cancel a running backfill (its running loads finish)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ...service.bootstrap import local_control
from ...service.control import ControlError
from ..registry import EXIT_FAILED, EXIT_OK, Command, setup
from ..remote import reach


class Cancel(Command):
    name = "cancel"
    help = "cancel a running backfill: no new day of it starts (days loading now finish)"
    example = "ingestd cancel 12"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("backfill_id", type=int, help="the backfill's id (`ingestd status` lists running ones)")

    def run(self, args: argparse.Namespace) -> int:
        config, plugins = setup(args.config)
        daemon = reach(config)
        if daemon is not None:
            answer = daemon.post("cancel", {"backfill_id": args.backfill_id})
            if answer["status"] != "ok":
                print(f"cancel refused: {answer['error']}", file=sys.stderr)
                return EXIT_FAILED
            print(f"backfill {args.backfill_id}: cancelled (by the daemon, pid {daemon.pid})")
            return EXIT_OK

        async def work() -> int:
            async with local_control(config, plugins) as control:
                try:
                    await control.cancel(args.backfill_id)
                except ControlError as exc:
                    print(f"cancel refused: {exc}", file=sys.stderr)
                    return EXIT_FAILED
            print(f"backfill {args.backfill_id}: cancelled")
            return EXIT_OK

        return asyncio.run(work())
