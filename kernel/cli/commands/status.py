"""`ingestd status [SOURCE]`: per source the next windows, per day status, rows, generation;
`--calendar`: the status page's grid, one row per source. Reads the state store without its
lock, or, while a daemon holds it and listens on HTTP, asks the daemon's control API."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from typing import Any

from ...engine.state import store_for
from ...http.client import Unreachable
from ...service.views import calendar_report, status_report
from ..registry import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Command, days_arg, setup
from ..remote import reach
from ..terminal import CELLS, calendar_legend, calendar_row, color_enabled, paint


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
    help = "per source: next windows; per day: status, rows, generation (--calendar: a grid of days)"
    example = "ingestd status orders --days 7   |   ingestd status --calendar"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", nargs="?")
        parser.add_argument("--days", type=days_arg, default=None,
                            help="how many days before today to show (default 14, with --calendar 35; 0: today only)")
        parser.add_argument("--calendar", action="store_true",
                            help="one row per source, a cell per day coloured by its state (as the status page)")
        parser.add_argument("--json", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        config, _ = setup(args.config)
        names = [args.source] if args.source else sorted(config.sources)
        for n in names:
            if n not in config.sources:
                print(f"unknown source {n!r}", file=sys.stderr)
                return EXIT_USAGE
        days = args.days if args.days is not None else (34 if args.calendar else 14)
        try:
            daemon = reach(config, quiet=args.json)
        except Unreachable:
            daemon = None  # the state store can be read without the daemon's lock
        if daemon is not None:
            answer = (daemon.get("calendar", source=args.source, days=days + 1) if args.calendar
                      else daemon.get("status", source=args.source, days=days))
            if answer["status"] != "ok":
                print(f"error: {answer['error']}", file=sys.stderr)
                return EXIT_FAILED
            report: dict[str, Any] = answer["data"]
        else:
            async def read() -> dict[str, Any]:
                state = await store_for(config, writer=False).open()
                try:
                    now = dt.datetime.now(dt.UTC)
                    if args.calendar:
                        return await calendar_report(config, state, names, days + 1, now)
                    return await status_report(config, state, names, days, now)
                finally:
                    await state.close()

            report = asyncio.run(read())
        if args.json:
            print(json.dumps(report, default=str, indent=2))
        elif args.calendar:
            print_calendar(report)
        else:
            print_status(report, days)
        return EXIT_OK


def print_calendar(report: dict[str, Any]) -> None:
    colour = color_enabled(sys.stdout)
    sources = report["sources"]
    if not sources:
        print("no source configured")
        return
    width = max(len(s["source"]) for s in sources)
    first, last = sources[0]["calendar"][0]["day"], sources[0]["calendar"][-1]["day"]
    print(f"{'':<{width}}  {first} .. {last} ({len(sources[0]['calendar'])} days, today last)")
    for s in sources:
        row = calendar_row(s["calendar"], colour)
        counts: dict[str, int] = {}
        for c in s["calendar"]:
            counts[c["state"]] = counts.get(c["state"], 0) + 1
        notes = ", ".join(f"{n} {st}" for st, n in counts.items() if st in ("failed", "held", "loading"))
        print(f"{s['source']:<{width}}  {row}  last loaded {s['last_loaded_day'] or '-'}"
              + (f"; {notes}" if notes else ""))
    print(calendar_legend(colour))


def print_status(report: dict[str, Any], days: int) -> None:
    colour = color_enabled(sys.stdout)
    for s in report["sources"]:
        print(f"{s['source']} ({s['kind']}, {s['connection']}, {s['timezone']}): last {s['last_status'] or '-'}, "
              f"last loaded day {s['last_loaded_day'] or '-'}")
        print(f"  next load window {s['next_load']}" +
              (f", next re-check {s['next_recheck']}" if s["next_recheck"] else ""))
        shown = {d["day"] for d in s["days"]}
        for load in s["loading"]:
            if load["day"] not in shown:
                print(f"  {load['day']}  {paint('loading  ', 'blue', colour)}  loading gen {load['generation']} "
                      f"({load['rows_so_far']:,} rows so far, {load['trigger']})")
        if (line := schema_line(s.get("schema"), days)) is not None:
            print(line)
        for d in s["days"]:
            ready = "  (marked ready)" if d["ready_at"] else ""
            state = paint(f"{d['state']:<9}", CELLS.get(d["state"], ("", ""))[1], colour)
            print(f"  {d['day']}  {state}  {d['summary']}{ready}")
    if "replicas" in report:
        alive = ", ".join(f"{r['replica']} ({r['host']}, pid {r['pid']})" for r in report["replicas"])
        print(f"replicas alive: {alive or 'none'}")
    for b in report["backfills"]:
        progress = f": {b['done']}/{b['total']} days, {b['rows']:,} rows" if "done" in b else ""
        print(f"backfill {b['id']} running: {', '.join(b['sources'])} {b['from']}..{b['to']}{progress}")
