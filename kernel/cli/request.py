"""`ingestd request COMMAND ...`: publish a request on the bus and print the answer."""

from __future__ import annotations


def add_request_parser(sub) -> None:
    req = sub.add_parser("request", help="send a request to a running daemon over MQTT")
    req.add_argument("what", help="backfill | ready | reload | status | cancel")
    req.add_argument("source", nargs="?")
    req.add_argument("--from", dest="first")
    req.add_argument("--to", dest="last")
    req.add_argument("--day")
    req.add_argument("--id", dest="backfill_id", type=int)
    req.add_argument("--request-id")
    req.add_argument("--timeout", type=float, default=10.0)


def cmd_request(args) -> int:
    from ..bus.server import request_from_cli
    return request_from_cli(args)
