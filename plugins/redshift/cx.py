"""The connectorx fetch engine: a day's rows read by connectorx (Rust) as Arrow batches.

Why: one stream of the driver engine is bound by redshift-connector's decoding in Python
(~200-300 K rows/s here); connectorx decodes the PostgreSQL wire protocol in Rust (~900 K rows/s
on one core here, BENCHMARKS.md).

How a fetch runs:

1. **Describe** (redshift-connector, one short session): `SELECT * FROM (<day query>) ingestd_d
   LIMIT 0` gives the result's columns, their type OIDs and modifiers, hence the Arrow schema the
   driver engine would produce (`arrow_type`). A wrong password, a missing grant or bad SQL fails
   here, fast and with its SQLSTATE, before connectorx is started.
2. **Project**: connectorx reads natively what it maps exactly (integers, floats, booleans,
   text, dates, timestamps); every other column is cast in the SQL: SUPER to its JSON text with
   `JSON_SERIALIZE`, NUMERIC/DECIMAL to text (parsed by Arrow into `decimal128(p, s)`, exactly),
   anything else (TIME, TIMETZ, INTERVAL, JSON, …) to VARCHAR. The query is only wrapped in such a
   projection when one of its columns needs it.
3. **Read in a child process**: connectorx 0.4 holds the interpreter lock while it waits for its
   next batch (its iterator's `__next__` does not release it), so in the daemon's process the
   event loop, and everything else, would stand still while the warehouse computes a day. The
   read therefore runs in a process of its own, `python cx_child.py` (a script importing only
   pyarrow and connectorx, started in a new session, its task and the URL given on stdin, never
   in its arguments): `read_sql(url, queries, protocol="cursor", return_type="arrow_stream",
   batch_size=...)`, written to its stdout as one Arrow IPC stream, which the fetch thread (an
   `ingestd.ThreadStream`) reads without the lock and hands on. A child that exits with an error
   (or is killed) ends the stream with that error, never as a short day. `protocol="cursor"`
   is the one Redshift allows (no binary COPY). Several queries (a source's `slices`) are read
   by connectorx itself, one connection and one Rust thread each, in the same child.
4. **Conform**: each batch is cast to the driver engine's schema, value for value: timestamps
   clamped to datetime.min/max as the driver clamps ±infinity, `large_string` to `string`, text
   numerics to decimals, etc.

Back-pressure: the pipe blocks the child when the daemon does not read. connectorx's own queue
between its Rust reader and the child's Python loop is not bounded, so when the map and sink
stages are slower than connectorx the child's memory grows by the difference (BENCHMARKS.md
measures the whole process tree).

Stopping: closing the stream (a cancelled or failed load) kills the child, which closes its
connections, and cancels the statement on the server: each query connectorx runs starts with a
comment `/* ingestd:<id> */`, and a short driver session runs `pg_cancel_backend` on the sessions
of this user whose query starts with it (in `pg_stat_activity`, else Redshift's `stv_recents`).

Parameters: connectorx has no bound parameters. The connector declares the `literal` style when
this engine is on, so the kernel writes `{day}`, `{start}` and `{end}` as typed SQL literals from
its own date/datetime/int objects (`ingestd.core.query.sql_literal`), never from text a user or a
request supplied.

Secrets: connectorx takes a URL; the password is percent-encoded into it, the URL is never logged,
and every error text from the child is scrubbed of the URL, the password and its encoded form
before it is raised.

TLS: `ssl = false` is `sslmode=disable`; `ssl = true` with `sslmode = "verify-ca"` is connectorx's
`sslmode=require` with `sslrootcert` set to the Redshift CA bundle shipped with redshift-connector
(the server's certificate must chain to it or to a system CA). connectorx 0.4 cannot check the
host name, so `sslmode = "verify-full"` is refused with `fetch_engine = "connectorx"` (and the
default engine is then the driver). IAM logins (temporary credentials) also stay on the driver.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from ingestd import ConnectorError, DayWindow, Outlet, PermanentError, Rechunker, TransientError, quote_ident

log = structlog.get_logger("ingestd.redshift")

__all__ = ["available", "Plan", "cx_url", "translate_cx", "CxRead"]

NATIVE_OIDS = frozenset({16, 20, 21, 23, 700, 701, 19, 25, 1042, 1043, 1082, 1083, 1114, 1184})
"""Types connectorx reads into the driver engine's Arrow values (after `Plan.conform`)."""
SUPER_OID = 4000
NUMERIC_OID = 1700
DESCRIBE_ALIAS = "ingestd_d"
PROJECT_ALIAS = "ingestd_c"
_DT_MIN_US = -62_135_596_800_000_000
_DT_MAX_US = 253_402_300_799_999_999
_D_MIN, _D_MAX = -719_162, 2_932_896  # date.min/max in days since 1970-01-01


def available() -> bool:
    """connectorx can be imported here (without importing it: it loads a large library)."""
    import importlib.util
    return importlib.util.find_spec("connectorx") is not None


def ca_bundle() -> str | None:
    """The Redshift CA bundle redshift-connector ships, the root connectorx checks against."""
    import importlib.util
    spec = importlib.util.find_spec("redshift_connector")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "files" / "redshift-ca-bundle.crt"
    return str(path) if path.exists() else None


def cx_url(*, host: str, port: int, database: str, user: str, password: str, ssl: bool, sslmode: str,
           application_name: str, timeout: int) -> str:
    """The connection URL connectorx takes, user, password and database percent-encoded."""
    if ssl and sslmode != "verify-ca":
        raise PermanentError(f"fetch_engine = \"connectorx\" cannot check sslmode = {sslmode!r} (connectorx 0.4 "
                             "checks the certificate chain, not the host name): use verify-ca or the driver engine")
    params = {"application_name": application_name, "connect_timeout": str(int(timeout)), "keepalives": "1",
              "keepalives_idle": "60"}
    if ssl:
        params["sslmode"] = "require"
        bundle = ca_bundle()
        if bundle is None:
            raise PermanentError("the Redshift CA bundle of redshift-connector was not found: reinstall "
                                 "'ingestd[redshift]'")
        params["sslrootcert"] = bundle
    else:
        params["sslmode"] = "disable"
    where = f"[{host}]" if ":" in host else host
    q = urllib.parse.quote
    return (f"postgresql://{q(user, safe='')}:{q(password, safe='')}@{where}:{int(port)}/{q(database, safe='')}?"
            f"{urllib.parse.urlencode(params)}")


# -- errors ---------------------------------------------------------------------------------------

SQLSTATE_IN_TEXT = re.compile(r"SqlState\(E?([0-9A-Z]{5})\)|code: \"?([0-9A-Z]{5})\"?")
MESSAGE_IN_TEXT = re.compile(r'message: "((?:[^"\\]|\\.)*)"')
CX_TRANSIENT_WORDS = ("connection closed", "connection reset", "unexpected eof", "broken pipe", "timed out",
                      "connection refused", "error communicating with the server", "os error 104",
                      "os error 32", "os error 111", "terminating connection", "kind: io", "bytes remaining on stream",
                      "kind: closed")


def scrub(text: str, secrets: list[str]) -> str:
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return re.sub(r"postgres(?:ql)?://[^\s\"']*", "postgresql://***", text)


def translate_cx(text: str, where: str, secrets: list[str]) -> ConnectorError:
    """An error connectorx raised (as text: it crossed a process boundary) in the kernel's
    classes: the SQLSTATE where the text carries one, else by its words; never the URL."""
    from .connector import _sqlstate_words
    text = scrub(text, secrets)
    found = SQLSTATE_IN_TEXT.search(text)
    code = next((g for g in found.groups() if g), None) if found else None
    message = MESSAGE_IN_TEXT.search(text)
    detail = message.group(1) if message else text
    lowered = text.lower()
    if code:
        transient, words = _sqlstate_words(code, detail)
        return (TransientError if transient else PermanentError)(f"{words}: {detail[:500]}", code=code)
    if "tls" in lowered or "ssl" in lowered:
        return PermanentError(f"{where} refused the TLS connection connectorx asked for (sslmode): {text[:300]}",
                              code="08001")
    if "password authentication failed" in lowered:
        return PermanentError(f"Redshift refused the user name or password: {detail[:300]}", code="28P01")
    if any(w in lowered for w in CX_TRANSIENT_WORDS):
        return TransientError(f"the connection to {where} failed (connectorx): {text[:500]}", code="08006")
    if "panicexception" in lowered and "not implemented" in lowered:
        return PermanentError(f"connectorx cannot read a column type of the result: {text[:300]}")
    return PermanentError(f"connectorx failed: {text[:500]}")


# -- the plan: columns, projection, conformance ----------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What the describe step learnt: the Arrow schema to produce and, per column, the SQL
    expression connectorx reads it with (None: as it is)."""

    schema: pa.Schema
    oids: tuple[int, ...]
    casts: tuple[str | None, ...]

    @classmethod
    def of(cls, columns: list[Any]) -> Plan:
        fields, oids, casts = [], [], []
        for c in columns:
            col = f"{PROJECT_ALIAS}.{quote_ident(c.name)}"
            if c.oid in NATIVE_OIDS:
                cast = None
            elif c.oid == SUPER_OID:
                cast = f"JSON_SERIALIZE({col})"
            else:
                cast = f"CAST({col} AS VARCHAR)"
            fields.append(pa.field(c.name, c.type))
            oids.append(c.oid)
            casts.append(cast)
        return cls(pa.schema(fields), tuple(oids), tuple(casts))

    def sql(self, query_sql: str, tag: str) -> str:
        """The query connectorx runs: tagged, projected when a column needs a cast."""
        if not any(self.casts):
            return f"/* {tag} */\n{query_sql}"
        exprs = ", ".join(f"{cast} AS {quote_ident(f.name)}" if cast else f"{PROJECT_ALIAS}.{quote_ident(f.name)}"
                          for f, cast in zip(self.schema, self.casts, strict=True))
        return f"/* {tag} */\nSELECT {exprs} FROM (\n{query_sql}\n) {PROJECT_ALIAS}"

    def conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """A connectorx batch as the driver engine's values and schema."""
        if batch.num_columns != len(self.schema):
            raise PermanentError(f"connectorx returned {batch.num_columns} columns, the query describes "
                                 f"{len(self.schema)}")
        arrays = []
        for field, array in zip(self.schema, batch.columns, strict=True):
            try:
                arrays.append(_conform(array, field.type))
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
                raise PermanentError(f"column {field.name!r} could not be converted to Arrow {field.type}: "
                                     f"{exc}") from exc
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def _conform(array: pa.Array, typ: pa.DataType) -> pa.Array:
    if pa.types.is_timestamp(typ):
        # connectorx gives ±infinity as chrono's extremes; the driver clamps to datetime.min/max
        if pa.types.is_timestamp(array.type):
            micros = array.cast(pa.timestamp("us", tz=array.type.tz)).view(pa.int64())
        else:
            micros = array.cast(pa.int64())
        micros = pc.max_element_wise(pc.min_element_wise(micros, _DT_MAX_US, skip_nulls=False), _DT_MIN_US,
                                     skip_nulls=False)
        return micros.view(pa.timestamp("us", tz=typ.tz)).cast(typ)
    if pa.types.is_date32(typ) and pa.types.is_date(array.type):
        days = array.cast(pa.date32()).view(pa.int32())
        days = pc.max_element_wise(pc.min_element_wise(days, pa.scalar(_D_MAX, pa.int32()), skip_nulls=False),
                                   pa.scalar(_D_MIN, pa.int32()), skip_nulls=False)
        return days.view(pa.date32())
    if array.type == typ:
        return array
    if pa.types.is_large_string(array.type) or pa.types.is_string(array.type):
        if pa.types.is_string(typ):
            return array.cast(typ)
        return array.cast(pa.string()).cast(typ)  # numerics: Arrow parses the column
    return array.cast(typ)


# -- the child process ----------------------------------------------------------------------------

CHILD = Path(__file__).with_name("cx_child.py")
ERROR_MARK = "INGESTD-CX-ERROR "


class CxRead:
    """One connectorx read in a child process (cx_child.py), seen from the fetch thread: an Arrow
    IPC stream on the child's stdout, an error on its stderr."""

    def __init__(self, url: str, steps: list[list[str]], batch_rows: int, pre: list[str]):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INGESTD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        env["RUST_BACKTRACE"] = "0"
        env.setdefault("RUST_LOG", "off")
        self.process = subprocess.Popen([sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env, start_new_session=True)
        self._stderr: list[bytes] = []
        self._drain = threading.Thread(target=self._read_stderr, name="ingestd-cx-stderr", daemon=True)
        self._drain.start()
        assert self.process.stdin is not None and self.process.stdout is not None
        with contextlib.suppress(OSError):
            self.process.stdin.write(json.dumps({"url": url, "steps": steps, "batch_rows": batch_rows,
                                                 "pre": pre}).encode())
            self.process.stdin.close()
        self._stdout = self.process.stdout
        self._source: Any = _native_reader(self._stdout)
        self._reader: Any = None
        self.rows = 0
        self.ended = False

    def _read_stderr(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        with contextlib.suppress(Exception):
            for line in iter(lambda: stream.read(65536), b""):
                self._stderr.append(line)
                if sum(len(x) for x in self._stderr) > 1_000_000:
                    del self._stderr[:-4]

    def receive(self) -> pa.RecordBatch | int | str:
        """Blocking: the next batch, the row count (the end), or an error text."""
        try:
            if self._reader is None:
                self._reader = pa.ipc.open_stream(self._source)
            batch = self._reader.read_next_batch()
            self.rows += batch.num_rows
            return batch
        except StopIteration:
            pass
        except (pa.ArrowException, OSError, ValueError):
            pass  # the child ended mid-stream or before its schema: its exit code and stderr say why
        code = self.process.wait()
        self._drain.join(5)
        if code == 0:
            self.ended = True
            return self.rows
        text = b"".join(self._stderr).decode("utf-8", "replace")
        mark = text.rfind(ERROR_MARK)
        if mark >= 0:
            return text[mark + len(ERROR_MARK):].strip()
        return f"connection closed: the connectorx process ended (exit code {code}) before its end"

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()

    def stop(self) -> None:
        """Kill the child (it holds nothing that needs closing: its sockets close with it)."""
        if self.process.poll() is None:
            self.kill()
        with contextlib.suppress(Exception):
            self.process.wait(5)
        with contextlib.suppress(Exception):
            self._source.close()
        with contextlib.suppress(Exception):
            self._stdout.close()


PIPE_BYTES = 1 << 20


def _native_reader(pipe: Any) -> Any:
    """The child's stdout as a file Arrow reads natively, without the interpreter lock: through a
    Python file object, every 64 KB read of a pipe takes the lock back, and behind the map and
    sink threads each take can wait a whole switch interval. On Linux the pipe also gets 1 MB."""
    fd = pipe.fileno()
    with contextlib.suppress(Exception):
        import fcntl
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    path = f"/proc/self/fd/{fd}"
    if os.path.exists(path):
        with contextlib.suppress(Exception):
            return pa.OSFile(path, "rb")
    return pipe


def _sub_windows(window: DayWindow, k: int) -> list[DayWindow]:
    """`window` cut into k half-open sub-ranges of equal length, covering it exactly."""
    span = window.end - window.start
    bounds = [window.start + span * i // k for i in range(k)] + [window.end]
    return [DayWindow(window.day, bounds[i], bounds[i + 1], window.timezone) for i in range(k)]


def chunked(queries: list[Any], chunks: int) -> list[list[Any]]:
    """The day's queries as steps read one after the other (`fetch_chunks`), each step one
    sub-range of the day.

    connectorx 0.4 queues what it reads without bound; when the map and sink stages are slower,
    its process holds most of the day. With `fetch_chunks = K` a query that bounds the day with
    `{start}` and `{end}` (as timestamps) is read as K chunks: its template rendered again on K
    equal sub-ranges of its window, half-open, so memory holds at most about one chunk. As with
    time slices, only right for a query whose rows are filtered row by row on `{start}`/`{end}`
    (no LIMIT, aggregate or DISTINCT over the day): an opt-in, never the default. Other queries
    are read whole."""
    def splittable(q: Any) -> bool:
        if q.template is None or not {"start", "end"} <= set(q.names):
            return False
        return bool(q.with_window(q.window).sql == q.sql)  # not an epoch-unit query

    if chunks <= 1 or not queries or not all(splittable(q) for q in queries):
        return [list(queries)]
    per_query = [[q.with_window(w) for w in _sub_windows(q.window, chunks)] for q in queries]
    return [list(step) for step in zip(*per_query, strict=True)]


def new_tag() -> str:
    return f"ingestd:{uuid.uuid4().hex}"


CANCEL_QUERIES = (
    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND query LIKE ?",
    "SELECT pg_cancel_backend(pid) FROM stv_recents WHERE status = 'Running' AND query LIKE ?",
)


def produce(connector: Any, queries: list[Any], batch_rows: int, out: Outlet[pa.RecordBatch],
            state: dict[str, Any]) -> None:
    """The fetch thread of the connectorx engine (see the module docstring)."""
    from .connector import _columns, _Session, translate

    config = connector.config
    where = connector.where
    session = _Session(connector)
    state["session"] = session
    try:
        con = session.open()
        cur = session.cursor()
        cur.execute(f"SELECT * FROM (\n{queries[0].sql}\n) {DESCRIBE_ALIAS} LIMIT 0", queries[0].params or None)
        plan = Plan.of(_columns(cur))
        con.rollback()
    except ConnectorError:
        raise
    except Exception as exc:
        if out.stopped.is_set():
            return
        raise translate(exc, where) from exc
    finally:
        session.close()
    if out.stopped.is_set():
        return
    password = config.password.reveal() if config.password is not None else ""
    url = cx_url(host=config.host, port=config.port, database=config.database, user=config.user or "",
                 password=password, ssl=config.ssl, sslmode=config.sslmode,
                 application_name=config.application_name, timeout=config.timeout)
    secrets = [url, password, urllib.parse.quote(password, safe=""), urllib.parse.quote_plus(password)]
    tag = new_tag()
    state["tag"] = tag
    pre = ["SET timezone TO 'UTC'"]
    if config.statement_timeout_ms:
        pre.append(f"SET statement_timeout TO {int(config.statement_timeout_ms)}")
    steps = [[plan.sql(q.sql, tag) for q in step] for step in chunked(queries, config.fetch_chunks)]
    read = CxRead(url, steps, batch_rows, pre)
    state["read"] = read
    rechunker = Rechunker(batch_rows)
    started = time.monotonic()
    try:
        while not out.stopped.is_set():
            item = read.receive()
            if isinstance(item, pa.RecordBatch):
                if not out.put_all(rechunker.push(plan.conform(item))):
                    return
            elif isinstance(item, int):
                out.put_all(rechunker.flush())
                log.debug("cx.done", connection=connector.name, rows=read.rows, queries=len(queries),
                          seconds=round(time.monotonic() - started, 3))
                return
            else:
                if out.stopped.is_set():
                    return
                raise translate_cx(item, where, secrets)
    finally:
        if not read.ended:
            read.stop()
            cancel(connector, tag)
        else:
            read.stop()


def cancel(connector: Any, tag: str) -> None:
    """Cancel, on the server, the statements of a read tagged `tag` (best effort)."""
    from .connector import _Session
    session = _Session(connector)
    try:
        session.open()
        con = session.con
        assert con is not None
        con.autocommit = True
        for statement in CANCEL_QUERIES:
            try:
                cur = session.cursor()
                cur.execute(statement, [f"%{tag}%"])
                cur.fetchall()
                return
            except Exception:
                continue
    except Exception as exc:
        log.debug("cx.cancel_failed", connection=connector.name, error=f"{type(exc).__name__}")
    finally:
        session.close()


def interrupt(state: dict[str, Any]) -> None:
    """From another thread: stop a fetch thread blocked in the describe session or the child."""
    session = state.get("session")
    if session is not None:
        session.interrupt()
    read = state.get("read")
    if read is not None:
        read.kill()
