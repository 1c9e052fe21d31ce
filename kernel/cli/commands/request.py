"""`ingestd request COMMAND ...`: publish a request on the bus and print the answer."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import aiomqtt

from ...bus.client import send_request
from ...service.requests import REQUESTS
from ..registry import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Command, setup


class Request(Command):
    name = "request"
    help = "send a request to a running daemon over MQTT"
    example = "ingestd request backfill orders --from 2026-11-01 --to 2026-11-07"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("what", help=" | ".join(REQUESTS))
        parser.add_argument("source", nargs="?")
        parser.add_argument("--from", dest="first")
        parser.add_argument("--to", dest="last")
        parser.add_argument("--day")
        parser.add_argument("--id", dest="backfill_id", type=int)
        parser.add_argument("--request-id")
        parser.add_argument("--rows", type=int, help="preview: rows to read")
        parser.add_argument("--timeout", type=float, default=10.0)

    def run(self, args: argparse.Namespace) -> int:
        if args.what not in REQUESTS:
            print(f"unknown request {args.what!r} (commands: {', '.join(REQUESTS)})", file=sys.stderr)
            return EXIT_USAGE
        config, _ = setup(args.config)
        if not config.bus.enabled:
            print(f"{config.file}: [bus] enabled = false: the daemon of this config listens to no broker, so "
                  "nothing was sent; turn the bus on (and restart the daemon), or use the CLI commands directly",
                  file=sys.stderr)
            return EXIT_USAGE
        fields = {"source": args.source, "from": args.first, "to": args.last, "day": args.day,
                  "backfill_id": args.backfill_id, "request_id": args.request_id, "rows": args.rows}
        body: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
        try:
            result = asyncio.run(send_request(
                config.bus, config.instance(), args.what, body, timeout=args.timeout,
                username=os.environ.get("INGESTD_BUS_USERNAME"), password=os.environ.get("INGESTD_BUS_PASSWORD")))
        except TimeoutError:
            print(f"no answer within {args.timeout} s (is the daemon running with [bus] enabled?)", file=sys.stderr)
            return EXIT_FAILED
        except aiomqtt.MqttError as exc:
            print(f"cannot reach the broker at {config.bus.host}:{config.bus.port}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(json.dumps(result, indent=2, default=str))
        return EXIT_OK if result.get("status") == "ok" else EXIT_FAILED
