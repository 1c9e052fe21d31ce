"""The Amazon Redshift connector (type `redshift`), on AWS's `redshift-connector` driver.

Install the driver with `pip install 'ingestd[redshift]'`. `sample.toml` beside this module is the
documented configuration: every key, its default, what it does.

Two fetch engines (`fetch_engine`). `connectorx`, opt-in (a password login, with TLS `verify-ca`
or none): cx.py reads the day with connectorx in a
child process; the connection then declares the `literal` parameter style, so every statement
(probe, check, fetch) carries the day values as typed literals written from date objects.
`driver`, the default: what this docstring describes below, redshift-connector's server-side cursor. Probes,
checks and cancellation use redshift-connector in both.

How a day is read. Every call opens its own connection (session time zone UTC, the statement
timeout and application name set) and closes it when done, so nothing is held between windows.
`probe` runs `SELECT COUNT(*) FROM (<day query>) q`. `fetch` streams: in a transaction it runs
`DECLARE ingestd_<id> CURSOR FOR <day query>` and then `FETCH FORWARD fetch_size` until the
cursor is drained. A plain `execute` + `fetchmany` would not do: redshift-connector reads the
whole result into memory first. The fetching runs in a thread of its own (an
`ingestd.ThreadStream`), which decodes each FETCH's rows, turns them into an Arrow record batch,
cuts them into batches of `batch_rows` and hands those on one batch ahead, while the kernel maps
and writes the batches before (in DuckDB or the sink's driver, without the interpreter lock).
Memory therefore holds a few batches, whatever the size of the day. Decoding is the limit of one
stream, so the fetch session decodes faster than the driver's defaults: timestamps and text stay
wire values that Arrow converts a column at a time, and rows are cut by a DataRow handler that
sets itself up once per result (fast_rows.py says how, and which driver internals it relies on;
`BENCHMARKS.md` has the figures). For more than one core's worth of decoding, set the source's
`slices`. Closing the stream early (or cancelling the load) stops the fetch thread, cancels a
statement still running on the server (a PostgreSQL CancelRequest) and closes the session, which
closes the cursor. TCP keepalives are on, and a
session that hears nothing from the server for a minute past statement_timeout_ms is taken as
lost (a transient error), so a dead network never hangs a load.

Redshift's own limits on cursors: the whole result of a cursor is materialised on the leader
node when the first row is fetched, so the first FETCH waits for the whole day query; only one
cursor may be open per session (each fetch has its own session); and the total size of cursor
results is capped by node type (see "Cursor constraints" in the DECLARE documentation). A day
too large for that cap fails with Redshift's error: split the source (a `ready_query`, fewer
columns) or use a larger node type.

Parameters: the day values are bound server-side. The connector declares the `qmark` style:
redshift-connector turns each `?` outside quotes and comments into `$1`, `$2`… and sends the
values in a Bind message, never in the SQL text. (The `format` style is not used: the kernel
doubles every `%` for it, and redshift-connector leaves `%%` doubled inside string literals, so
`LIKE 'a%'` would change.)

No fingerprint: this connector declares `fingerprint = false`, so re-checks compare row counts
only (`detect = "count"`). An order-independent content hash needs Redshift functions (such as
STRTOL over MD5 of every column) that could not be verified against a real Redshift here.

Errors: every server error carries its SQLSTATE as the error's `code`, with a plain sentence.
Transient (retried by the kernel): lost or refused connections (08xxx), shutdowns and restarts
(57P01-57P03), serialization failures (40001, and Redshift's "serializable isolation
violation"), deadlocks (40P01), lock timeouts (55P03), lack of resources (53xxx), system errors
(58xxx), a query cancelled by an operator. Permanent: bad SQL, unknown tables or columns,
missing grants, a bad user name or password, an unknown database, a query running past
statement_timeout_ms, data that cannot be converted.

Types (Redshift → Arrow): SMALLINT int16, INTEGER int32, BIGINT int64, DECIMAL(p,s)
decimal128(p,s), REAL float32, DOUBLE PRECISION float64, BOOLEAN bool, CHAR (blank-padded, as
Redshift returns it) and VARCHAR string, DATE date32, TIMESTAMP timestamp[us] (naive, as
stored), TIMESTAMPTZ timestamp[us, UTC], TIME time64[us], SUPER string (JSON text); any other
type (TIMETZ, INTERVAL, VARBYTE, GEOMETRY, …) arrives as its text. NUMERIC without a declared
precision (which Redshift never returns, plain PostgreSQL does) arrives as float64.

Tested here with the real driver against PostgreSQL 15 through a small protocol-fixing proxy
(tests/pg_proxy.py), not against a live Redshift: DECLARE with bound parameters, FETCH FORWARD and
the error codes are the PostgreSQL ones Redshift also uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import pyarrow as pa
import structlog

from ingestd import (
    Capabilities,
    ConfigError,
    Connector,
    ConnectorError,
    DayQuery,
    Outlet,
    PermanentError,
    ProbeResult,
    Rechunker,
    Secret,
    SourceInfo,
    ThreadStream,
    TransientError,
    quote_ident,
)

from . import cx
from .fast_rows import raw_array, use_fast_data_rows, use_raw_values

log = structlog.get_logger("ingestd.redshift")
T = TypeVar("T")

__all__ = ["RedshiftConfig", "RedshiftConnector", "arrow_type", "engine", "translate"]


@dataclass
class RedshiftConfig:
    database: str
    host: str | None = None
    port: int = 5439
    user: str | None = None
    password: Secret | None = None
    iam: bool = False
    cluster_identifier: str | None = None
    workgroup: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    session_token: Secret | None = None
    ssl: bool = True
    sslmode: Literal["verify-ca", "verify-full"] = "verify-ca"
    application_name: str = "ingestd"
    statement_timeout_ms: int = 3_600_000
    fetch_size: int = 1000
    timeout: int = 30
    fetch_engine: Literal["connectorx", "driver"] | None = None
    fetch_chunks: int = 1

    def validate(self) -> None:
        if not self.database:
            raise ConfigError("database", "must not be empty")
        if not 1 <= self.port <= 65535:
            raise ConfigError("port", "must be between 1 and 65535")
        if self.fetch_size < 1:
            raise ConfigError("fetch_size", "must be at least 1 (single-node clusters allow at most 1000)")
        if self.statement_timeout_ms < 0:
            raise ConfigError("statement_timeout_ms", "must not be negative (0 leaves the cluster's setting)")
        if self.timeout < 1:
            raise ConfigError("timeout", "must be at least 1 second")
        if not 1 <= self.fetch_chunks <= 96:
            raise ConfigError("fetch_chunks", "must be between 1 and 96")
        if self.fetch_engine == "connectorx":
            if not cx.available():
                raise ConfigError("fetch_engine", "connectorx is not installed: pip install 'ingestd[redshift]'")
            if self.iam:
                raise ConfigError("fetch_engine", "the connectorx engine logs in with a password; with iam = true "
                                  "use fetch_engine = \"driver\" (or leave it out)")
            if self.ssl and self.sslmode != "verify-ca":
                raise ConfigError("fetch_engine", f"connectorx cannot check sslmode = {self.sslmode!r} (it checks "
                                  "the certificate chain, not the host name): use sslmode = \"verify-ca\" or "
                                  "fetch_engine = \"driver\"")
        if self.iam:
            if not self.ssl:
                raise ConfigError("ssl", "IAM authentication needs ssl = true")
            if not (self.cluster_identifier or self.workgroup or self.host):
                raise ConfigError("cluster_identifier", "with iam = true give cluster_identifier (a provisioned "
                                  "cluster) or workgroup (Redshift Serverless)")
            if self.cluster_identifier and self.workgroup:
                raise ConfigError("workgroup", "give cluster_identifier or workgroup, not both")
            if self.password is not None:
                raise ConfigError("password", "not used with iam = true (the database password comes from IAM)")
            if (self.access_key_id is None) != (self.secret_access_key is None):
                raise ConfigError("access_key_id", "access_key_id and secret_access_key go together")
            if self.profile and self.access_key_id is not None:
                raise ConfigError("profile", "give profile or access keys, not both")
        else:
            for key in ("cluster_identifier", "workgroup", "profile", "access_key_id", "secret_access_key",
                        "session_token"):
                if getattr(self, key):
                    raise ConfigError(key, "only used with iam = true")
            if not self.host:
                raise ConfigError("host", "missing: the cluster or workgroup endpoint")
            if not self.user:
                raise ConfigError("user", "missing: the database user")
            if self.password is None:
                raise ConfigError("password", "missing: give password_env, password_file or password (or iam = true)")


def engine(config: RedshiftConfig) -> Literal["connectorx", "driver"]:
    """The fetch engine of a connection: `fetch_engine`, else the driver. connectorx is opt-in
    while it buffers what the pipeline has not taken yet without bound (sample.toml): a day's
    backlog in memory is a risk a default must not take."""
    return config.fetch_engine or "driver"


# -- the driver ---------------------------------------------------------------------------------

def _driver():
    try:
        import redshift_connector
    except ImportError as exc:
        raise PermanentError("the redshift connector needs the redshift-connector driver, which is not installed: "
                             "pip install 'ingestd[redshift]'") from exc
    return redshift_connector


def connect_kwargs(config: RedshiftConfig) -> dict[str, Any]:
    """redshift_connector.connect() keyword arguments for a config (secrets revealed)."""
    kw: dict[str, Any] = {
        "database": config.database,
        "port": config.port,
        "ssl": config.ssl,
        "sslmode": config.sslmode,
        "application_name": config.application_name,
        "timeout": config.timeout,
        "tcp_keepalive": True,
        "tcp_keepalive_idle": 60,  # NAT gateways and load balancers drop idle flows; probe first
        "tcp_keepalive_interval": 15,
        "tcp_keepalive_count": 4,
    }
    if config.host:
        kw["host"] = config.host
    if config.iam:
        kw["iam"] = True
        for key in ("region", "profile", "cluster_identifier"):
            if getattr(config, key):
                kw[key] = getattr(config, key)
        if config.user:
            kw["db_user"] = config.user
        if config.workgroup:
            kw["is_serverless"] = True
            kw["serverless_work_group"] = config.workgroup
        for key in ("access_key_id", "secret_access_key", "session_token"):
            secret = getattr(config, key)
            if secret is not None:
                kw[key] = secret.reveal()
    else:
        kw["user"] = config.user
        kw["password"] = config.password.reveal() if config.password is not None else None
    return kw


def _supported(function, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Leave out the keepalive tuning options an older driver release does not know."""
    import inspect
    try:
        known = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in known or not k.startswith("tcp_keepalive_")}


# -- errors -------------------------------------------------------------------------------------

# SQLSTATE (or its two-character class) -> (transient?, plain sentence)
SQLSTATES: dict[str, tuple[bool, str]] = {
    "28P01": (False, "Redshift refused the user name or password"),
    "28000": (False, "Redshift refused the login"),
    "3D000": (False, "the database does not exist"),
    "42501": (False, "permission denied"),
    "42P01": (False, "the query names a table or view that does not exist"),
    "42703": (False, "the query names a column that does not exist"),
    "42601": (False, "the query is not valid SQL"),
    "42883": (False, "the query calls a function or operator that does not exist for these argument types"),
    "42804": (False, "the query mixes values of incompatible types"),
    "42846": (False, "the query converts a value to a type it cannot be converted to"),
    "40001": (True, "the transaction conflicted with a concurrent one (serialization failure)"),
    "40P01": (True, "Redshift detected a deadlock"),
    "55P03": (True, "a lock the query needs could not be taken in time"),
    "57P01": (True, "the server ended the session (administrator command or restart)"),
    "57P02": (True, "the server is crashing and restarting"),
    "57P03": (True, "the server is not accepting connections yet (starting up, resizing or resuming)"),
    "57014": (True, "the query was cancelled on the server"),
    "08": (True, "the connection to Redshift failed"),
    "53": (True, "Redshift is short of resources (memory, disk or connections)"),
    "58": (True, "Redshift hit a system error"),
    "22": (False, "a value in the data could not be converted or computed"),
    "0A": (False, "Redshift does not support a feature the query uses"),
    "42": (False, "the query is not valid for this database"),
    "XX": (False, "Redshift failed with an internal error"),
}

# Redshift reports some retryable conditions as internal errors (XX000) with these words.
TRANSIENT_WORDS = ("serializable isolation violation", "concurrent transaction", "connection reset",
                   "server closed the connection", "please retry", "try again", "currently unavailable",
                   "in maintenance", "is resizing", "is being resumed")

CONNECTION_WORDS = ("communication error", "brokenpipe", "server socket closed", "connection is closed",
                    "time out", "timed out", "connection reset", "connection refused")


def _fields(exc: BaseException) -> dict[str, str] | None:
    """The server's ErrorResponse fields (C = SQLSTATE, M = message, D = detail, H = hint)."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], dict) and "C" in args[0]:
        return args[0]
    return None


def _sqlstate_words(code: str, message: str) -> tuple[bool, str]:
    if code == "57014" and "statement timeout" in message.lower():
        return False, "the query ran longer than statement_timeout_ms"
    if code.startswith("XX") and any(w in message.lower() for w in TRANSIENT_WORDS):
        return True, "Redshift asked to retry"
    for key in (code, code[:3], code[:2]):
        if key in SQLSTATES:
            return SQLSTATES[key]
    return False, "Redshift refused the query"


def translate(exc: BaseException, where: str = "Redshift") -> ConnectorError:
    """Sort a driver (or socket, or AWS SDK) error into the kernel's classes, in plain words, with
    the SQLSTATE as the code where the server sent one."""
    if isinstance(exc, ConnectorError):
        return exc
    fields = _fields(exc)
    if fields is not None:
        code = fields.get("C", "")
        message = fields.get("M", "").strip()
        transient, words = _sqlstate_words(code, message)
        text = f"{words}: {message}" if message else words
        detail = (fields.get("D") or "").strip()
        if detail:
            text += f" ({detail[:300]})"
        hint = (fields.get("H") or "").strip()
        if hint:
            text += f"; hint: {hint[:200]}"
        return (TransientError if transient else PermanentError)(text, code=code or None)
    name = type(exc).__name__
    parts = [a for a in getattr(exc, "args", ()) if a is not None]
    text = ": ".join(str(a) for a in parts) or name
    lowered = text.lower()
    if "refuses ssl" in lowered:
        return PermanentError(f"{where} does not accept SSL connections; Redshift always does, so check host and "
                              "port (ssl = false is only for a test server without TLS)", code="08001")
    if isinstance(exc, (OSError, TimeoutError)) or any(isinstance(a, OSError) for a in parts) \
            or any(w in lowered for w in CONNECTION_WORDS) or name == "OperationalError":
        return TransientError(f"the connection to {where} failed: {text}", code="08006")
    response = getattr(exc, "response", None)
    if isinstance(response, dict) or name in ("NoCredentialsError", "EndpointConnectionError", "ClientError"):
        error_code = (response or {}).get("Error", {}).get("Code", "") if isinstance(response, dict) else ""
        retry = name == "EndpointConnectionError" or any(
            w in error_code for w in ("Throttl", "RequestLimitExceeded", "ServiceUnavailable", "InternalFailure"))
        cls = TransientError if retry else PermanentError
        return cls(f"IAM authentication with AWS failed: {text}", code=error_code or None)
    return PermanentError(f"the redshift-connector driver failed: {name}: {text}")


# -- types ----------------------------------------------------------------------------------------

OID_ARROW: dict[int, pa.DataType] = {
    16: pa.bool_(),
    20: pa.int64(),
    21: pa.int16(),
    23: pa.int32(),
    26: pa.int64(),          # oid
    700: pa.float32(),
    701: pa.float64(),
    18: pa.string(), 19: pa.string(), 25: pa.string(), 1042: pa.string(), 1043: pa.string(), 705: pa.string(),
    1082: pa.date32(),
    1083: pa.time64("us"),
    1114: pa.timestamp("us"),
    1184: pa.timestamp("us", tz="UTC"),
    4000: pa.string(),       # SUPER: JSON text
    114: pa.string(),        # JSON
    3802: pa.string(),       # JSONB
}
NUMERIC = 1700
TEXT_LIKE = {18, 19, 25, 1042, 1043, 705, 4000, 3802}
JSON_OIDS = {114}


def arrow_type(oid: int, type_modifier: int = -1) -> pa.DataType:
    """The Arrow type a column of this type OID (and modifier) arrives as."""
    if oid == NUMERIC:
        if type_modifier is not None and type_modifier >= 4:
            precision = ((type_modifier - 4) >> 16) & 0xFFFF
            scale = (type_modifier - 4) & 0xFFFF
            if 1 <= precision <= 38 and scale <= precision:
                return pa.decimal128(precision, scale)
        return pa.float64()
    return OID_ARROW.get(oid, pa.string())


@dataclass(frozen=True)
class _Column:
    name: str
    oid: int
    type: pa.DataType
    raw: bool = False
    """The driver hands this column's values over as they are on the wire (see fast_rows.py)."""


def _columns(cursor, raw_oids: frozenset[int] = frozenset()) -> list[_Column]:
    description = cursor.description or []
    row_desc = (getattr(cursor, "ps", None) or {}).get("row_desc") or []
    out = []
    for i, col in enumerate(description):
        oid = int(col[1])
        modifier = row_desc[i].get("type_modifier", -1) if i < len(row_desc) else -1
        out.append(_Column(str(col[0]), oid, arrow_type(oid, modifier), oid in raw_oids))
    return out


def _values(column: _Column, values: tuple) -> list | tuple:
    typ = column.type
    if column.oid in JSON_OIDS:
        return [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
    if pa.types.is_string(typ) and column.oid not in TEXT_LIKE:
        return [None if v is None else (v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray))
                                         else str(v)) for v in values]
    if pa.types.is_floating(typ) and column.oid == NUMERIC:
        return [None if v is None else float(v) for v in values]
    return values


def rows_to_batch(columns: list[_Column], rows: list | tuple) -> pa.RecordBatch:
    """Rows as the driver gives them (lists of Python values) -> one Arrow record batch."""
    schema = pa.schema([pa.field(c.name, c.type) for c in columns])
    arrays = []
    for column, values in zip(columns, zip(*rows, strict=True), strict=False):  # no rows: no values
        try:
            arrays.append(raw_array(values, column.type) if column.raw
                          else pa.array(_values(column, values), type=column.type))
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            raise PermanentError(f"column {column.name!r} (type oid {column.oid}) could not be converted to "
                                 f"Arrow {column.type}: {exc}") from exc
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# -- sessions -------------------------------------------------------------------------------------

class _Session:
    """One connection used by one thread; `interrupt()` may be called from any other thread: it
    cancels the running statement (PostgreSQL CancelRequest on a new socket) and, if that does not
    free the thread soon, shuts the socket down under it."""

    def __init__(self, connector: RedshiftConnector):
        self.connector = connector
        self.con = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def open(self):
        driver = _driver()
        if self._stopping.is_set():
            raise TransientError("the call was stopped")
        config = self.connector.config
        con = driver.connect(**_supported(driver.connect, connect_kwargs(config)))
        with self._lock:
            self.con = con
        if self._stopping.is_set():
            raise TransientError("the call was stopped")
        usock = getattr(con, "_usock", None)
        if usock is not None:
            # The driver's timeout is a socket timeout for the session's whole life. Keep it for
            # connecting only: a long day query is bounded by statement_timeout_ms, and a session
            # that hears nothing for a minute past that (a dead peer, a lost network) is lost.
            with contextlib.suppress(OSError):
                usock.settimeout(config.statement_timeout_ms / 1000 + 60 if config.statement_timeout_ms else None)
        con.autocommit = True  # session settings, outside any transaction
        cursor = con.cursor()
        cursor.execute("SET timezone TO 'UTC'")
        if config.statement_timeout_ms:
            cursor.execute(f"SET statement_timeout TO {int(config.statement_timeout_ms)}")
        con.autocommit = False  # what follows runs in a transaction (a cursor needs one)
        return con

    def cursor(self):
        cursor = self.con.cursor()
        cursor.paramstyle = "qmark"
        return cursor

    def close(self) -> None:
        with self._lock:
            con, self.con = self.con, None
        if con is not None:
            with contextlib.suppress(Exception):
                con.close()

    def interrupt(self, grace: float = 2.0) -> None:
        self._stopping.set()
        with self._lock:
            con = self.con
        if con is None:
            return
        _cancel_request(con)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if self.con is None:
                    return
            time.sleep(0.02)
        usock = getattr(con, "_usock", None)
        if usock is not None:
            with contextlib.suppress(OSError):
                usock.shutdown(socket.SHUT_RDWR)


def _cancel_request(con) -> bool:
    """Ask the server to cancel what the session runs (best effort)."""
    key = getattr(con, "_backend_key_data", None)
    usock = getattr(con, "_usock", None)
    if not key or usock is None:
        return False
    try:
        peer = usock.getpeername()[:2]
        with socket.create_connection(peer, timeout=5) as s:
            s.sendall(struct.pack("!II", 16, 80877102) + bytes(key))
            with contextlib.suppress(OSError):
                s.recv(1)
        return True
    except OSError:
        return False


# -- the connector ----------------------------------------------------------------------------------

PERMISSION = re.compile(r'permission denied for (relation|table|view|schema|sequence|function|database) "?([^"\s]+)"?',
                        re.IGNORECASE)


class RedshiftConnector(Connector):
    type_name = "redshift"
    config_model = RedshiftConfig
    capabilities = Capabilities(fingerprint=False, paramstyle="qmark", quote='"', row_limit=True)

    @classmethod
    def capabilities_for(cls, config: RedshiftConfig) -> Capabilities:
        """The connectorx engine has no bound parameters: the kernel writes the day values as
        typed literals (the `literal` style) for every statement of the connection, so the probe
        counts exactly the SQL the engine reads."""
        style = "literal" if engine(config) == "connectorx" else "qmark"
        return Capabilities(fingerprint=False, paramstyle=style, quote='"', row_limit=True)

    def __init__(self, config: RedshiftConfig, *, name: str):
        super().__init__(config, name=name)
        place = config.host or config.workgroup or config.cluster_identifier or "?"
        self.where = f"Redshift at {place}:{config.port}"

    async def _call(self, work: Callable[[Any, Any], T]) -> T:
        """Run `work(connection, cursor)` on a new session in a worker thread; a cancelled call
        cancels its statement on the server and closes the session."""
        session = _Session(self)

        def run() -> T:
            try:
                session.open()
                return work(session.con, session.cursor())
            except ConnectorError:
                raise
            except Exception as exc:
                raise translate(exc, self.where) from exc
            finally:
                session.close()

        task = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.to_thread(session.interrupt)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 15)
            raise

    # -- the connector API -------------------------------------------------------------------------

    async def check(self, query: DayQuery | None = None) -> None:
        if query is None:
            await self._call(lambda con, cur: cur.execute("SELECT 1").fetchall())
            return

        def work(con, cur):
            try:
                cur.execute(f"SELECT * FROM (\n{query.sql}\n) q LIMIT 0", query.params or None)
                cur.fetchall()
            except Exception as exc:
                error = translate(exc, self.where)
                if error.code == "42501":
                    raise self._missing_grant(con, exc, error) from exc
                raise error from exc
            finally:
                with contextlib.suppress(Exception):
                    con.rollback()

        await self._call(work)

    def _missing_grant(self, con, exc: BaseException, error: ConnectorError) -> ConnectorError:
        """Name the grant a permission error is about, checked with has_table_privilege."""
        message = (_fields(exc) or {}).get("M", "")
        found = PERMISSION.search(message)
        if not found:
            return error
        kind, obj = found.group(1).lower(), found.group(2)
        try:
            con.rollback()
            cur = con.cursor()
            cur.paramstyle = "qmark"
            user = cur.execute("SELECT current_user").fetchone()[0]
            if kind in ("relation", "table", "view"):
                granted = cur.execute("SELECT has_table_privilege(?, 'SELECT')", [obj]).fetchone()[0]
                grant = f"GRANT SELECT ON {obj} TO {quote_ident(user) if not user.isidentifier() else user}"
                what = f"SELECT on {'table' if kind == 'relation' else kind} {obj}"
                if "." in obj:
                    schema = obj.split(".", 1)[0]
                    usage = cur.execute("SELECT has_schema_privilege(?, 'USAGE')", [schema]).fetchone()[0]
                    if not usage:
                        grant = f"GRANT USAGE ON SCHEMA {schema} TO {user}; {grant}"
                        what = f"USAGE on schema {schema} and {what}"
                if granted:
                    return error
            elif kind == "schema":
                grant = f"GRANT USAGE ON SCHEMA {obj} TO {user}"
                what = f"USAGE on schema {obj}"
            else:
                return error
        except Exception:
            return error
        return PermanentError(f"permission denied: user {user} lacks {what}; ask an administrator to run "
                              f"`{grant}` ({message})", code="42501")

    async def probe(self, query: DayQuery, source: SourceInfo | None = None) -> ProbeResult:
        sql = f"SELECT COUNT(*) FROM (\n{query.sql}\n) q"  # newlines: the query may end in a -- comment

        def work(con, cur):
            try:
                return int(cur.execute(sql, query.params or None).fetchone()[0])
            finally:
                with contextlib.suppress(Exception):
                    con.rollback()

        return ProbeResult(await self._call(work), None)

    async def fetch(self, query: DayQuery, batch_rows: int,
                    source: SourceInfo | None = None) -> AsyncIterator[pa.RecordBatch]:
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        _driver()
        if engine(self.config) == "connectorx":
            async with contextlib.aclosing(self._fetch_cx([query], batch_rows)) as batches:
                async for batch in batches:
                    yield batch
            return
        session = _Session(self)
        stream = ThreadStream(lambda out: self._produce(session, query, batch_rows, out), depth=1,
                              interrupt=session.interrupt, name=f"redshift-fetch-{self.name}")
        started = time.monotonic()
        yielded = 0
        async with stream:
            async for batch in stream:
                yielded += batch.num_rows
                yield batch
        log.debug("fetch.done", connection=self.name, rows=yielded, seconds=round(time.monotonic() - started, 3))

    def _produce(self, session: _Session, query: DayQuery, batch_rows: int, out: Outlet) -> None:
        """The fetch thread: DECLARE the day's cursor, FETCH until it is drained, and put the rows
        as record batches of batch_rows. Decoding, the conversion to Arrow and the re-chunking all
        run here, not beside it: decoding and converting both hold the interpreter lock, so a
        second thread could not run them at once, and each of this thread's socket reads would
        hand it the lock for a whole switch interval."""
        fetch_size = self.config.fetch_size
        cursor_name = f"ingestd_{uuid.uuid4().hex[:16]}"
        rechunker = Rechunker(batch_rows)
        try:
            con = session.open()
            raw_oids = use_raw_values(con)
            use_fast_data_rows(con)
            cursor = session.cursor()
            cursor.execute(f"DECLARE {cursor_name} CURSOR FOR\n{query.sql}\n", query.params)
            statement = f"FETCH FORWARD {int(fetch_size)} FROM {cursor_name}"
            columns: list[_Column] | None = None
            while not out.stopped.is_set():
                cursor.execute(statement)
                rows = cursor.fetchall()
                if columns is None:
                    columns = _columns(cursor, raw_oids)
                got = len(rows)
                if rows:
                    batch = rows_to_batch(columns, rows)
                    del rows
                    if not out.put_all(rechunker.push(batch)):
                        return
                if got < fetch_size:
                    break
            if out.stopped.is_set():
                return
            cursor.execute(f"CLOSE {cursor_name}")
            con.rollback()  # read only: nothing to commit
            out.put_all(rechunker.flush())
        except Exception as exc:
            if out.stopped.is_set():
                return  # interrupted on purpose: nobody reads the error
            error = translate(exc, self.where)
            if error is exc:
                raise
            raise error from exc
        finally:
            session.close()

    def fetch_slices(self, queries: list[DayQuery], batch_rows: int,
                     source: SourceInfo | None = None) -> AsyncIterator[pa.RecordBatch] | None:
        """With the connectorx engine, a source's K slices are read by connectorx itself: K
        queries on K connections, one Rust thread each, in one child process. The driver engine
        leaves them to the kernel's worker processes."""
        if engine(self.config) != "connectorx":
            return None
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        return self._fetch_cx(list(queries), batch_rows)

    async def _fetch_cx(self, queries: list[DayQuery], batch_rows: int) -> AsyncIterator[pa.RecordBatch]:
        state: dict[str, Any] = {}
        stream = ThreadStream(lambda out: cx.produce(self, queries, batch_rows, out, state), depth=1,
                              interrupt=lambda: cx.interrupt(state), name=f"redshift-cx-{self.name}")
        started = time.monotonic()
        yielded = 0
        async with stream:
            async for batch in stream:
                yielded += batch.num_rows
                yield batch
        log.debug("fetch.done", connection=self.name, engine="connectorx", rows=yielded,
                  seconds=round(time.monotonic() - started, 3))

    async def close(self) -> None:
        """Nothing to release: every call closes its own session."""

