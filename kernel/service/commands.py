"""Requests from the bus: validated strictly, answered with `{status, data, error, transaction}`.

A request that is not JSON, has unknown or wrong fields, names an unknown command or source, or
asks for too long a range gets an error answer and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..engine import backfill as backfills
from ..engine.ingest import load_partition
from .views import source_status

if TYPE_CHECKING:
    from .daemon import Daemon

COMMANDS = ("backfill", "ready", "reload", "status", "cancel")


class BadRequest(Exception):
    """What was wrong with a request, in a sentence."""


@dataclass
class Field:
    kind: type | tuple[type, ...]
    required: bool = False


SPECS: dict[str, dict[str, Field]] = {
    "backfill": {"source": Field(str, True), "from": Field(str, True), "to": Field(str, True),
                 "request_id": Field(str)},
    "ready": {"source": Field(str, True), "day": Field(str, True)},
    "reload": {"source": Field(str, True), "day": Field(str, True)},
    "status": {"source": Field(str)},
    "cancel": {"backfill_id": Field(int, True)},
}
TYPE_WORDS = {str: "a string", int: "an integer"}


def answer(status: str, *, data: Any = None, error: str | None = None, transaction: Any = None) -> dict:
    return {"status": status, "data": data, "error": error, "transaction": transaction}


def parse(command: str, payload: bytes, max_bytes: int) -> tuple[dict, Any]:
    """Decode and check a request; returns (fields, transaction) or raises BadRequest."""
    if len(payload) > max_bytes:
        raise BadRequest(f"payload of {len(payload)} bytes is larger than {max_bytes}")
    if command not in SPECS:
        raise BadRequest(f"unknown command {command!r} (commands: {', '.join(COMMANDS)})")
    try:
        body = json.loads(payload.decode("utf-8")) if payload.strip() else {}
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"payload is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"payload must be a JSON object, got {type(body).__name__}")
    transaction = body.pop("transaction", None)
    spec = SPECS[command]
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (fields of {command}: {', '.join(spec) or 'none'})")
    for name, f in spec.items():
        if name not in body:
            if f.required:
                raise BadRequest(f"missing field {name!r}")
            continue
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, f.kind):
            raise BadRequest(f"field {name!r} must be {TYPE_WORDS.get(f.kind, f.kind)}, got {json.dumps(value)[:40]}")
    return body, transaction


def _day(body: dict, key: str) -> dt.date:
    try:
        return dt.date.fromisoformat(body[key])
    except ValueError:
        raise BadRequest(f"field {key!r} is not a date (YYYY-MM-DD): {body[key]!r}") from None


def _source(daemon: "Daemon", name: str) -> str:
    if name not in daemon.config.sources:
        raise BadRequest(f"unknown source {name!r}")
    return name


async def handle(daemon: "Daemon", command: str, payload: bytes, max_bytes: int) -> dict:
    """Validate and carry out one request; never raises for bad input."""
    transaction = None
    try:
        body, transaction = parse(command, payload, max_bytes)
        data = await _run(daemon, command, body)
        return answer("ok", data=data, transaction=transaction)
    except (BadRequest, backfills.BackfillRejected) as exc:
        return answer("error", error=str(exc), transaction=transaction)


async def _run(daemon: "Daemon", command: str, body: dict) -> Any:
    rt = daemon.rt
    assert rt is not None
    if command == "backfill":
        first, last = _day(body, "from"), _day(body, "to")
        source = body["source"] if body["source"] == "*" else _source(daemon, body["source"])
        b, created = await backfills.submit(rt, source, first, last, request_id=body.get("request_id"), origin="mqtt")
        if created or (b.status == "running" and f"backfill-{b.id}" not in {t.get_name() for t in daemon.tasks}):
            daemon.spawn(daemon._run_backfill(b.id), f"backfill-{b.id}")
        days = len(await rt.state.backfill_days(b.id))
        return {"backfill_id": b.id, "created": created, "status": b.status, "sources": b.sources,
                "from": b.day_from.isoformat(), "to": b.day_to.isoformat(), "days": days}
    if command in ("ready", "reload"):
        source, day = _source(daemon, body["source"]), _day(body, "day")
        trigger = "ready" if command == "ready" else "manual"
        daemon.spawn(load_partition(rt, source, day, trigger), f"{command}-{source}-{day}")
        return {"source": source, "day": day.isoformat(), "trigger": trigger, "accepted": True}
    if command == "status":
        names = [_source(daemon, body["source"])] if body.get("source") else sorted(daemon.config.sources)
        now = dt.datetime.now(dt.UTC)
        return {"sources": [await source_status(daemon.config, rt.state, n, 7, now) for n in names],
                "activity": daemon.status_line(),
                "backfills": [{"id": b.id, "sources": b.sources, "from": str(b.day_from), "to": str(b.day_to)}
                              for b in await rt.state.backfills("running")]}
    if command == "cancel":
        if not await backfills.cancel(rt, body["backfill_id"]):
            raise BadRequest(f"no running backfill with id {body['backfill_id']}")
        return {"backfill_id": body["backfill_id"], "status": "cancelled"}
    raise BadRequest(f"unknown command {command!r}")
