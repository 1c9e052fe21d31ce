"""The Snowflake connector (type `snowflake`), on snowflake-connector-python (`pip install
'ingestd[snowflake]'`; the driver is imported on first use, so the daemon runs without it).

`sample.toml` beside this module is the documented configuration: every key, its default, what
it does.

Sessions. Each source gets its own Snowflake sessions, opened on first use and kept for the next
call (a session idle for 30 minutes is closed at the next call instead, and all are closed when
the daemon stops). Their QUERY_TAG names ingestd, the connection and the source as JSON
(`{"app":"ingestd","connection":"sf","source":"orders"}`), so QUERY_HISTORY shows what ingestd
ran for whom; their TIMEZONE is the NTZ zone (`timestamp_ntz_zone`). A session that Snowflake
expired (4 hours idle) is replaced by a new login without failing the call.

Parameters. The connection uses the driver's `qmark` style, which binds values on the server:
`{day}` is a DATE; `{start}` and `{end}` are TIMESTAMP_NTZ wall-clock times in the NTZ zone,
so they compare right with TIMESTAMP_NTZ columns holding that zone's times and, through the
session TIMEZONE, with TIMESTAMP_LTZ and TIMESTAMP_TZ columns. A query without placeholders is
filtered on its mapped column by its bare name (Snowflake folds it to upper case, matching the
lower-cased result names); with `lowercase_columns = false` the name is quoted as given.

Streaming. A query runs asynchronously in Snowflake (`execute_async`) and a worker thread polls
it, so cancelling a load aborts the query in Snowflake instead of leaving it to run. Rows arrive
through `fetch_arrow_batches()` in the chunks Snowflake chose (a few rows to millions); the
worker re-chunks them to exactly `batch_rows` rows (the last batch of a day is smaller) and hands
them to the event loop two batches ahead at most (an `ingestd.ThreadStream`). Memory
holds at most the driver's prefetched chunks, the chunk being cut and the queued batches, never
the whole day. Closing the stream stops the worker and aborts a query still running.

Types. NUMBER(p,0) arrives as int64, NUMBER(p,s) as decimal128(p,s), FLOAT as float64, BOOLEAN,
VARCHAR as string, DATE as date32; TIMESTAMP_NTZ values are read as wall-clock times in the NTZ
zone and, like TIMESTAMP_LTZ and TIMESTAMP_TZ, arrive as timestamp[us, UTC] (the sink's
resolution); VARIANT, OBJECT and ARRAY arrive as JSON text (a `metadata_json` column can be an
OBJECT).

Probe. `SELECT COUNT(*), HASH_AGG(*) FROM (<day query>) q`: HASH_AGG ignores row order and sees
a changed value (NULL included) at equal count; the fingerprint is its 64-bit value in hex.

Errors carry Snowflake's code (`errno (sqlstate)`, or the HTTP status) and a plain sentence:
network failures, HTTP 5xx and 429, an expired session, a suspended warehouse, a cancelled
statement and internal errors are transient (the kernel retries); bad credentials, a role not
granted, a missing or unusable warehouse, a table that does not exist or is not granted, SQL
that does not compile, values that do not convert and a statement timeout are permanent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pyarrow as pa
import pyarrow.compute as pc
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
    Secret,
    SourceInfo,
    ThreadStream,
    TransientError,
    pem_lines,
    rechunk,
)

log = structlog.get_logger("ingestd.snowflake")
T = TypeVar("T")

__all__ = ["SnowflakeConfig", "SnowflakeConnector", "normalize", "translate"]

INSTALL_HINT = "pip install 'ingestd[snowflake]'"
QUEUE_DEPTH = 2
IDLE_SECONDS = 1800.0
STOP_WAIT_SECONDS = 10.0
RESERVED_PARAMETERS = {"QUERY_TAG", "TIMEZONE"}


# -- configuration ----------------------------------------------------------------------------

@dataclass
class SnowflakeConfig:
    account: str
    user: str | None = None
    password: Secret | None = None
    private_key_file: Path | None = None
    private_key_passphrase: Secret | None = None
    token: Secret | None = None
    role: str | None = None
    warehouse: str | None = None
    database: str | None = None
    schema: str | None = None
    fingerprint: bool = True
    timestamp_ntz_zone: str = "source"
    lowercase_columns: bool = True
    login_timeout_seconds: int = 60
    network_timeout_seconds: int | None = None
    statement_timeout_seconds: int | None = None
    prefetch_threads: int = 4
    session_parameters: dict[str, Any] = field(default_factory=dict)
    host: str | None = None
    port: int = 443
    protocol: Literal["https", "http"] = "https"

    def validate(self) -> None:
        account = re.sub(r"^[a-z]+://", "", self.account.strip(), flags=re.I).rstrip("/")
        account = re.sub(r"\.snowflakecomputing\.(com|cn)$", "", account, flags=re.I)
        if not account or not re.fullmatch(r"[A-Za-z0-9_.-]+", account):
            raise ConfigError("account", f"expected an account identifier such as \"myorg-myaccount\" or "
                                         f"\"xy12345.eu-west-1\", got {self.account!r}")
        self.account = account
        methods = [k for k in ("password", "private_key_file", "token") if getattr(self, k) is not None]
        if len(methods) != 1:
            said = f"got {', '.join(methods)}" if methods else "got none"
            raise ConfigError("", "give exactly one way to log in: password, private_key_file or token "
                                  f"(each as KEY, KEY_env or KEY_file; {said})")
        if self.private_key_passphrase is not None and self.private_key_file is None:
            raise ConfigError("private_key_passphrase", "only with private_key_file")
        if self.token is None and not self.user:
            raise ConfigError("user", "required with a password or a private key")
        if self.timestamp_ntz_zone != "source":
            try:
                ZoneInfo(self.timestamp_ntz_zone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigError("timestamp_ntz_zone", f"expected \"source\" or an IANA time zone such as "
                                                        f"\"UTC\", got {self.timestamp_ntz_zone!r}") from None
        for key in ("login_timeout_seconds", "network_timeout_seconds", "statement_timeout_seconds",
                    "prefetch_threads"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(key, "must be at least 1")
        if not 0 < self.port < 65536:
            raise ConfigError("port", "must be between 1 and 65535")
        reserved = sorted(k for k in self.session_parameters if k.upper() in RESERVED_PARAMETERS)
        if reserved:
            raise ConfigError(f"session_parameters.{reserved[0]}", "set by ingestd: QUERY_TAG names the source, "
                                                                   "TIMEZONE comes from timestamp_ntz_zone")


# -- errors -----------------------------------------------------------------------------------

LOGIN_REFUSED = {
    "390100": "Snowflake refused the login of user {user}: the user name or password is wrong",
    "390144": "Snowflake refused the key-pair login of user {user}: the private key does not match the public "
              "key set on the user (ALTER USER ... SET RSA_PUBLIC_KEY), or this host's clock is off",
    "390303": "Snowflake refused the OAuth token: it is not valid; give a fresh token",
    "390318": "Snowflake refused the OAuth token: it has expired; give a fresh token",
    "390189": "role {role} is not granted to user {user} (GRANT ROLE {role} TO USER {user})",
    "390201": "the warehouse, database or schema of the connection does not exist, or role {role} may not use "
              "it",
}
SESSION_EXPIRED = {"390104", "390111", "390112", "390113", "390114", "390115", "390110"}
TRANSIENT_DRIVER = {"250001", "250002", "250003", "250005", "251011", "252010", "252013"}
SQL_ERRORS = {
    "000606": (PermanentError, "no warehouse is in use: set `warehouse` in the connection, and give role {role} "
                               "USAGE on it"),
    "000608": (TransientError, "warehouse {warehouse} is suspended (AUTO_RESUME is off); it will be retried"),
    "000604": (TransientError, "the query was cancelled in Snowflake; it will be retried"),
    "000630": (PermanentError, "the query ran longer than the statement timeout"),
    "002003": (PermanentError, "the query names a table, view or other object that does not exist, or that role "
                               "{role} may not read (it needs USAGE on the database and schema, SELECT on the table)"),
    "002043": (PermanentError, "an object the query names does not exist, or role {role} may not use it"),
    "000904": (PermanentError, "the query names a column that does not exist"),
    "001003": (PermanentError, "the query is not valid Snowflake SQL"),
    "003001": (PermanentError, "role {role} lacks a privilege the query needs"),
}
HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b|^(\d{3}) [A-Z]")
PREFIX = re.compile(r"^(?:\d{6}(?: \([0-9A-Za-z/]+\))?: )?(?:[0-9a-f-]{36}: )?")
LOGIN_PREFIX = re.compile(r"^Failed to connect to DB: \S+\. ")


def _errno(exc: BaseException) -> str | None:
    if not type(exc).__module__.startswith("snowflake."):
        return None  # an OSError's errno is not Snowflake's
    errno = getattr(exc, "errno", None)
    return f"{errno:06d}" if isinstance(errno, int) and errno > 0 else None


def _sqlstate(exc: BaseException) -> str | None:
    if not type(exc).__module__.startswith("snowflake."):
        return None
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) and state and state != "n/a" else None


def _detail(exc: BaseException) -> str:
    """Snowflake's own words, without the driver's `errno (sqlstate):` and login prefixes."""
    raw = getattr(exc, "raw_msg", None) or getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    text = " ".join(str(raw).split())
    text = LOGIN_PREFIX.sub("", PREFIX.sub("", text))
    return text[:500]


def _classes(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _http_status(exc: BaseException) -> int | None:
    if not _classes(exc) & {"HttpError", "InternalServerError", "ServiceUnavailableError", "GatewayTimeoutError",
                            "BadGatewayError", "ForbiddenError", "BadRequest", "RequestTimeoutError",
                            "MethodNotAllowed", "TooManyRequests", "OtherHTTPRetryableError"}:
        return None
    match = HTTP_STATUS.search(_detail(exc))
    if match:
        return int(match.group(1) or match.group(2))
    errno = getattr(exc, "errno", 0) or 0
    return errno % 1000 if errno >= 290000 else None


def session_expired(exc: BaseException) -> bool:
    """Snowflake no longer knows the session: a new login is the cure."""
    return _errno(exc) in SESSION_EXPIRED or _http_status(exc) == 401


def translate(exc: BaseException, config: SnowflakeConfig | None = None) -> BaseException:
    """Sort a driver error into the kernel's transient or permanent class, with Snowflake's code
    and a plain sentence. Errors that are not the driver's or the network's come back unchanged."""
    if isinstance(exc, ConnectorError):
        return exc
    names = {"user": (config.user if config else None) or "?", "role": (config and config.role) or "(default)",
             "warehouse": (config and config.warehouse) or "(default)"}
    errno, state, detail = _errno(exc), _sqlstate(exc), _detail(exc)
    code = f"{errno} ({state})" if errno and state else errno
    words = lambda text: text.format(**names)  # noqa: E731
    status = _http_status(exc)
    if status is not None:
        code = f"HTTP {status}"
        if status == 401:
            return TransientError(f"the Snowflake session expired; a new one is opened. Snowflake says: {detail}",
                                  code=code)
        if status >= 500 or status in (408, 429):
            return TransientError(f"Snowflake answered HTTP {status}; it will be retried. Snowflake says: {detail}",
                                  code=code)
        hint = {403: " (a network policy may block this host)", 404: " (check account and host)"}.get(status, "")
        return PermanentError(f"Snowflake refused the request with HTTP {status}{hint}. Snowflake says: {detail}",
                              code=code)
    if errno in LOGIN_REFUSED or (errno or "").startswith("3943"):
        sentence = LOGIN_REFUSED.get(errno or "", LOGIN_REFUSED["390144"])
        return PermanentError(f"{words(sentence)}. Snowflake says: {detail}", code=code)
    if errno in SESSION_EXPIRED:
        return TransientError(f"the Snowflake session expired; a new one is opened. Snowflake says: {detail}",
                              code=code)
    if errno in SQL_ERRORS:
        cls, sentence = SQL_ERRORS[errno]
        return cls(f"{words(sentence)}. Snowflake says: {detail}", code=code)
    if errno in TRANSIENT_DRIVER or (errno or "").startswith("254"):
        where = (config.host if config and config.host else
                 f"{config.account}.snowflakecomputing.com" if config else "Snowflake")
        return TransientError(f"cannot reach Snowflake at {where}: {detail}", code=code)
    if errno and errno.startswith("39") and "DatabaseError" in _classes(exc):
        return PermanentError(f"Snowflake refused the login of user {names['user']}. Snowflake says: {detail}",
                              code=code)
    if state:
        if state.startswith("08") or state.startswith("57") or state.startswith("XX") or state.startswith("40"):
            return TransientError(f"Snowflake could not run the query right now. Snowflake says: {detail}",
                                  code=code)
        if state.startswith("42"):
            return PermanentError(f"the query does not compile. Snowflake says: {detail}", code=code)
        if state.startswith("22"):
            return PermanentError(f"a value could not be converted to the type the query needs. Snowflake says: "
                                  f"{detail}", code=code)
        if state.startswith("28"):
            return PermanentError(f"Snowflake refused the login of user {names['user']}. Snowflake says: {detail}",
                                  code=code)
    if _classes(exc) & {"OperationalError", "InterfaceError", "InternalError"} or isinstance(exc, OSError):
        return TransientError(f"the Snowflake call failed and will be retried: {detail}", code=code)
    if type(exc).__module__.startswith("snowflake."):
        return PermanentError(f"Snowflake refused the query. Snowflake says: {detail}", code=code)
    return exc


def _driver():
    try:
        import snowflake.connector  # noqa: F401  (the optional driver)
    except ImportError as exc:
        raise PermanentError(f"the snowflake connector needs snowflake-connector-python: {INSTALL_HINT} "
                             f"({exc})") from None
    return snowflake.connector


def identifier(name: str) -> str:
    """A warehouse (or other object) name as SQL: bare when Snowflake folds it anyway, kept when
    already quoted, else quoted."""
    name = name.strip()
    if re.fullmatch(r'"(?:[^"]|"")+"', name) or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


# -- Arrow ------------------------------------------------------------------------------------

def normalize(table: pa.Table | pa.RecordBatch, ntz_zone: str, lowercase: bool = True) -> pa.Table:
    """One chunk of Snowflake's result in ingestd's conventions: integers as int64, every
    timestamp as timestamp[us, UTC] (TIMESTAMP_NTZ read as wall-clock time in `ntz_zone`),
    no field metadata, all-upper-case names in lower case."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    taken = set(table.schema.names)
    columns, fields = [], []
    for f, column in zip(table.schema, table.columns, strict=True):
        typ = f.type
        if pa.types.is_integer(typ) and typ != pa.int64():
            column, typ = column.cast(pa.int64()), pa.int64()
        elif pa.types.is_timestamp(typ):
            if typ.tz is None:
                column = pc.assume_timezone(column, timezone=ntz_zone, ambiguous="earliest", nonexistent="earliest")
            typ = pa.timestamp("us", tz="UTC")
            column = column.cast(typ, safe=False)
        name = f.name
        if lowercase and name != name.lower() and name == name.upper() and name.lower() not in taken:
            name = name.lower()
        columns.append(column)
        fields.append(pa.field(name, typ, nullable=f.nullable))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


# -- sessions ---------------------------------------------------------------------------------

class _Stopped(Exception):
    """The caller went away (cancelled, or closed the stream): stop working, quietly."""


@dataclass(eq=False)
class _Session:
    con: Any
    key: tuple[str | None, str]
    reused: bool = False
    idle_since: float = field(default_factory=time.monotonic)


class _Pool:
    """Open Snowflake sessions by (source, time zone), each used by one call at a time."""

    def __init__(self, connect: Callable[[tuple[str | None, str]], Any]):
        self._connect = connect
        self._lock = threading.Lock()
        self._idle: dict[tuple[str | None, str], list[_Session]] = {}
        self._closed = False

    def take(self, key: tuple[str | None, str]) -> _Session:
        """An idle session of `key`, or a new login. Sessions idle too long (of any key) are
        closed on the way."""
        stale: list[_Session] = []
        session = None
        now = time.monotonic()
        with self._lock:
            for idle_key, idle in self._idle.items():
                stale += [s for s in idle if now - s.idle_since > IDLE_SECONDS]
                idle[:] = [s for s in idle if now - s.idle_since <= IDLE_SECONDS]
                if idle_key == key and idle:
                    session = idle.pop()
                    session.reused = True
        for old in stale:
            _quiet_close(old.con)
        return session or _Session(self._connect(key), key)

    def give(self, session: _Session) -> None:
        session.idle_since = time.monotonic()
        with self._lock:
            if not self._closed:
                self._idle.setdefault(session.key, []).append(session)
                return
        _quiet_close(session.con)

    def discard(self, session: _Session) -> None:
        _quiet_close(session.con)

    def close(self) -> None:
        """Close the idle sessions; from now on a session is closed when its call ends."""
        with self._lock:
            self._closed = True
            sessions = [s for idle in self._idle.values() for s in idle]
            self._idle.clear()
        for s in sessions:
            _quiet_close(s.con)


def _quiet_close(con: Any) -> None:
    with contextlib.suppress(Exception):
        con.close()


# -- the connector ----------------------------------------------------------------------------

class SnowflakeConnector(Connector):
    type_name = "snowflake"
    config_model = SnowflakeConfig
    capabilities = Capabilities(fingerprint=True, paramstyle="qmark", quote='"', row_limit=True)

    @classmethod
    def capabilities_for(cls, config: SnowflakeConfig) -> Capabilities:
        return Capabilities(fingerprint=config.fingerprint, paramstyle="qmark",
                            quote="" if config.lowercase_columns else '"', row_limit=True)

    @classmethod
    def secret_values(cls, config: SnowflakeConfig) -> list[str]:
        """The private key file's PEM body lines (an unreadable file is `check`'s to report)."""
        if config.private_key_file is None:
            return []
        try:
            text = Path(config.private_key_file).read_text(errors="replace")
        except OSError:
            return []
        return pem_lines(text)

    def __init__(self, config: SnowflakeConfig, *, name: str):
        super().__init__(config, name=name)
        self._pool = _Pool(self._connect)
        self._private_key: bytes | None = None

    # -- sessions ---------------------------------------------------------------------------

    def _zone(self, query: DayQuery | None) -> str:
        if self.config.timestamp_ntz_zone != "source":
            return self.config.timestamp_ntz_zone
        return query.window.timezone if query is not None else "UTC"

    def _key(self, query: DayQuery | None, source: SourceInfo | None) -> tuple[str | None, str]:
        return (source.name if source else None, self._zone(query))

    def query_tag(self, source: str | None) -> str:
        tag = {"app": "ingestd", "connection": self.name, **({"source": source} if source else {})}
        return json.dumps(tag, separators=(",", ":"))

    def _key_bytes(self) -> bytes:
        """The private key file, decrypted, as DER PKCS#8 (what the driver takes)."""
        if self._private_key is None:
            from cryptography.hazmat.primitives import serialization
            path = Path(self.config.private_key_file)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise PermanentError(f"cannot read private_key_file {path}: {exc.strerror or exc}") from None
            secret = self.config.private_key_passphrase
            passphrase = secret.reveal().encode() if secret is not None else None
            load = serialization.load_pem_private_key if b"-----BEGIN" in data else \
                serialization.load_der_private_key
            try:
                key = load(data, password=passphrase)
            except TypeError as exc:
                hint = ("the key is encrypted: give private_key_passphrase (or _env, _file)" if passphrase is None
                        else "the key is not encrypted: remove private_key_passphrase")
                raise PermanentError(f"cannot load private_key_file {path}: {hint} ({exc})") from None
            except Exception as exc:  # cryptography raises ValueError (and others) on bad input
                why = "wrong private_key_passphrase, or not a private key" if passphrase else "not a private key"
                raise PermanentError(f"cannot load private_key_file {path}: {why} "
                                     f"({type(exc).__name__}: {exc})") from None
            self._private_key = key.private_bytes(encoding=serialization.Encoding.DER,
                                                  format=serialization.PrivateFormat.PKCS8,
                                                  encryption_algorithm=serialization.NoEncryption())
        return self._private_key

    def connect_kwargs(self, key: tuple[str | None, str]) -> dict[str, Any]:
        """What `snowflake.connector.connect` gets for a session of `key` (secrets included)."""
        cfg = self.config
        source, zone = key
        params: dict[str, Any] = {**cfg.session_parameters, "QUERY_TAG": self.query_tag(source), "TIMEZONE": zone}
        if cfg.statement_timeout_seconds:
            params["STATEMENT_TIMEOUT_IN_SECONDS"] = cfg.statement_timeout_seconds
        kwargs: dict[str, Any] = {
            "account": cfg.account, "user": cfg.user, "role": cfg.role, "warehouse": cfg.warehouse,
            "database": cfg.database, "schema": cfg.schema, "paramstyle": "qmark", "application": "ingestd",
            "login_timeout": cfg.login_timeout_seconds, "network_timeout": cfg.network_timeout_seconds,
            "client_prefetch_threads": cfg.prefetch_threads, "client_session_keep_alive": False,
            "session_parameters": params,
        }
        if cfg.host:
            kwargs.update(host=cfg.host, port=cfg.port, protocol=cfg.protocol)
        elif cfg.protocol != "https" or cfg.port != 443:
            kwargs.update(port=cfg.port, protocol=cfg.protocol)
        if cfg.password is not None:
            kwargs["password"] = cfg.password.reveal()
        elif cfg.private_key_file is not None:
            kwargs.update(authenticator="SNOWFLAKE_JWT", private_key=self._key_bytes())
        else:
            kwargs.update(authenticator="oauth", token=cfg.token.reveal())
        return {k: v for k, v in kwargs.items() if v is not None}

    def _connect(self, key: tuple[str | None, str]) -> Any:
        driver = _driver()
        kwargs = self.connect_kwargs(key)
        started = time.monotonic()
        con = driver.connect(**kwargs)
        log.debug("snowflake.session_opened", connection=self.name, source=key[0], timezone=key[1],
                  seconds=round(time.monotonic() - started, 3))
        return con

    # -- blocking work (worker threads) -----------------------------------------------------

    def _run(self, session: _Session, sql: str, params: list[Any] | None, stop: threading.Event) -> Any:
        """Run one query asynchronously in Snowflake and wait for it; abort it when `stop` is set.
        Returns the cursor holding its result."""
        if stop.is_set():
            raise _Stopped
        con = session.con
        cur = con.cursor()
        try:
            cur.execute_async(sql, params or None)
            qid = cur.sfqid
            delay = 0.02
            while True:
                status = con.get_query_status_throw_if_error(qid)
                if not con.is_still_running(status):
                    break
                if stop.wait(delay):
                    with contextlib.suppress(Exception):
                        cur.abort_query(qid)
                    log.info("snowflake.query_aborted", connection=self.name, query_id=qid)
                    raise _Stopped
                delay = min(delay * 2, 1.0)
            if stop.is_set():
                raise _Stopped
            cur.get_results_from_sfqid(qid)
            return cur
        except BaseException:
            with contextlib.suppress(Exception):
                cur.close()
            raise

    def _with_session(self, key: tuple[str | None, str], work: Callable[[_Session], T]) -> T:
        """Run `work` on a pooled session; a session Snowflake expired is replaced once by a new
        login. Errors come out translated; a session that failed transiently is not reused."""
        for attempt in (1, 2):
            try:
                session = self._pool.take(key)
            except Exception as exc:
                error = translate(exc, self.config)
                if error is exc:
                    raise
                raise error from exc
            try:
                result = work(session)
            except _Stopped:
                self._pool.give(session)
                raise
            except Exception as exc:
                if attempt == 1 and session.reused and session_expired(exc):
                    log.info("snowflake.session_expired", connection=self.name, source=key[0])
                    self._pool.discard(session)
                    continue
                error = translate(exc, self.config)
                if isinstance(error, TransientError) or error is exc:
                    self._pool.discard(session)
                else:
                    self._pool.give(session)
                if error is exc:
                    raise
                raise error from exc
            self._pool.give(session)
            return result
        raise AssertionError("unreachable")

    def _bind(self, query: DayQuery) -> list[Any]:
        """The query's values as Snowflake gets them: {start}/{end} as wall-clock times in the NTZ
        zone (the session's TIMEZONE), other values as they are."""
        zone = ZoneInfo(self._zone(query))
        params = list(query.params.values()) if isinstance(query.params, dict) else list(query.params)
        out = []
        for name, value in zip(query.names or [None] * len(params), params, strict=True):
            if name in ("start", "end") and isinstance(value, dt.datetime):
                aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
                value = aware.astimezone(zone).replace(tzinfo=None)
            out.append(value)
        return out

    async def _call(self, key: tuple[str | None, str], work: Callable[[_Session, threading.Event], T]) -> T:
        """Run `work` in a worker thread; a cancelled caller stops it (aborting its query) and
        waits a little for that before the cancellation goes on."""
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self._with_session, key, lambda s: work(s, stop))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.wait({future}, timeout=STOP_WAIT_SECONDS)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: a stopped call's error is nobody's business
            raise
        except _Stopped:
            raise asyncio.CancelledError from None

    # -- the connector API ------------------------------------------------------------------

    async def check(self, query: DayQuery | None = None) -> None:
        """Log in (bad credentials or a role not granted fail here), use the warehouse (missing
        or not granted), and compile the day query (tables missing or not granted)."""
        cfg = self.config

        def work(session: _Session, stop: threading.Event) -> None:
            if cfg.warehouse:
                cur = session.con.cursor()
                try:
                    cur.execute(f"USE WAREHOUSE {identifier(cfg.warehouse)}")
                except Exception as exc:
                    if _errno(exc) in ("002043", "002003", "000606"):
                        raise PermanentError(
                            f"warehouse {cfg.warehouse} does not exist, or role {cfg.role or '(default)'} has no "
                            f"USAGE on it. Snowflake says: {_detail(exc)}",
                            code=f"{_errno(exc)} ({_sqlstate(exc)})" if _sqlstate(exc) else _errno(exc)) from exc
                    raise
                finally:
                    cur.close()
            sql, params = "SELECT 1", None
            if query is not None:
                sql, params = f"SELECT * FROM ({query.sql}) q LIMIT 0", self._bind(query)
            self._run(session, sql, params, stop).close()

        await self._call(self._key(query, None), work)

    async def probe(self, query: DayQuery, source: SourceInfo | None = None) -> ProbeResult:
        fingerprint = self.capabilities.fingerprint
        sql = f"SELECT COUNT(*){', HASH_AGG(*)' if fingerprint else ''} FROM ({query.sql}) q"
        params = self._bind(query)

        def work(session: _Session, stop: threading.Event) -> tuple:
            cur = self._run(session, sql, params, stop)
            try:
                return cur.fetchone()
            finally:
                cur.close()

        row = await self._call(self._key(query, source), work)
        rows = int(row[0])
        if not fingerprint:
            return ProbeResult(rows)
        return ProbeResult(rows, format(int(row[1] or 0) & 0xFFFF_FFFF_FFFF_FFFF, "016x"))

    async def fetch(self, query: DayQuery, batch_rows: int,
                    source: SourceInfo | None = None) -> AsyncIterator[pa.RecordBatch]:
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        key = self._key(query, source)
        zone = self._zone(query)
        params = self._bind(query)

        def produce(session: _Session, out: Outlet) -> None:
            cur = self._run(session, query.sql, params, out.stopped)
            sent = False
            try:
                try:
                    tables = cur.fetch_arrow_batches(force_microsecond_precision=True)
                except TypeError:  # a driver without the option: normalize() casts to microseconds
                    tables = cur.fetch_arrow_batches()
                try:
                    for batch in rechunk((normalize(t, zone, self.config.lowercase_columns) for t in tables),
                                         batch_rows):
                        if not out.put(batch):
                            raise _Stopped
                        sent = True
                except _Stopped:
                    raise
                except Exception as exc:
                    if not sent:
                        raise
                    # rows went out already: no silent retry on a new session, the kernel retries the load
                    error = translate(exc, self.config)
                    if error is exc:
                        raise
                    raise error from exc
                finally:
                    close = getattr(tables, "close", None)
                    if close is not None:
                        with contextlib.suppress(Exception):
                            close()
            finally:
                with contextlib.suppress(Exception):
                    cur.close()

        def worker(out: Outlet) -> None:
            with contextlib.suppress(_Stopped):
                self._with_session(key, lambda session: produce(session, out))

        stream = ThreadStream(worker, depth=QUEUE_DEPTH, name=f"ingestd-snowflake-{self.name}",
                              join_seconds=STOP_WAIT_SECONDS)
        async with stream:
            async for batch in stream:
                yield batch

    async def close(self) -> None:
        """Close the idle sessions; sessions still in use are closed when their call ends."""
        await asyncio.to_thread(self._pool.close)

