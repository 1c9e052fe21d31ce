"""The Databricks connector (type `databricks`), on databricks-sql-connector's Thrift backend
(`pip install 'ingestd[databricks]'`; the driver is imported on first use, so the daemon runs
without it).

`sample.toml` beside this module is the documented configuration: every key, its default, what
it does.

Sessions. Each source gets its own Databricks sessions, opened on first use and kept for the next
call (one idle for 30 minutes is closed at the next call, all are closed when the daemon stops).
Their QUERY_TAGS name ingestd, the connection and the source (`app:ingestd,connection:dbx,
source:orders`), the driver's User-Agent ends in `(ingestd)`, and their time zone is the NTZ zone
above. A session the warehouse dropped is replaced by a new one without failing the call.

Parameters. The day is bound as native named parameters (`:day`, `:start`, `:end`), values never
enter the SQL text: `{day}` is a DATE, `{start}` and `{end}` are TIMESTAMPs (UTC instants), which
compare right with TIMESTAMP columns and, through the session time zone, with TIMESTAMP_NTZ
columns holding wall-clock times of the NTZ zone. A query without placeholders is filtered on
its mapped column quoted with backticks.

Streaming. A worker thread runs the query and reads it with `fetchmany_arrow(batch_rows)`
(cloud fetch links or inline Arrow pages, as the warehouse sends them), cuts and joins the
tables into record batches of exactly `batch_rows` rows (the last one of a day is smaller) and
hands them to the event loop two batches ahead at most (an `ingestd.ThreadStream`). Closing the
stream stops the worker and cancels a statement that is still running.

Types. TINYINT..BIGINT arrive as int64, FLOAT and DOUBLE as float64, DECIMAL(p,s) as
decimal128(p,s), BOOLEAN, STRING, DATE as date32, BINARY; TIMESTAMP as timestamp[us, UTC];
TIMESTAMP_NTZ read as wall-clock times in the NTZ zone, then timestamp[us, UTC]; ARRAY, MAP and
STRUCT as JSON text (a `metadata_json` column can be a STRUCT or MAP).

Probe. `SELECT COUNT(*), bit_xor(h), SUM(CAST(h AS DECIMAL(38,0))) FROM (SELECT
xxhash64(to_json(struct(*))) AS h FROM (<day query>) q)`: order-independent, sees a changed value
(NULL included) at equal count; the sum keeps two identical rows from cancelling out in the XOR.
The fingerprint is both, in hex.

Errors carry Databricks' error class or SQLSTATE (or the HTTP status) and a plain sentence:
HTTP 429 and 5xx (a warehouse starting, throttling), dropped connections, timeouts and a
session the warehouse dropped are transient (the kernel retries); a token or client secret
refused (401, 403), an http_path with no warehouse (404), a missing catalog, schema, table or
column, a privilege not granted (USE CATALOG, USE SCHEMA, SELECT), SQL that does not parse and
values that do not convert are permanent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import decimal
import importlib
import json
import re
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
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
    rechunk,
)

log = structlog.get_logger("ingestd.databricks")
T = TypeVar("T")

__all__ = ["DatabricksConfig", "DatabricksConnector", "M2MCredentials", "normalize", "translate"]

INSTALL_HINT = "pip install 'ingestd[databricks]'"
IDLE_SECONDS = 1800.0
STOP_WAIT_SECONDS = 10.0
MASK = 0xFFFF_FFFF_FFFF_FFFF


# -- configuration ----------------------------------------------------------------------------

@dataclass
class DatabricksConfig:
    server_hostname: str
    http_path: str
    port: int = 443
    access_token: Secret | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    credentials_provider: str | None = None
    catalog: str | None = None
    schema: str | None = None
    fingerprint: bool = True
    timestamp_ntz_zone: str = "source"
    use_cloud_fetch: bool = True
    retry_seconds: float = 120.0
    socket_timeout_seconds: float = 900.0
    session_configuration: dict[str, str] = field(default_factory=dict)
    query_tags: dict[str, str] = field(default_factory=dict)
    user_agent_entry: str = "ingestd"
    tls_ca_file: Path | None = None

    def validate(self) -> None:
        host = re.sub(r"^[a-z]+://", "", self.server_hostname.strip(), flags=re.I).split("/")[0]
        if not host or not re.fullmatch(r"[A-Za-z0-9.-]+", host):
            raise ConfigError("server_hostname", "expected a host name such as \"dbc-a1b2c3d4-e5f6.cloud.databricks"
                                                 f".com\", got {self.server_hostname!r}")
        self.server_hostname = host
        if not self.http_path.strip().strip("/"):
            raise ConfigError("http_path", "expected the SQL warehouse's or cluster's HTTP path, such as "
                                           "\"/sql/1.0/warehouses/1234567890abcdef\"")
        methods = [k for k in ("access_token", "client_id", "credentials_provider") if getattr(self, k) is not None]
        if len(methods) != 1:
            said = f"got {', '.join(methods)}" if methods else "got none"
            raise ConfigError("", "give exactly one way to log in: access_token, client_id with client_secret, or "
                                  f"credentials_provider (secrets as KEY, KEY_env or KEY_file; {said})")
        if (self.client_id is None) != (self.client_secret is None):
            raise ConfigError("client_secret" if self.client_id else "client_id",
                              "OAuth machine-to-machine needs both client_id and client_secret")
        if self.credentials_provider is not None and not re.fullmatch(r"[\w.]+:[\w.]+", self.credentials_provider):
            raise ConfigError("credentials_provider",
                              f"expected \"module:callable\", got {self.credentials_provider!r}")
        if self.timestamp_ntz_zone != "source":
            try:
                ZoneInfo(self.timestamp_ntz_zone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigError("timestamp_ntz_zone", f"expected \"source\" or an IANA time zone such as \"UTC\", "
                                                        f"got {self.timestamp_ntz_zone!r}") from None
        if not 0 < self.port < 65536:
            raise ConfigError("port", "must be between 1 and 65535")
        if not 1 <= self.retry_seconds <= 86400:
            raise ConfigError("retry_seconds", "must be between 1 and 86400 (the driver's bounds)")
        if self.socket_timeout_seconds <= 0:
            raise ConfigError("socket_timeout_seconds", "must be more than 0")
        reserved = sorted(k for k in self.session_configuration if k.upper() in ("QUERY_TAGS", "TIMEZONE")
                          or k == "spark.sql.session.timeZone")
        if reserved:
            raise ConfigError(f"session_configuration.{reserved[0]}", "set by ingestd: QUERY_TAGS names the source, "
                                                                      "the time zone comes from timestamp_ntz_zone")
        for key, value in self.query_tags.items():
            if not isinstance(value, str):
                raise ConfigError(f"query_tags.{key}", "expected a string")
        for key, value in self.session_configuration.items():
            if not isinstance(value, str):
                raise ConfigError(f"session_configuration.{key}", "expected a string")


# -- errors -----------------------------------------------------------------------------------

ERROR_CLASS = re.compile(r"\[([A-Z][A-Z0-9_]+(?:\.[A-Z0-9_]+)?)\]")
SQLSTATE = re.compile(r"SQLSTATE:\s*([0-9A-Z]{5})")
PRIVILEGE = re.compile(r"does not have ([A-Z][A-Z ]*?[A-Z])(?: privilege)? on (\w+) "
                       r"(?:['`]([^'`]+)['`]|(\S+?))(?:\.?\s|\.?$)", re.I)
SESSION_GONE = re.compile(r"Invalid (SessionHandle|OperationHandle)|session.*(expired|closed|not found)", re.I)


def _classes(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _is_driver(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("databricks.")


def _context(exc: BaseException) -> dict[str, Any]:
    ctx = getattr(exc, "context", None)
    return ctx if isinstance(ctx, dict) else {}


def _detail(exc: BaseException) -> str:
    """The warehouse's own words, one line, without the Thrift server's Java prefixes."""
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    ctx = _context(exc)
    if ctx.get("error-message"):
        text = f"{text}: {ctx['error-message']}".replace(": : ", ": ")
    text = re.sub(r"org\.apache\.hive\.service\.cli\.HiveSQLException: |Error running query: ", "", str(text))
    text = re.sub(r"\[([A-Z_.]+)\] org\.apache\.spark\.sql\.[\w.]+: (?=\[\1\])", "", text)
    text = text.split("\n== SQL ==")[0].split("\n\tat ")[0]
    return " ".join(text.split())[:500]


def session_gone(exc: BaseException) -> bool:
    """The warehouse no longer knows the session (restarted, idle too long): a new one is the cure."""
    return bool(SESSION_GONE.search(str(getattr(exc, "message", None) or exc)))


def translate(exc: BaseException, config: DatabricksConfig | None = None) -> BaseException:
    """Sort a driver (or network) error into the kernel's transient or permanent class, with
    Databricks' error class, SQLSTATE or HTTP status as its code and a plain sentence. Errors that
    are neither come back unchanged."""
    if isinstance(exc, ConnectorError):
        return exc
    names = _classes(exc)
    detail = _detail(exc)
    where = f"{config.server_hostname}:{config.port}{'/' + config.http_path.lstrip('/')}" if config else "Databricks"
    ctx = _context(exc)
    if "RequestError" in names or ctx.get("http-code") is not None:
        status = ctx.get("http-code")
        status = int(status) if isinstance(status, int) or (isinstance(status, str) and status.isdigit()) else None
        if status is None:
            original = ctx.get("original-exception")
            status = getattr(original, "status", None) if original is not None else None
        if not isinstance(status, int) or status < 400:
            status = None  # the transport's last status (a 200 before the connection dropped) says nothing
        code = f"HTTP {status}" if status else None
        if status in (401, 403):
            what = ("the access token is missing, expired or not valid" if status == 401 else
                    "the token or client secret is not valid, or the principal may not use this SQL warehouse "
                    "(it needs CAN USE on it)")
            return PermanentError(f"Databricks refused the credentials (HTTP {status}): {what}. Databricks says: "
                                  f"{detail}", code=code)
        if status == 404:
            return PermanentError(f"no SQL warehouse or cluster answers at {where} (HTTP 404): check "
                                  f"server_hostname and http_path (a deleted warehouse answers this too). "
                                  f"Databricks says: {detail}", code=code)
        if status in (429, 503):
            return TransientError(f"the SQL warehouse is starting or busy (HTTP {status}: a stopped warehouse starts "
                                  f"on the first request, which takes a few minutes); it will be retried. "
                                  f"Databricks says: {detail}", code=code)
        if status is not None and status >= 500:
            return TransientError(f"Databricks answered HTTP {status}; it will be retried. Databricks says: {detail}",
                                  code=code)
        if status is not None:
            return PermanentError(f"Databricks refused the request with HTTP {status}. Databricks says: {detail}",
                                  code=code)
        original = ctx.get("original-exception")
        if "MaxRetryDurationError" in names | (_classes(original) if isinstance(original, BaseException) else set()) \
                or "would exceed Retry policy" in detail:
            return TransientError(f"the SQL warehouse at {where} did not answer within retry_seconds: it may be "
                                  f"starting or busy (HTTP 429/503), or unreachable; it will be retried. "
                                  f"Databricks says: {detail}")
        return TransientError(f"cannot reach Databricks at {where}: {detail}", code=code)
    if _is_driver(exc) and ("DatabaseError" in names or "ServerOperationError" in names):
        found = ERROR_CLASS.search(detail)
        error_class = found.group(1) if found else None
        state_match = SQLSTATE.search(detail)
        state = state_match.group(1) if state_match else None
        code = " ".join(x for x in (error_class, f"({state})" if state and error_class else state) if x) or None
        klass = error_class or ""
        if session_gone(exc):
            return TransientError(f"the Databricks session is gone; a new one is opened. Databricks says: {detail}",
                                  code=code)
        if klass.startswith(("INSUFFICIENT_PERMISSIONS", "PERMISSION_DENIED")) or state == "42501":
            grant = PRIVILEGE.search(detail)
            if grant:
                privilege, kind, obj = grant.group(1).upper(), grant.group(2).upper(), grant.group(3) or grant.group(4)
                return PermanentError(f"the principal lacks {privilege} on {kind.lower()} {obj} (GRANT {privilege} "
                                      f"ON {kind} {obj} TO the principal). Databricks says: {detail}", code=code)
            return PermanentError(f"the principal lacks a privilege the query needs (USE CATALOG, USE SCHEMA or "
                                  f"SELECT). Databricks says: {detail}", code=code)
        if klass.startswith(("NO_SUCH_CATALOG", "CATALOG_NOT_FOUND")):
            return PermanentError(f"the catalog does not exist, or the principal has no USE CATALOG on it. "
                                  f"Databricks says: {detail}", code=code)
        if klass.startswith(("SCHEMA_NOT_FOUND", "NO_SUCH_SCHEMA")):
            return PermanentError(f"the schema does not exist, or the principal has no USE SCHEMA on it. "
                                  f"Databricks says: {detail}", code=code)
        if klass.startswith("TABLE_OR_VIEW_NOT_FOUND") or state == "42P01":
            return PermanentError(f"the query names a table or view that does not exist, or that the principal may "
                                  f"not see (it needs USE CATALOG, USE SCHEMA and SELECT). Databricks says: {detail}",
                                  code=code)
        if klass.startswith("UNRESOLVED_COLUMN") or state == "42703":
            return PermanentError(f"the query names a column that does not exist. Databricks says: {detail}",
                                  code=code)
        if state and state.startswith(("08", "40", "53", "57", "XX")):
            return TransientError(f"Databricks could not run the query right now; it will be retried. "
                                  f"Databricks says: {detail}", code=code)
        if klass.startswith("PARSE_SYNTAX_ERROR") or (state or "").startswith("42"):
            return PermanentError(f"the query is not valid Databricks SQL. Databricks says: {detail}", code=code)
        if (state or "").startswith("22"):
            return PermanentError(f"a value could not be converted to the type the query needs. Databricks says: "
                                  f"{detail}", code=code)
        if "OperationalError" in names and not error_class and not state:
            return TransientError(f"the Databricks call failed and will be retried: {detail}", code=code)
        return PermanentError(f"Databricks refused the query. Databricks says: {detail}", code=code)
    if "OperationalError" in names or isinstance(exc, (OSError, TimeoutError)) or \
            type(exc).__module__.startswith(("urllib3", "requests", "thrift")):
        return TransientError(f"cannot reach Databricks at {where}: {detail}")
    if _is_driver(exc):
        return PermanentError(f"the Databricks driver refused the call: {detail}")
    return exc


def _driver() -> Any:
    try:
        from databricks import sql  # the optional driver
    except ImportError as exc:
        raise PermanentError(f"the databricks connector needs databricks-sql-connector: {INSTALL_HINT} "
                             f"({exc})") from None
    return sql


# -- OAuth machine-to-machine -----------------------------------------------------------------

class M2MCredentials:
    """The driver's `credentials_provider` for OAuth M2M: client credentials at the workspace's
    `/oidc/v1/token` (scope all-apis), the token renewed a minute before it expires."""

    def __init__(self, host: str, port: int, client_id: str, client_secret: Secret, ca_file: Path | None = None):
        self.url = f"https://{host}{'' if port == 443 else f':{port}'}/oidc/v1/token"
        self.client_id = client_id
        self._secret = client_secret
        self._ca_file = ca_file
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires = 0.0

    def auth_type(self) -> str:
        return "oauth-m2m"

    def token(self) -> str:
        with self._lock:
            if self._token is None or time.monotonic() > self._expires - 60:
                body = urllib.parse.urlencode({"grant_type": "client_credentials", "scope": "all-apis"}).encode()
                basic = base64.b64encode(f"{self.client_id}:{self._secret.reveal()}".encode()).decode()
                request = urllib.request.Request(self.url, data=body, method="POST", headers={
                    "Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"})
                context = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
                try:
                    with urllib.request.urlopen(request, timeout=60, context=context) as resp:
                        answer = json.loads(resp.read())
                except urllib.error.HTTPError as exc:
                    if exc.code in (400, 401, 403):
                        raise PermanentError(f"Databricks refused the OAuth client {self.client_id} at {self.url} "
                                             f"(HTTP {exc.code}): the client id or secret is wrong, or the service "
                                             "principal has no OAuth secret", code=f"HTTP {exc.code}") from None
                    raise TransientError(f"the OAuth token endpoint {self.url} answered HTTP {exc.code}",
                                         code=f"HTTP {exc.code}") from None
                except (OSError, ValueError) as exc:
                    raise TransientError(f"cannot get an OAuth token from {self.url}: {exc}") from None
                self._token = str(answer["access_token"])
                self._expires = time.monotonic() + float(answer.get("expires_in", 3600))
            return self._token

    def __call__(self, *args: Any, **kwargs: Any) -> Callable[[], dict[str, str]]:
        return lambda: {"Authorization": f"Bearer {self.token()}"}


# -- Arrow ------------------------------------------------------------------------------------

def _json_value(value: Any) -> Any:
    if isinstance(value, list) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return {str(k): _json_value(v) for k, v in value}  # a MAP as Arrow gives it: (key, value) pairs
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (dt.date, dt.datetime, dt.time, decimal.Decimal)):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def normalize(table: pa.Table | pa.RecordBatch, ntz_zone: str) -> pa.Table:
    """One chunk of a Databricks result in ingestd's conventions: integers as int64, floats as
    float64, every timestamp as timestamp[us, UTC] (TIMESTAMP_NTZ read as wall-clock time in
    `ntz_zone`), nested ARRAY/MAP/STRUCT values as JSON text, no field metadata."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    columns, fields = [], []
    for f, column in zip(table.schema, table.columns, strict=True):
        typ = f.type
        if pa.types.is_integer(typ) and typ != pa.int64():
            column, typ = column.cast(pa.int64()), pa.int64()
        elif pa.types.is_floating(typ) and typ != pa.float64():
            column, typ = column.cast(pa.float64()), pa.float64()
        elif pa.types.is_large_string(typ):
            column, typ = column.cast(pa.string()), pa.string()
        elif pa.types.is_timestamp(typ):
            if typ.tz is None:
                column = pc.assume_timezone(column, timezone=ntz_zone, ambiguous="earliest", nonexistent="earliest")
            typ = pa.timestamp("us", tz="UTC")
            column = column.cast(typ, safe=False)
        elif pa.types.is_nested(typ):
            text = [None if v is None else json.dumps(_json_value(v), separators=(",", ":"))
                    for v in column.to_pylist()]
            column, typ = pa.chunked_array([pa.array(text, pa.string())]), pa.string()
        columns.append(column)
        fields.append(pa.field(f.name, typ, nullable=f.nullable))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


class _Stopped(Exception):
    """The caller went away (cancelled, or closed the stream): stop working, quietly."""


# -- sessions ---------------------------------------------------------------------------------

@dataclass(eq=False)
class _Session:
    con: Any
    key: tuple[str | None, str]
    reused: bool = False
    idle_since: float = field(default_factory=time.monotonic)
    cursor: Any = None  # the cursor of the call running on it, for cancel() from another thread


class _Pool:
    """Open Databricks sessions by (source, time zone), each used by one call at a time."""

    def __init__(self, connect: Callable[[tuple[str | None, str]], Any]):
        self._connect = connect
        self._lock = threading.Lock()
        self._idle: dict[tuple[str | None, str], list[_Session]] = {}
        self._closed = False

    def take(self, key: tuple[str | None, str]) -> _Session:
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
        session.cursor = None
        with self._lock:
            if not self._closed:
                self._idle.setdefault(session.key, []).append(session)
                return
        _quiet_close(session.con)

    def discard(self, session: _Session) -> None:
        _quiet_close(session.con)

    def close(self) -> None:
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

class DatabricksConnector(Connector):
    type_name = "databricks"
    config_model = DatabricksConfig
    capabilities = Capabilities(fingerprint=True, paramstyle="named", quote="`", row_limit=True)

    @classmethod
    def capabilities_for(cls, config: DatabricksConfig) -> Capabilities:
        return Capabilities(fingerprint=config.fingerprint, paramstyle="named", quote="`", row_limit=True)

    def __init__(self, config: DatabricksConfig, *, name: str):
        super().__init__(config, name=name)
        self._pool = _Pool(self._connect)
        self._m2m: M2MCredentials | None = None

    # -- sessions ---------------------------------------------------------------------------

    def _zone(self, query: DayQuery | None) -> str:
        if self.config.timestamp_ntz_zone != "source":
            return str(self.config.timestamp_ntz_zone)
        return query.window.timezone if query is not None else "UTC"

    def _key(self, query: DayQuery | None, source: SourceInfo | None) -> tuple[str | None, str]:
        return (source.name if source else None, self._zone(query))

    def query_tags(self, source: str | None) -> dict[str, str]:
        return {**self.config.query_tags, "app": "ingestd", "connection": self.name,
                **({"source": source} if source else {})}

    def _credentials(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.access_token is not None:
            return {"access_token": cfg.access_token.reveal()}
        if cfg.client_id is not None:
            if self._m2m is None:
                self._m2m = M2MCredentials(cfg.server_hostname, cfg.port, cfg.client_id, cfg.client_secret,
                                           cfg.tls_ca_file)
            self._m2m.token()  # fails here, with its own message, when the client is refused
            return {"credentials_provider": self._m2m}
        module_name, _, attribute = cfg.credentials_provider.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise PermanentError(f"cannot load credentials_provider {cfg.credentials_provider!r}: {exc}") from None
        if not callable(target):
            raise PermanentError(f"credentials_provider {cfg.credentials_provider!r} is not callable")
        return {"credentials_provider": target}

    def connect_kwargs(self, key: tuple[str | None, str]) -> dict[str, Any]:
        """What `databricks.sql.connect` gets for a session of `key` (secrets included)."""
        cfg = self.config
        kwargs: dict[str, Any] = {
            "server_hostname": cfg.server_hostname, "http_path": cfg.http_path, "_port": cfg.port,
            "catalog": cfg.catalog, "schema": cfg.schema,
            "session_configuration": dict(cfg.session_configuration) or None,
            "query_tags": self.query_tags(key[0]), "user_agent_entry": cfg.user_agent_entry,
            "use_cloud_fetch": cfg.use_cloud_fetch, "use_inline_params": False,
            "_use_arrow_native_complex_types": False, "enable_telemetry": False,
            "_retry_stop_after_attempts_duration": cfg.retry_seconds,
            # the driver sleeps this long before every retry of a 429/503: a quarter of the window
            "_retry_delay_max": max(5.0, min(60.0, cfg.retry_seconds / 4)),
            "_socket_timeout": cfg.socket_timeout_seconds,
            "_tls_trusted_ca_file": str(cfg.tls_ca_file) if cfg.tls_ca_file else None,
            **self._credentials(),
        }
        return {k: v for k, v in kwargs.items() if v is not None}

    def _connect(self, key: tuple[str | None, str]) -> Any:
        driver = _driver()
        started = time.monotonic()
        con = driver.connect(**self.connect_kwargs(key))
        try:
            cur = con.cursor()
            try:
                cur.execute(f"SET TIME ZONE '{key[1]}'")  # an IANA name checked by ZoneInfo: no quote in it
            finally:
                cur.close()
        except BaseException:
            _quiet_close(con)
            raise
        log.debug("databricks.session_opened", connection=self.name, source=key[0], timezone=key[1],
                  seconds=round(time.monotonic() - started, 3))
        return con

    def _with_session(self, key: tuple[str | None, str], work: Callable[[_Session], T]) -> T:
        """Run `work` on a pooled session; a session the warehouse dropped is replaced once.
        Errors come out translated; a session that failed transiently is not reused."""
        for attempt in (1, 2):
            try:
                ZoneInfo(key[1])
                session = self._pool.take(key)
            except Exception as exc:
                error = translate(exc, self.config)
                if error is exc:
                    raise
                raise error from exc
            try:
                result = work(session)
            except _Stopped:
                self._pool.discard(session)
                raise
            except Exception as exc:
                if attempt == 1 and session.reused and (session_gone(exc) or "RequestError" in _classes(exc)):
                    log.info("databricks.session_replaced", connection=self.name, source=key[0])
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

    @staticmethod
    def _params(query: DayQuery) -> dict[str, Any]:
        """The day's values as native parameters: {start}/{end} as UTC instants (TIMESTAMP)."""
        if isinstance(query.params, dict):
            params = dict(query.params)
        else:
            params = dict(zip(query.names, query.params, strict=True))
        for name in ("start", "end"):
            value = params.get(name)
            if isinstance(value, dt.datetime) and value.tzinfo is None:
                params[name] = value.replace(tzinfo=dt.UTC)
        return params

    def _execute(self, session: _Session, sql: str, params: dict[str, Any] | None, stop: threading.Event) -> Any:
        if stop.is_set():
            raise _Stopped
        cur = session.con.cursor()
        session.cursor = cur
        try:
            cur.execute(sql, params or None)
        except BaseException:
            with contextlib.suppress(Exception):
                cur.close()
            if stop.is_set():
                raise _Stopped from None
            raise
        if stop.is_set():
            with contextlib.suppress(Exception):
                cur.close()
            raise _Stopped
        return cur

    async def _call(self, key: tuple[str | None, str], work: Callable[[_Session, threading.Event], T]) -> T:
        """Run `work` in a worker thread; a cancelled caller stops it (cancelling its query) and
        waits a little for that before the cancellation goes on."""
        stop = threading.Event()
        holder: dict[str, _Session] = {}

        def run(session: _Session) -> T:
            holder["session"] = session
            return work(session, stop)

        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self._with_session, key, run)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            session = holder.get("session")
            if session is not None and session.cursor is not None:
                await asyncio.to_thread(_cancel, session.cursor)
            await asyncio.wait({future}, timeout=STOP_WAIT_SECONDS)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: a stopped call's error is nobody's business
            raise
        except _Stopped:
            raise asyncio.CancelledError from None

    # -- the connector API ------------------------------------------------------------------

    async def check(self, query: DayQuery | None = None) -> None:
        """Open a session (credentials, http_path, catalog and schema are checked there), run
        `SELECT 1`, and compile the day query with LIMIT 0 (tables, columns and grants)."""
        sql, params = "SELECT 1", None
        if query is not None:
            sql, params = f"SELECT * FROM ({query.sql}) q LIMIT 0", self._params(query)

        def work(session: _Session, stop: threading.Event) -> None:
            cur = self._execute(session, sql, params, stop)
            try:
                cur.fetchall_arrow()
            finally:
                cur.close()

        await self._call(self._key(query, None), work)

    async def probe(self, query: DayQuery, source: SourceInfo | None = None) -> ProbeResult:
        fingerprint = self.capabilities.fingerprint
        if fingerprint:
            sql = ("SELECT COUNT(*), bit_xor(h), SUM(CAST(h AS DECIMAL(38,0))) FROM (SELECT "
                   f"xxhash64(to_json(struct(*))) AS h FROM ({query.sql}) q) ingestd_f")
        else:
            sql = f"SELECT COUNT(*) FROM ({query.sql}) q"
        params = self._params(query)

        def work(session: _Session, stop: threading.Event) -> tuple[Any, ...]:
            cur = self._execute(session, sql, params, stop)
            try:
                row = cur.fetchone()
            finally:
                cur.close()
            return tuple(row)

        row = await self._call(self._key(query, source), work)
        rows = int(row[0])
        if not fingerprint:
            return ProbeResult(rows)
        xor, total = int(row[1] or 0), int(row[2] or 0)
        return ProbeResult(rows, f"{xor & MASK:016x}{total & MASK:016x}")

    async def fetch(self, query: DayQuery, batch_rows: int,
                    source: SourceInfo | None = None) -> AsyncIterator[pa.RecordBatch]:
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        key = self._key(query, source)
        zone = self._zone(query)
        params = self._params(query)
        holder: dict[str, _Session] = {}

        def produce(session: _Session, out: Outlet) -> None:
            holder["session"] = session
            cur = self._execute(session, query.sql, params, out.stopped)
            sent = False

            def tables() -> Iterator[pa.Table]:
                while (table := cur.fetchmany_arrow(batch_rows)).num_rows:
                    yield normalize(table, zone)

            try:
                for batch in rechunk(tables(), batch_rows):
                    if not out.put(batch):
                        raise _Stopped
                    sent = True
            except _Stopped:
                raise
            except Exception as exc:
                if out.stopped.is_set():
                    raise _Stopped from None
                if not sent:
                    raise
                # rows went out already: no silent retry on a new session, the kernel retries the load
                error = translate(exc, self.config)
                if error is exc:
                    raise
                raise error from exc
            finally:
                with contextlib.suppress(Exception):
                    cur.close()

        def worker(out: Outlet) -> None:
            with contextlib.suppress(_Stopped):
                self._with_session(key, lambda session: produce(session, out))

        def interrupt() -> None:
            session = holder.get("session")
            if session is not None and session.cursor is not None:
                _cancel(session.cursor)

        stream: ThreadStream[pa.RecordBatch] = ThreadStream(
            worker, depth=2, interrupt=interrupt, name=f"ingestd-databricks-{self.name}",
            join_seconds=STOP_WAIT_SECONDS)
        async with stream:
            async for batch in stream:
                yield batch

    async def close(self) -> None:
        """Close the idle sessions; sessions still in use are closed when their call ends."""
        await asyncio.to_thread(self._pool.close)


def _cancel(cursor: Any) -> None:
    """Cancel the cursor's running statement in the warehouse (the driver allows it from another
    thread); a statement that already ended has nothing to cancel."""
    with contextlib.suppress(Exception):
        cursor.cancel()
