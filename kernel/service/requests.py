"""The request protocol shared by the bus and HTTP: a command name and a JSON payload in,
`{status, data, error, transaction}` out. Validated strictly, then carried out by the control
layer.

A request that is not JSON, has unknown or wrong fields, names an unknown command or source, or
asks for too long a range gets an error answer and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Any

from .control import MAX_PREVIEW_ROWS, PREVIEW_ROWS, Control, ControlError

REQUESTS = ("backfill", "ready", "reload", "status", "cancel", "preview")
"""The commands a request may name (the last part of `<base>/request/<command>`)."""


class BadRequest(Exception):
    """What was wrong with a request, in a sentence."""


@dataclass
class Field:
    kind: type | tuple[type, ...]
    required: bool = False


SPECS: dict[str, dict[str, Field]] = {
    "backfill": {"source": Field(str, True), "from": Field(str, True), "to": Field(str, True),
                 "request_id": Field(str), "missing": Field(bool)},
    "ready": {"source": Field(str, True), "day": Field(str, True)},
    "reload": {"source": Field(str, True), "day": Field(str, True)},
    "status": {"source": Field(str)},
    "cancel": {"backfill_id": Field(int, True)},
    "preview": {"source": Field(str, True), "day": Field(str), "rows": Field(int)},
}
TYPE_WORDS: dict[type | tuple[type, ...], str] = {str: "a string", int: "an integer", bool: "true or false"}


def answer(status: str, *, data: Any = None, error: str | None = None, transaction: Any = None) -> dict[str, Any]:
    return {"status": status, "data": data, "error": error, "transaction": transaction}


MAX_TEXT = 256
"""The longest string a request field may hold (a source name, a date)."""
MAX_REQUEST_ID = 128
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
EARLIEST, LATEST = dt.date(1900, 1, 1), dt.date(2199, 12, 31)
"""Days a request may name: a calendar's edges (year 1, 9999) are not days data lands on."""


def parse(command: str, payload: bytes, max_bytes: int) -> tuple[dict[str, Any], Any]:
    """Decode and check a request; returns (fields, transaction) or raises BadRequest."""
    if len(payload) > max_bytes:
        raise BadRequest(f"payload of {len(payload)} bytes is larger than {max_bytes}")
    if not isinstance(command, str) or command not in SPECS:
        raise BadRequest(f"unknown command {ascii(command)[:60]} (commands: {', '.join(REQUESTS)})")
    try:
        body = json.loads(payload.decode("utf-8")) if payload.strip() else {}
    except UnicodeDecodeError as exc:
        raise BadRequest(f"payload is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except RecursionError:
        raise BadRequest("payload nests too deeply to be a request") from None
    except ValueError as exc:
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
        if isinstance(value, bool) != (f.kind is bool) or not isinstance(value, f.kind):
            raise BadRequest(f"field {name!r} must be {TYPE_WORDS.get(f.kind, f.kind)}, got {_show(value)}")
        if isinstance(value, str):
            _check_text(name, value, MAX_REQUEST_ID if name == "request_id" else MAX_TEXT)
        if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value < 2**63:
            raise BadRequest(f"field {name!r} must be between 1 and {2**63 - 1}, got {_show(value)}")
    return body, transaction


def _show(value: Any) -> str:
    """A value for an error text: JSON, cut short, with nothing that is not printable."""
    text = json.dumps(value, ensure_ascii=True, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_text(name: str, value: str, limit: int) -> None:
    if not value:
        raise BadRequest(f"field {name!r} must not be empty")
    if len(value) > limit:
        raise BadRequest(f"field {name!r} is {len(value)} characters long; at most {limit}")
    if not value.isprintable():
        raise BadRequest(f"field {name!r} holds characters that are not printable text (control characters, NUL "
                         f"or lone surrogates): {_show(value)}")


def _day(body: dict[str, Any], key: str) -> dt.date:
    text = body[key]
    try:
        if not DATE.fullmatch(text):
            raise ValueError(text)
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"field {key!r} is not a date (YYYY-MM-DD): {_show(text)}") from None
    if not EARLIEST <= day <= LATEST:
        raise BadRequest(f"field {key!r} is outside the days ingestd handles ({EARLIEST} to {LATEST}): {text}")
    return day


async def handle(control: Control, command: str, payload: bytes, max_bytes: int) -> dict[str, Any]:
    """Validate and carry out one request; never raises for bad input."""
    transaction = None
    try:
        body, transaction = parse(command, payload, max_bytes)
        data = await _run(control, command, body)
        return answer("ok", data=data, transaction=transaction)
    except (BadRequest, ControlError) as exc:
        return answer("error", error=str(exc), transaction=transaction)


async def _run(control: Control, command: str, body: dict[str, Any]) -> Any:
    if command == "backfill":
        first, last = _day(body, "from"), _day(body, "to")
        source = body["source"] if body["source"] == "*" else control.source(body["source"])
        ticket = await control.backfill(source, first, last, request_id=body.get("request_id"), origin="mqtt",
                                        missing=body.get("missing", False))
        return ticket.as_dict()
    if command in ("ready", "reload"):
        source, day = control.source(body["source"]), _day(body, "day")
        accepted = await control.load(source, day, command="ready" if command == "ready" else "load")
        return accepted.as_dict()
    if command == "status":
        return await control.status(body.get("source"))
    if command == "cancel":
        return await control.cancel(body["backfill_id"])
    if command == "preview":
        source = control.source(body["source"])
        rows = body.get("rows", PREVIEW_ROWS)
        if rows > MAX_PREVIEW_ROWS:
            raise BadRequest(f"field 'rows' must be at most {MAX_PREVIEW_ROWS}, got {rows}")
        return await control.preview(source, _day(body, "day") if "day" in body else None, rows)
    raise BadRequest(f"unknown command {command!r}")
