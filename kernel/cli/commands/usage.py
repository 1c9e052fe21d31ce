"""`ingestd usage`: rows metered per source, day and trigger."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from ...engine.state import StateStore
from ..registry import EXIT_OK, Command, date_arg, setup


class Usage(Command):
    name = "usage"
    help = "rows metered per source, day and trigger"
    example = "ingestd usage --from 2026-11-01 --to 2026-11-30 --json"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--from", dest="first", type=date_arg)
        parser.add_argument("--to", dest="last", type=date_arg)
        parser.add_argument("--json", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        config, _ = setup(args.config)

        async def read() -> list[dict[str, Any]]:
            state = await StateStore(config.state_path(), writer=False).open()
            try:
                return await state.usage(args.first, args.last)
            finally:
                await state.close()

        rows = asyncio.run(read())
        if args.json:
            print(json.dumps(rows, indent=2))
            return EXIT_OK
        print(f"{'source':<20} {'day':<10} {'trigger':<10} {'rows':>12} {'loads':>6}")
        for r in rows:
            print(f"{r['source']:<20} {r['day']:<10} {r['trigger']:<10} {r['rows']:>12} {r['loads']:>6}")
        total = sum(r["rows"] or 0 for r in rows)
        print(f"{'total':<42} {total:>12}")
        return EXIT_OK
