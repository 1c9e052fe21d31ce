"""`ingestd load SOURCE --day D`: load (or reload) one day now, here or, when a daemon holds the
state database, by that daemon through its control API."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ...engine.ingest import Outcome
from ...service.bootstrap import local_control
from ...service.control import ControlError
from ..registry import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Command, date_arg, setup
from ..remote import now_iso, reach, wait_for_day
from ..terminal import Interrupts, interruptible, say


class Load(Command):
    name = "load"
    help = "load (or reload) one day of one source now"
    example = "ingestd load orders --day 2026-11-20"
    command = "load"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source")
        parser.add_argument("--day", type=date_arg, required=True)

    def run(self, args: argparse.Namespace) -> int:
        config, plugins = setup(args.config)
        if args.source not in config.sources:
            print(f"unknown source {args.source!r} (configured: {', '.join(sorted(config.sources))})",
                  file=sys.stderr)
            return EXIT_USAGE
        daemon = reach(config)
        if daemon is not None:
            since = now_iso()
            answer = daemon.post("ready" if self.command == "ready" else "reload",
                                 {"source": args.source, "day": args.day.isoformat()})
            if answer["status"] != "ok":
                print(f"{self.command} refused: {answer['error']}", file=sys.stderr)
                return EXIT_USAGE
            try:
                day = wait_for_day(daemon, args.source, args.day, since)
            except KeyboardInterrupt:
                say(f"stopped watching: the daemon goes on with {args.source} {args.day}")
                return 130
            marked = "marked ready; " if self.command == "ready" else ""
            print(f"{args.source} {args.day}: {marked}{day['state']}: {day['summary']} "
                  f"(by the daemon, pid {daemon.pid})")
            return EXIT_FAILED if day["state"] == "failed" else EXIT_OK

        async def work(interrupts: Interrupts) -> int:
            async with local_control(config, plugins) as control:
                interrupts.waiting = control.waiting_for
                try:
                    out = await control.load(args.source, args.day, command=self.command, wait=True)
                except ControlError as exc:
                    print(f"{self.command} refused: {exc}", file=sys.stderr)
                    return EXIT_USAGE
            assert isinstance(out, Outcome)
            print(self.describe(args, out))
            return EXIT_FAILED if out.status in ("failed", "busy", "fenced") else EXIT_OK

        interrupts = Interrupts(gentle=lambda: f"stopping: the load of {args.source} {args.day} runs to its end",
                                waiting=list)

        async def main() -> int:
            return int(await interruptible(interrupts, work(interrupts)))

        try:
            return asyncio.run(main())
        except asyncio.CancelledError:
            print(f"{args.source} {args.day}: stopped; the previous generation stays", file=sys.stderr)
            return 130

    def describe(self, args: argparse.Namespace, out: Outcome) -> str:
        detail = {"succeeded": f"generation {out.generation}, {out.rows} rows",
                  "emptied": f"generation {out.generation}, 0 rows: the day has no rows in the warehouse any more",
                  "empty": f"{out.reason or 'no rows'}; nothing written",
                  "held": out.reason or "",
                  "failed": out.reason or ""}.get(out.status, out.reason or "")
        return f"{args.source} {args.day}: {out.status}: {detail}"
