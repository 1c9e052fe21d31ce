"""`ingestd preview SOURCE [--day D] [--rows N] [--json]`: the source's query for a day, read
to N rows (limited in the warehouse where the connector can) and mapped as a load would, shown
before anything is loaded. Writes nothing: no run, partition, metering, event or sink row; it
needs no state store, so it works beside a running daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from ...service.checks import preview_source
from ..registry import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Command, date_arg, setup

MAX_ROWS = 1000
CELL = 40


def rows_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of rows: {text!r}") from None
    if not 1 <= value <= MAX_ROWS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_ROWS}, got {value}")
    return value


def _cell(value: Any) -> str:
    text = "NULL" if value is None else json.dumps(value, separators=(",", ":"), default=str) \
        if isinstance(value, (dict, list)) else str(value)
    text = text.replace("\n", " ").replace("\t", " ")
    return text if len(text) <= CELL else text[:CELL - 3] + "..."


def table(columns: list[str], rows: list[dict[str, Any]]) -> list[str]:
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return lines


def render(p: dict[str, Any]) -> list[str]:
    out = [f"{p['source']} ({p['kind']}) {p['day']} ({p['day_chosen']}): {p['rows_read']} of {p['rows_asked']} rows "
           f"read (limit {p['limit']}), {p['mapped']} mapped, {p['rejected']} rejected", ""]
    if p["rows"]:
        out += table(p["columns"], p["rows"]) + [""]
    if p["rejects"]:
        out.append("rejected rows, by reason (one sample each):")
        for r in p["rejects"]:
            out.append(f"  {r['reason']}: {r['count']}")
            if r["sample"] is not None:
                out.append(f"    e.g. {json.dumps(r['sample'], default=str)}")
        out.append("")
    if p["schema"]:
        out.append("the query's result columns, and what each feeds:")
        width = max(len(c["name"]) for c in p["schema"])
        twidth = max(len(c["type"]) for c in p["schema"])
        for c in p["schema"]:
            feeds = ", ".join(c["feeds"]) if c["feeds"] else "(unused)"
            out.append(f"  {c['name'].ljust(width)}  {c['type'].ljust(twidth)}  {feeds}")
        out.append("")
    if p["problems"]:
        out.append("problems (a load would fail or reject every row):")
        out += [f"  {line}" for line in p["problems"]]
    if p["notes"]:
        out.append("notes:")
        out += [f"  {line}" for line in p["notes"]]
    if p["truncated"]:
        out.append("(cut short to fit the answer's size)")
    return out


class Preview(Command):
    name = "preview"
    help = "show a source's query for a day mapped as a load would (N rows, rejects, columns); writes nothing"
    example = "ingestd preview orders --day 2026-11-20 --rows 20"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source")
        parser.add_argument("--day", type=date_arg,
                            help="the day (default: the newest day with rows in the source's look-back)")
        parser.add_argument("--rows", type=rows_arg, default=10, help=f"rows to read (default 10, at most {MAX_ROWS})")
        parser.add_argument("--json", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        config, plugins = setup(args.config)
        if args.source not in config.sources:
            print(f"unknown source {args.source!r} (configured: {', '.join(sorted(config.sources)) or 'none'})",
                  file=sys.stderr)
            return EXIT_USAGE
        report = asyncio.run(preview_source(config, plugins, args.source, args.day, args.rows))
        if args.json:
            print(json.dumps(report, default=str, indent=2))
        else:
            print("\n".join(render(report)).rstrip())
        return EXIT_OK if report["ok"] else EXIT_FAILED
