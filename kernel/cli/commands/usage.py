"""`ingestd usage`: rows metered per source, day and trigger."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from ...engine.state import store_for
from ..registry import EXIT_OK, EXIT_USAGE, Command, date_arg, setup


class Usage(Command):
    name = "usage"
    help = "rows metered per source, day (or month the loads ran), trigger and first load or reload"
    example = "ingestd usage --ran-from 2026-11-01 --ran-to 2026-11-30 --by month"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--from", dest="first", type=date_arg, help="first day loaded")
        parser.add_argument("--to", dest="last", type=date_arg, help="last day loaded")
        parser.add_argument("--ran-from", type=date_arg, help="first date a load ran (UTC), for a billing period")
        parser.add_argument("--ran-to", type=date_arg, help="last date a load ran (UTC)")
        parser.add_argument("--by", choices=["day", "month"], default="day",
                            help="day: per day loaded (default); month: per month the loads ran")
        parser.add_argument("--json", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        ranges = ((args.first, args.last, "--from/--to"), (args.ran_from, args.ran_to, "--ran-from/--ran-to"))
        for lo, hi, what in ranges:
            if lo and hi and lo > hi:
                print(f"{what}: {lo} is after {hi}", file=sys.stderr)
                return EXIT_USAGE
        config, _ = setup(args.config)

        async def read() -> list[dict[str, Any]]:
            state = await store_for(config, writer=False).open()
            try:
                return await state.usage(args.first, args.last, ran_from=args.ran_from, ran_to=args.ran_to, by=args.by)
            finally:
                await state.close()

        rows = asyncio.run(read())
        if args.json:
            print(json.dumps(rows, indent=2))
            return EXIT_OK
        period = args.by
        print(f"{'source':<20} {period:<10} {'trigger':<10} {'load':<7} {'rows':>12} {'loads':>6}")
        for r in rows:
            print(f"{r['source']:<20} {r[period]:<10} {r['trigger']:<10} {r['load']:<7} {r['rows']:>12} "
                  f"{r['loads']:>6}")
        total = sum(r["rows"] or 0 for r in rows)
        print(f"{'total':<50} {total:>12}")
        return EXIT_OK
