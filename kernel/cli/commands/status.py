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
from ..registry import EXIT_OK, EXIT_USAGE, Command, days_arg, setup


def schema_line(schema: dict[str, Any] | None, days: int) -> str | None:
    """The last change of the source's result schema: while no load has taken it yet, or when it
    was seen within the days shown."""
    change = schema and schema["change"]
    if not change:
        return None
    recent = dt.date.fromisoformat(change["day"]) >= dt.date.today() - dt.timedelta(days=days)
    if not (change["pending"] or recent):
        return None
    line = f"  schema changed (seen by a {change['seen_by']} of {change['day']}): {change['summary']}"
    if change["pending"] and change["blocking"] and change.get("fix"):
        line += f"; {', '.join(change['mapped'])}: {change['fix']}"
    elif not change["pending"]:
        line += " (taken by a later load)"
    return line


class Status(Command):
    name = "status"
    help = "per source: next windows; per day: status, rows, generation"
    example = "ingestd status orders --days 7"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", nargs="?")
        parser.add_argument("--days", type=days_arg, default=14,
                            help="how many days before today to show (default 14; 0: today only)")
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
            shown = {d["day"] for d in s["days"]}
            for load in s["loading"]:
                if load["day"] not in shown:
                    print(f"  {load['day']}  loading    loading gen {load['generation']} "
                          f"({load['rows_so_far']:,} rows so far, {load['trigger']})")
            if (line := schema_line(s["schema"], args.days)) is not None:
                print(line)
            for d in s["days"]:
                ready = "  (marked ready)" if d["ready_at"] else ""
                print(f"  {d['day']}  {d['state']:<9}  {d['summary']}{ready}")
        for b in report["backfills"]:
            print(f"backfill {b['id']} running: {', '.join(b['sources'])} {b['from']}..{b['to']}")
        return EXIT_OK
