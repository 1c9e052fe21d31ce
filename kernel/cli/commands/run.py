"""`ingestd run`: the daemon, or with --once what is due now."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys

from ...bus.server import bus_service
from ...http.server import http_service
from ...service.bootstrap import local_control, run_forever
from ..registry import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Command, instant_arg, setup


class Run(Command):
    name = "run"
    help = "run the daemon (or, with --once, what is due now)"
    example = "ingestd -c /etc/ingestd/daemon.toml run"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--once", action="store_true", help="do what is due now, then exit")
        parser.add_argument("--now", type=instant_arg,
                            help="with --once: act as if it were this time (ISO-8601, e.g. 2026-11-21T06:05:00Z)")

    def run(self, args: argparse.Namespace) -> int:
        if args.now and not args.once:
            print("--now needs --once (the daemon always runs on the clock)", file=sys.stderr)
            return EXIT_USAGE
        if not args.once:
            config, plugins = setup(args.config, log_to=sys.stdout)
            return run_forever(config, plugins, services=[bus_service, http_service])
        config, plugins = setup(args.config, log_to=sys.stdout)
        now = args.now or dt.datetime.now(dt.UTC)

        async def work() -> int:
            async with local_control(config, plugins) as control:
                results = await control.catch_up(now)
            failed = any(v == "failed" for r in results.values() for part in r.values() for v in part.values())
            return EXIT_FAILED if failed else EXIT_OK

        return asyncio.run(work())
