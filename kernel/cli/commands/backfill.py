"""`ingestd backfill SOURCE|--all --from D --to D`: stored durably first, then run here, or by
the running daemon (through its control API) when one holds the state database."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid

from ...http.client import Daemon
from ...service.bootstrap import local_control
from ...service.control import Control, ControlError
from ..registry import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Command, date_arg, setup
from ..remote import reach
from ..terminal import Bar, Interrupts, interruptible, say


class Backfill(Command):
    name = "backfill"
    help = "load a range of days, stored durably and resumable"
    example = "ingestd backfill orders --from 2026-11-01 --to 2026-11-07"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", nargs="?")
        parser.add_argument("--all", action="store_true", help="every configured source")
        parser.add_argument("--from", dest="first", type=date_arg, required=True)
        parser.add_argument("--to", dest="last", type=date_arg, required=True)
        parser.add_argument("--request-id", help="idempotency key: the same id twice runs once")
        parser.add_argument("--missing", action="store_true",
                            help="only the days never loaded, failed or emptied (the others are skipped)")

    def run(self, args: argparse.Namespace) -> int:
        config, plugins = setup(args.config)
        if bool(args.all) == bool(args.source):
            print("name one SOURCE or --all", file=sys.stderr)
            return EXIT_USAGE
        daemon = reach(config)
        if daemon is not None:
            return self.through(daemon, args)

        async def work(interrupts: Interrupts) -> int:
            async with local_control(config, plugins) as control:
                interrupts.gentle = lambda: _stop_gently(control)
                interrupts.waiting = control.waiting_for
                try:
                    sources = control.resolve_sources("*" if args.all else args.source)
                    found = None if args.request_id else await control.find_backfill(sources, args.first, args.last)
                    if found:
                        print(f"resuming backfill {found.id} ({found.day_from} to {found.day_to})")
                        b = found
                    else:
                        b, created = await control.submit_backfill(sources, args.first, args.last,
                                                                   request_id=args.request_id, origin="cli",
                                                                   missing=args.missing)
                        if not created:
                            print(f"backfill {b.id} with request id {args.request_id} exists already ({b.status})")
                            if b.status != "running":
                                return EXIT_OK
                        else:
                            skipped = f"; {b.skipped} source-days skipped as loaded already" if args.missing else ""
                            print(f"backfill {b.id} stored: {', '.join(sources)} from {args.first} to {args.last}"
                                  f"{skipped}")
                except ControlError as exc:
                    print(f"backfill refused: {exc}", file=sys.stderr)
                    return EXIT_USAGE
                status = await _run_with_bar(control, b.id)
            if status == "running":
                print(f"backfill {b.id}: stopped before its end; the same command (or the daemon) resumes it")
            else:
                print(f"backfill {b.id}: {status}")
            return EXIT_OK if status == "done" else EXIT_FAILED

        interrupts = Interrupts(gentle=lambda: "stopping", waiting=list)

        async def main() -> int:
            return int(await interruptible(interrupts, work(interrupts)))

        try:
            return asyncio.run(main())
        except asyncio.CancelledError:
            print("backfill stopped; `ingestd backfill` with the same range resumes it", file=sys.stderr)
            return 130

    def through(self, daemon: Daemon, args: argparse.Namespace) -> int:
        """Submit to the daemon, then follow its progress until the backfill ends."""
        body: dict[str, object] = {"source": "*" if args.all else args.source, "from": args.first.isoformat(),
                                   "to": args.last.isoformat(),
                                   "request_id": args.request_id or f"cli-{uuid.uuid4().hex[:16]}"}
        if args.missing:
            body["missing"] = True
        answer = daemon.post("backfill", body)
        if answer["status"] != "ok":
            print(f"backfill refused: {answer['error']}", file=sys.stderr)
            return EXIT_USAGE
        ticket = answer["data"]
        bid = ticket["backfill_id"]
        what = "stored" if ticket["created"] else f"exists already ({ticket['status']})"
        print(f"backfill {bid} {what}: {', '.join(ticket['sources'])} from {ticket['from']} to {ticket['to']}, "
              f"{ticket['source_days']} source-days, run by the daemon (pid {daemon.pid})")
        status = ticket["status"]
        try:
            with Bar() as bar:
                bar.update(0, ticket["source_days"])
                while status == "running":
                    report = daemon.get("status")["data"]
                    mine = next((b for b in report["backfills"] if b["id"] == bid), None)
                    if mine is None:
                        status = daemon.post("backfill", body)["data"]["status"]
                        break
                    bar.update(mine["done"], mine["total"], mine["rows_fetched"])
                    time.sleep(0.5)
                if status == "done":
                    bar.update(bar.total, bar.total)
        except KeyboardInterrupt:
            say(f"stopped watching: backfill {bid} goes on in the daemon; `ingestd cancel {bid}` cancels it")
            return 130
        print(f"backfill {bid}: {status}")
        return EXIT_OK if status == "done" else EXIT_FAILED


def _stop_gently(control: Control) -> str:
    control.rt.stopping.set()
    return "stopping: no new day of the backfill starts; the days loading now finish"


async def _run_with_bar(control: Control, backfill_id: int) -> str:
    """Run a stored backfill here, drawing days done/total, rows/s and ETA."""
    with Bar() as bar:
        async def rows() -> None:
            while True:
                p = await control.rt.state.backfill_progress(backfill_id)
                bar.update(p["done"], p["total"], p["rows_fetched"])
                await asyncio.sleep(0.5)

        first = await control.rt.state.backfill_progress(backfill_id)
        bar.update(first["done"], first["total"], first["rows_fetched"])
        ticker = asyncio.ensure_future(rows())
        try:
            return await control.run_backfill(
                backfill_id, lambda done, total, source, day, status: bar.update(done, total, last=f"{source} {day} "
                                                                                  f"{status}"))
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            p = await control.rt.state.backfill_progress(backfill_id)
            bar.update(p["done"], p["total"], p["rows_fetched"])
