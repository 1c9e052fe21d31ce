"""`ingestd status [SOURCE]`: per source the next windows, per day status, rows, generation.
Reads the state store without its lock, so it works while a daemon runs."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from typing import Any

from ...engine.state import StateStore
from ...service.views import status_report
from ..registry import EXIT_OK, EXIT_USAGE, Command, setup


class Status(Command):
    name = "status"
    help = "per source: next windows; per day: status, rows, generation"
    example = "ingestd status orders --days 7"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", nargs="?")
        parser.add_argument("--days", type=int, default=14, help="how many recent days to show (default 14)")
        parser.add_argument("--json", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        config, _ = setup(args.config)
        names = [args.source] if args.source else sorted(config.sources)
        for n in names:
            if n not in config.sources:
                print(f"unknown source {n!r}", file=sys.stderr)
                return EXIT_USAGE

        async def read() -> dict[str, Any]:
            state = await StateStore(config.state_path(), writer=False).open()
            try:
                return await status_report(config, state, names, args.days, dt.datetime.now(dt.UTC))
            finally:
                await state.close()

        report = asyncio.run(read())
        if args.json:
            print(json.dumps(report, default=str, indent=2))
            return EXIT_OK
        for s in report["sources"]:
            print(f"{s['source']} ({s['kind']}, {s['connection']}, {s['timezone']}): last {s['last_status'] or '-'}, "
                  f"last loaded day {s['last_loaded_day'] or '-'}")
            print(f"  next load window {s['next_load']}" +
                  (f", next re-check {s['next_recheck']}" if s["next_recheck"] else ""))
            for d in s["days"]:
                rows = "-" if d["rows"] is None else d["rows"]
                error = f"  ({d['error']})" if d["error"] and d["status"] == "failed" else ""
                print(f"  {d['day']}  {d['status']:<9} rows {rows:<10} gen {d['generation']:<4} "
                      f"loaded {d['loaded_at'] or '-'}{error}")
        for b in report["backfills"]:
            print(f"backfill {b['id']} running: {', '.join(b['sources'])} {b['from']}..{b['to']}")
        return EXIT_OK
