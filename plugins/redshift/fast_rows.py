"""Faster row decoding for a fetch session of redshift-connector, by patching the connection.

Why: one stream of a Redshift load is bound by the driver's decoding in Python (see DESIGN.md's
measured facts and BENCHMARKS.md: ~130-160 K rows/s against ~1.5 M on the wire). Three changes
to how a connection decodes DataRow messages remove most of it:

- TIMESTAMP/TIMESTAMPTZ: the driver turns every binary value into a Python datetime (a
  Timedelta and an addition per value, a sixth of its decoding time) which the connector then
  turns into an integer again. A patched connection keeps the wire's int64 (microseconds since
  2000-01-01) and `raw_array` converts a whole column in Arrow, clamping to datetime.min/max
  as the driver does (±infinity, years past 9999 or before 1).
- Text types: the driver decodes each value to a Python str; a patched connection keeps the
  wire's UTF-8 bytes (the session's client_encoding), and Arrow validates a whole column at once.
- DataRow messages: the driver's handler rebuilds the list of column decoders for every row
  (`Cursor.truncated_row_desc()`) and logs a debug line per row. The patched handler builds the
  list once per result and decodes each value with the same decoder the driver would use.

What it relies on (redshift-connector 2.x internals, none of them public API):

- `Connection.redshift_types`: a per-connection dict, type OID -> (format code, decoder), whose
  decoders for OIDs 1114 and 1184 are `timestamp_recv_integer` / `timestamptz_recv_integer` with
  the binary format code 1, and for the text OIDs `text_recv`;
- decoders are called `decoder(data, offset, length)`, a binary NUMERIC's with the column's
  scale as a fourth argument (`truncated_row_desc()` then gives `(decoder, scale)`);
- `Connection.message_types[b"D"]` is `handle_DATA_ROW(data, cursor)`: it decodes one DataRow
  message (an Int16 column count, then per column an Int32 length, -1 for NULL, and the value)
  and appends the row as a list to `cursor._cached_rows`;
- `cursor.ps` is the current result's prepared statement (a new object for each statement), and
  `cursor.truncated_row_desc()` gives its decoders in column order.

Every patch is made only where the connection still has the driver's own piece in place, so a
release that changed one of them keeps the driver's (slower, correct) path for it, quietly.
`internals_changed()` names what no longer holds; tests/test_redshift.py fails on it, so an
upgrade of the driver is noticed rather than silently slower. Nothing is pinned.
"""

from __future__ import annotations

import inspect
import struct
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["RAW_DECODERS", "internals_changed", "raw_array", "use_fast_data_rows", "use_raw_values"]

_Q_UNPACK = struct.Struct("!q").unpack_from
_I_UNPACK = struct.Struct("!i").unpack_from
PG_EPOCH_US = 946_684_800_000_000
"""2000-01-01 in microseconds since 1970-01-01."""
_DATETIME_MIN_US = -62_135_596_800_000_000 - PG_EPOCH_US
_DATETIME_MAX_US = 253_402_300_799_999_999 - PG_EPOCH_US
"""datetime.min/max, where the driver clamps ±infinity and out-of-range values; so do we."""


def _int64_recv(data: bytes, offset: int, length: int) -> int:
    return _Q_UNPACK(data, offset)[0]


def _bytes_recv(data: bytes, offset: int, length: int) -> bytes:
    return data[offset:offset + length]


FC_BINARY = 1
TEXT_OIDS = (18, 19, 25, 705, 1042, 1043, 4000)
RAW_DECODERS: dict[int, tuple[str, int | None, Callable[[bytes, int, int], Any]]] = {
    # oid: (the driver's decoder it replaces, the format code it must have (None: any), ours)
    1114: ("timestamp_recv_integer", FC_BINARY, _int64_recv),
    1184: ("timestamptz_recv_integer", FC_BINARY, _int64_recv),
    **{oid: ("text_recv", None, _bytes_recv) for oid in TEXT_OIDS},
}
DATA_ROW_HANDLER = "handle_DATA_ROW"


def use_raw_values(con) -> frozenset[int]:
    """Make `con` hand TIMESTAMP/TIMESTAMPTZ values over as wire integers and text as UTF-8
    bytes; the OIDs it did this for (convert those columns with `raw_array`)."""
    types = getattr(con, "redshift_types", None)
    if not isinstance(types, dict):
        return frozenset()
    done = set()
    for oid, (driver_fn, fmt_needed, ours) in RAW_DECODERS.items():
        fmt, fn = types.get(oid, (None, None))
        if getattr(fn, "__name__", None) == driver_fn and fmt_needed in (None, fmt):
            types[oid] = (fmt, ours)
            done.add(oid)
    return frozenset(done)


def _row_decoders(cursor) -> list[Callable[[bytes, int, int], Any]]:
    decoders = []
    for desc in cursor.truncated_row_desc():
        if len(desc) == 2:  # a binary NUMERIC's decoder takes the column's scale
            decoders.append(lambda data, offset, length, _f=desc[0], _scale=desc[1]: _f(data, offset, length, _scale))
        else:
            decoders.append(desc[0])
    return decoders


def use_fast_data_rows(con) -> bool:
    """Give `con` a DataRow handler that does what the driver's does, minus its per-row set-up."""
    handlers = getattr(con, "message_types", None)
    original = handlers.get(b"D") if isinstance(handlers, dict) else None
    if getattr(original, "__name__", None) != DATA_ROW_HANDLER:
        return False
    cached: list = [None, None]  # the result's prepared statement, its decoders

    def handle_data_row(data: bytes, cursor) -> None:
        ps = cursor.ps
        if ps is not cached[0]:
            cached[0], cached[1] = ps, _row_decoders(cursor)
        row = []
        append = row.append
        offset = 2
        for decode in cached[1]:
            length = _I_UNPACK(data, offset)[0]
            offset += 4
            if length == -1:
                append(None)
            else:
                append(decode(data, offset, length))
                offset += length
        cursor._cached_rows.append(row)

    handlers[b"D"] = handle_data_row
    return True


def raw_array(values, typ: pa.DataType) -> pa.Array:
    """A column of raw values (from a connection `use_raw_values` patched) as Arrow `typ`."""
    if pa.types.is_timestamp(typ):
        micros = pa.array(values, pa.int64())
        micros = pc.min_element_wise(micros, _DATETIME_MAX_US, skip_nulls=False)
        micros = pc.max_element_wise(micros, _DATETIME_MIN_US, skip_nulls=False)
        return pc.add(micros, PG_EPOCH_US).cast(typ)
    return pa.array(values, pa.binary()).cast(typ)  # UTF-8 bytes: Arrow validates the column


def _params(fn: Callable) -> list[str] | None:
    try:
        return [p for p in inspect.signature(fn).parameters if p != "self"]
    except (TypeError, ValueError):
        return None


def internals_changed(con, cursor=None) -> list[str]:
    """What this module relies on that `con` (a fresh, unpatched connection) and `cursor` (one of
    its cursors after a SELECT, optional) no longer have as described in the module docstring,
    one line per internal, naming it; empty when every patch applies."""
    problems: list[str] = []
    types = getattr(con, "redshift_types", None)
    if not isinstance(types, dict):
        problems.append(f"Connection.redshift_types is no longer a dict (it is {type(types).__name__})")
        types = {}
    for oid, (driver_fn, fmt_needed, _) in RAW_DECODERS.items():
        if oid not in types:
            problems.append(f"Connection.redshift_types[{oid}] is missing (expected the decoder {driver_fn})")
            continue
        entry = types[oid]
        if not (isinstance(entry, tuple) and len(entry) == 2):
            problems.append(f"Connection.redshift_types[{oid}] is no longer a (format code, decoder) pair: {entry!r}")
            continue
        fmt, fn = entry
        name = getattr(fn, "__name__", repr(fn))
        if name != driver_fn:
            problems.append(f"Connection.redshift_types[{oid}]: the decoder is {name}, no longer {driver_fn}")
        elif fmt_needed is not None and fmt != fmt_needed:
            problems.append(f"Connection.redshift_types[{oid}]: {driver_fn} has format code {fmt}, no longer "
                            f"{fmt_needed} (binary)")
        elif _params(fn) is not None and len(_params(fn)) != 3:
            problems.append(f"Connection.redshift_types[{oid}]: {driver_fn} takes {_params(fn)}, no longer "
                            "(data, offset, length)")
    handlers = getattr(con, "message_types", None)
    handler = handlers.get(b"D") if isinstance(handlers, dict) else None
    if getattr(handler, "__name__", None) != DATA_ROW_HANDLER:
        problems.append(f"Connection.message_types[b'D'] is {getattr(handler, '__name__', handler)!r}, no longer "
                        f"{DATA_ROW_HANDLER}")
    elif _params(handler) not in (None, ["data", "cursor"]):
        problems.append(f"Connection.{DATA_ROW_HANDLER} takes {_params(handler)}, no longer (data, cursor)")
    if cursor is not None:
        if not callable(getattr(cursor, "truncated_row_desc", None)):
            problems.append("Cursor.truncated_row_desc() is gone")
        else:
            descs = cursor.truncated_row_desc()
            if not all(isinstance(d, tuple) and len(d) in (1, 2) and callable(d[0]) for d in descs):
                problems.append("Cursor.truncated_row_desc() no longer gives (decoder,) or (decoder, scale): "
                                f"{descs!r}")
        if getattr(cursor, "ps", None) is None:
            problems.append("Cursor.ps (the current result's prepared statement) is gone")
        if not callable(getattr(getattr(cursor, "_cached_rows", None), "append", None)):
            problems.append("Cursor._cached_rows (where DataRow handlers append rows) is gone")
    return problems
