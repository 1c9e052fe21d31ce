"""`ingestd ready SOURCE --day D`: the user's word that a day is complete; it loads now."""

from __future__ import annotations

import argparse

from ...engine.ingest import Outcome
from .load import Load


class Ready(Load):
    name = "ready"
    help = ("mark a day complete and load it now, even if the source's ready_query says no; load windows "
            "leave it alone from then on")
    example = "ingestd ready orders --day 2026-11-20"
    command = "ready"

    def describe(self, args: argparse.Namespace, out: Outcome) -> str:
        what = f"generation {out.generation}, {out.rows} rows" if out.status in ("succeeded", "emptied") \
            else (out.reason or "")
        return f"{args.source} {args.day}: marked ready; {out.status}: {what}"
