"""A test-only HTTP(S) proxy that lets the unmodified databricks-sql-connector (Thrift backend) talk
to Apache Spark's Thrift server (tests/spark_thrift.py) as if it were a Databricks SQL warehouse.

Spark's HiveThriftServer2 speaks the same TCLIService protocol, but answers a few things the way
Hive does and Databricks does not. The proxy decodes every Thrift call with the driver's own
generated `TCLIService` classes, patches exactly these differences, re-encodes it and forwards
it. In the order the driver meets them:

1. **Auth.** The servlet parses `Authorization: Bearer <token>` as Basic and answers HTTP 500
   (which the driver retries for its whole retry window). The proxy turns a Bearer token into
   `Basic base64("token:<token>")`. When `tokens` is set, another token gets HTTP 403 with
   Databricks' reason header, as a workspace answers an invalid personal access token.
2. **Protocol version.** Spark answers HIVE_CLI_SERVICE_PROTOCOL_V10 (9); the driver requires
   SPARK_CLI_SERVICE_PROTOCOL_V2 or later. The proxy answers SPARK_CLI_SERVICE_PROTOCOL_V8 (the
   version with native parameters) and `canUseMultipleCatalogs`. The driver sends only
   `client_protocol_i64`, and the absent `client_protocol` decodes to a value Spark rejects: the
   proxy sets it to HIVE_CLI_SERVICE_PROTOCOL_V10. The Databricks `initialNamespace` (Spark
   ignores it) becomes Hive's `use:database` session setting, so `schema` works.
3. **Result format.** `GetResultSetMetadata.resultFormat`, `arrowSchema` and
   `FetchResults.resultSetMetadata` are Databricks-only fields Spark leaves unset. The proxy
   answers ARROW_BASED_SET with the Arrow schema of the declared column types.
4. **Native parameters.** Spark ignores `TExecuteStatementReq.parameters`. The proxy runs the
   statement as `EXECUTE IMMEDIATE '<statement>' USING <typed literal> AS <name>, ...`, the
   values as typed literals (`CAST('...' AS DATE)`, NULL for the VOID type), *inside the proxy
   only*: the driver and ingestd send them as parameters, and Spark's parser binds them.
5. **hasMoreRows.** Spark answers `false` even when more pages follow; the proxy answers `true`
   while a page has rows (the driver then asks once more and gets an empty last page).
6. **Arrow batches.** Spark returns column-based row sets; in that mode the driver widens types
   (INT to int64, DECIMAL(12,2) to decimal(6,2)). The proxy re-encodes each page as an Arrow
   IPC record batch of the declared types, as Databricks does: TIMESTAMP in the session's time
   zone, DECIMAL(p,s) as decimal128, DATE as date32, integers at their width; ARRAY, MAP and
   STRUCT as their JSON text (what Databricks sends when complex types are not requested as
   Arrow, as ingestd asks).

Test controls (not Databricks behaviour): `fail_next(status, count)` answers the next Thrift
calls with an HTTP status (503 with Retry-After: a warehouse starting); `calls` lists the Thrift
method names seen; `statements` the SQL as the driver sent it and `parameters` its native
parameters; `user_agents` and `session_confs` what the driver sent at OpenSession;
`delay_fetch` slows each FetchResults page. While Spark is unreachable the proxy answers
HTTP 502, as a gateway does (listed in `upstream_errors`). `/oidc/v1/token` issues tokens for
`oauth_clients` (client id -> secret) with Databricks' OAuth M2M request shape.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import http.client
import http.server
import json
import secrets
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from databricks.sql.thrift_api.TCLIService import TCLIService
from databricks.sql.thrift_api.TCLIService import ttypes as T
from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TMessageType
from thrift.transport import TTransport

HIVE_V10 = T.TProtocolVersion.HIVE_CLI_SERVICE_PROTOCOL_V10
SPARK_V8 = T.TProtocolVersion.SPARK_CLI_SERVICE_PROTOCOL_V8


def spark_string(text: str) -> str:
    """A Spark SQL string literal (backslash escapes are on by default)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def typed_literal(param: T.TSparkParameter) -> str:
    kind = (param.type or "STRING").upper()
    value = param.value.stringValue if param.value is not None else None
    if kind == "VOID" or value is None:
        return "NULL"
    return f"CAST({spark_string(value)} AS {kind})"


def execute_immediate(statement: str, params: list[T.TSparkParameter]) -> str:
    using = []
    for p in params:
        lit = typed_literal(p)
        using.append(f"{lit} AS `{p.name.replace('`', '``')}`" if p.name else lit)
    return f"EXECUTE IMMEDIATE {spark_string(statement)} USING {', '.join(using)}"


# -- column-based pages to Arrow --------------------------------------------------------------

def _nulls(bitmap: bytes, n: int) -> list[bool]:
    return [bool(bitmap[i // 8] >> (i % 8) & 1) if i // 8 < len(bitmap) else False for i in range(n)]


def arrow_type(entry: T.TPrimitiveTypeEntry, zone: str) -> pa.DataType:
    t = T.TTypeId
    kind = entry.type
    if kind == t.DECIMAL_TYPE:
        q = entry.typeQualifiers.qualifiers
        return pa.decimal128(q["precision"].i32Value, q["scale"].i32Value)
    if kind == t.TIMESTAMP_TYPE:
        return pa.timestamp("us", tz=zone)
    return {
        t.BOOLEAN_TYPE: pa.bool_(), t.TINYINT_TYPE: pa.int8(), t.SMALLINT_TYPE: pa.int16(), t.INT_TYPE: pa.int32(),
        t.BIGINT_TYPE: pa.int64(), t.FLOAT_TYPE: pa.float32(), t.DOUBLE_TYPE: pa.float64(), t.DATE_TYPE: pa.date32(),
        t.BINARY_TYPE: pa.binary(), t.NULL_TYPE: pa.null(),
    }.get(kind, pa.string())


def arrow_schema(schema: T.TTableSchema, zone: str) -> pa.Schema:
    return pa.schema([pa.field(c.columnName, arrow_type(c.typeDesc.types[0].primitiveEntry, zone))
                      for c in schema.columns])


def arrow_column(column: T.TColumn, typ: pa.DataType) -> pa.Array:
    part = next(v for v in (column.boolVal, column.byteVal, column.i16Val, column.i32Val, column.i64Val,
                            column.doubleVal, column.stringVal, column.binaryVal) if v is not None)
    values, nulls = part.values, _nulls(part.nulls or b"", len(part.values))
    if pa.types.is_null(typ):
        return pa.nulls(len(values))
    if pa.types.is_decimal(typ):
        return pa.array([None if n else decimal.Decimal(v) for v, n in zip(values, nulls, strict=True)], typ)
    if pa.types.is_date(typ):
        return pa.array([None if n else dt.date.fromisoformat(v) for v, n in zip(values, nulls, strict=True)], typ)
    if pa.types.is_timestamp(typ):
        # Spark formats TIMESTAMP (and TIMESTAMP_NTZ) as wall-clock text in the session time zone
        naive = pa.array([None if n else dt.datetime.fromisoformat(v) for v, n in zip(values, nulls, strict=True)],
                         pa.timestamp("us"))
        return pc.assume_timezone(naive, timezone=typ.tz, ambiguous="earliest", nonexistent="earliest").cast(typ)
    return pa.array([None if n else v for v, n in zip(values, nulls, strict=True)], typ)


def arrow_batch(rowset: T.TRowSet, schema: pa.Schema) -> pa.RecordBatch:
    columns = rowset.columns or []
    if not columns:
        return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in schema], schema=schema)
    arrays = [arrow_column(c, f.type) for c, f in zip(columns, schema, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# -- the proxy --------------------------------------------------------------------------------

@dataclass
class _Operation:
    metadata: T.TGetResultSetMetadataResp | None = None
    schema: pa.Schema | None = None


@dataclass
class DatabricksProxy:
    upstream_port: int
    tls_cert: Path | None = None
    tls_key: Path | None = None
    path: str = "/sql/1.0/warehouses/ingestd-test"
    tokens: set[str] | None = None
    oauth_clients: dict[str, str] = field(default_factory=dict)
    port: int = 0
    calls: list[str] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)
    parameters: list[list[T.TSparkParameter]] = field(default_factory=list)
    user_agents: list[str] = field(default_factory=list)
    session_confs: list[dict[str, str]] = field(default_factory=list)
    delay_fetch: float = 0.0
    errors: list[str] = field(default_factory=list)  # the proxy's own failures (bugs)
    upstream_errors: list[str] = field(default_factory=list)  # Spark unreachable (killed, restarting)
    _fail: list[int] = field(default_factory=lambda: [0, 0])
    _ops: dict[bytes, _Operation] = field(default_factory=dict)
    _zones: dict[bytes, str] = field(default_factory=dict)
    _op_sessions: dict[bytes, T.TSessionHandle] = field(default_factory=dict)
    _tokens_issued: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: http.server.ThreadingHTTPServer | None = None

    @property
    def hostname(self) -> str:
        return "127.0.0.1"

    def fail_next(self, status: int, count: int) -> None:
        with self._lock:
            self._fail[:] = [status, count]

    def _take_failure(self) -> int:
        with self._lock:
            status, count = self._fail
            if count > 0:
                self._fail[1] -= 1
                return status
            return 0

    # -- HTTP --------------------------------------------------------------------------------

    def start(self) -> DatabricksProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urllib.parse.urlparse(self.path)
                if url.path == "/oidc/v1/token":
                    return self.reply(*proxy._token(self.headers, body))
                if url.path.rstrip("/") != proxy.path.rstrip("/"):
                    return self.reply(404, b'{"error_code":"RESOURCE_DOES_NOT_EXIST","message":"Not Found"}',
                                      {"Content-Type": "application/json",
                                       "x-databricks-reason-phrase": "RESOURCE_DOES_NOT_EXIST"})
                auth = self.headers.get("Authorization", "")
                if not auth.startswith("Bearer "):
                    return self.reply(401, b"", {"x-databricks-reason-phrase": "Credential was not sent or was of "
                                                                                "an unsupported type for this API."})
                token = auth[len("Bearer "):]
                if proxy.tokens is not None and token not in proxy.tokens and token not in proxy._issued():
                    return self.reply(403, b"", {"x-databricks-reason-phrase": "Invalid access token."})
                failure = proxy._take_failure()
                if failure:
                    return self.reply(failure, b"", {"Retry-After": "1",
                                                     "x-databricks-reason-phrase": "TEMPORARILY_UNAVAILABLE"})
                with proxy._lock:
                    proxy.user_agents.append(self.headers.get("User-Agent", ""))
                try:
                    status, out = proxy._thrift(body, token)
                except (ConnectionError, OSError) as exc:
                    with proxy._lock:
                        proxy.upstream_errors.append(repr(exc))
                    return self.reply(502, f"upstream: {exc}".encode(),
                                      {"x-databricks-reason-phrase": "Bad Gateway"})
                except Exception as exc:  # a bug of the proxy: keep it for the test to show
                    import traceback
                    with proxy._lock:
                        proxy.errors.append(traceback.format_exc())
                    return self.reply(500, repr(exc).encode(), {"x-thriftserver-error-message": repr(exc)})
                self.reply(status, out, {"Content-Type": "application/x-thrift"})

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        if self.tls_cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls_cert, self.tls_key)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="databricks-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- OAuth M2M ---------------------------------------------------------------------------

    def _issued(self) -> set[str]:
        with self._lock:
            return set(self._tokens_issued)

    def _token(self, headers, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        form = dict(urllib.parse.parse_qsl(body.decode()))
        client_id, secret = form.get("client_id"), form.get("client_secret")
        auth = headers.get("Authorization", "")
        if auth.startswith("Basic "):
            client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        if form.get("grant_type") != "client_credentials" or self.oauth_clients.get(client_id or "") != secret:
            return 401, json.dumps({"error": "invalid_client",
                                    "error_description": "Client authentication failed"}).encode(), \
                {"Content-Type": "application/json"}
        token = "dbo-" + secrets.token_hex(12)
        with self._lock:
            self._tokens_issued.add(token)
        return 200, json.dumps({"access_token": token, "token_type": "Bearer", "expires_in": 3600,
                                "scope": form.get("scope", "all-apis")}).encode(), \
            {"Content-Type": "application/json"}

    # -- Thrift ------------------------------------------------------------------------------

    def _upstream(self, name: str, args: Any, token: str) -> Any:
        """Call Spark with one (patched) request; returns the decoded result struct."""
        out = TTransport.TMemoryBuffer()
        prot = TBinaryProtocol.TBinaryProtocol(out)
        prot.writeMessageBegin(name, TMessageType.CALL, 0)
        args.write(prot)
        prot.writeMessageEnd()
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=300)
        try:
            conn.request("POST", "/cliservice", body=out.getvalue(), headers={
                "Content-Type": "application/x-thrift",
                "Authorization": "Basic " + base64.b64encode(f"token:{token}".encode()).decode()})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise ConnectionError(f"Spark answered HTTP {resp.status} to {name}")
        prot = TBinaryProtocol.TBinaryProtocol(TTransport.TMemoryBuffer(data))
        _, mtype, _ = prot.readMessageBegin()
        if mtype == TMessageType.EXCEPTION:
            from thrift.Thrift import TApplicationException
            exc = TApplicationException()
            exc.read(prot)
            raise ConnectionError(f"Spark raised {exc}")
        result = getattr(TCLIService, f"{name}_result")()
        result.read(prot)
        return result

    def _thrift(self, body: bytes, token: str) -> tuple[int, bytes]:
        prot = TBinaryProtocol.TBinaryProtocol(TTransport.TMemoryBuffer(body))
        name, _, seqid = prot.readMessageBegin()
        args = getattr(TCLIService, f"{name}_args")()
        args.read(prot)
        prot.readMessageEnd()
        with self._lock:
            self.calls.append(name)
        patch = getattr(self, f"_call_{name}", None)
        result = patch(args, token) if patch else self._upstream(name, args, token)
        out = TTransport.TMemoryBuffer()
        prot = TBinaryProtocol.TBinaryProtocol(out)
        prot.writeMessageBegin(name, TMessageType.REPLY, seqid)
        result.write(prot)
        prot.writeMessageEnd()
        return 200, out.getvalue()

    def _call_OpenSession(self, args, token):
        req: T.TOpenSessionReq = args.req
        with self._lock:
            self.session_confs.append(dict(req.configuration or {}))
        if req.client_protocol is None or not 0 <= req.client_protocol <= HIVE_V10:  # absent decodes to -7
            req.client_protocol = HIVE_V10
        conf = dict(req.configuration or {})
        namespace = req.initialNamespace
        if namespace is not None and namespace.schemaName:
            conf["use:database"] = namespace.schemaName
        req.configuration = conf
        req.initialNamespace = None
        result = self._upstream("OpenSession", args, token)
        resp: T.TOpenSessionResp = result.success
        if resp is not None and resp.status.statusCode in (0, 1):
            resp.serverProtocolVersion = SPARK_V8
            resp.canUseMultipleCatalogs = True
        return result

    def _call_ExecuteStatement(self, args, token):
        req: T.TExecuteStatementReq = args.req
        with self._lock:
            self.statements.append(req.statement)
            self.parameters.append(list(req.parameters or []))
            if req.statement.lstrip().upper().startswith("SET"):
                self._zones.pop(req.sessionHandle.sessionId.guid, None)
        if req.parameters:
            req.statement = execute_immediate(req.statement, req.parameters)
            req.parameters = None
        result = self._upstream("ExecuteStatement", args, token)
        resp: T.TExecuteStatementResp = result.success
        if resp is not None and resp.operationHandle is not None:
            with self._lock:
                self._op_sessions[resp.operationHandle.operationId.guid] = req.sessionHandle
        return result

    def _zone(self, session: T.TSessionHandle, token: str) -> str:
        """The session's time zone, asked of Spark (cached until a SET statement)."""
        key = session.sessionId.guid
        with self._lock:
            if key in self._zones:
                return self._zones[key]
        run = TCLIService.ExecuteStatement_args(T.TExecuteStatementReq(
            sessionHandle=session, statement="SELECT current_timezone()", runAsync=False))
        op = self._upstream("ExecuteStatement", run, token).success.operationHandle
        fetch = TCLIService.FetchResults_args(T.TFetchResultsReq(operationHandle=op, orientation=0, maxRows=1))
        zone = self._upstream("FetchResults", fetch, token).success.results.columns[0].stringVal.values[0]
        self._upstream("CloseOperation", TCLIService.CloseOperation_args(T.TCloseOperationReq(op)), token)
        with self._lock:
            self._zones[key] = zone
        return zone

    def _metadata(self, handle: T.TOperationHandle, token: str, session: T.TSessionHandle | None
                  ) -> tuple[Any, _Operation]:
        key = handle.operationId.guid
        with self._lock:
            op = self._ops.get(key)
        if op is not None and op.metadata is not None:
            return None, op
        result = self._upstream("GetResultSetMetadata",
                                TCLIService.GetResultSetMetadata_args(T.TGetResultSetMetadataReq(handle)), token)
        meta: T.TGetResultSetMetadataResp = result.success
        op = _Operation()
        if meta is not None and meta.status.statusCode in (0, 1) and meta.schema is not None:
            has_ts = any(c.typeDesc.types[0].primitiveEntry.type == T.TTypeId.TIMESTAMP_TYPE
                         for c in meta.schema.columns)
            zone = self._zone(session, token) if has_ts and session is not None else "UTC"
            op.schema = arrow_schema(meta.schema, zone)
            meta.resultFormat = T.TSparkRowSetType.ARROW_BASED_SET
            meta.arrowSchema = op.schema.serialize().to_pybytes()
            meta.lz4Compressed = False
            meta.isStagingOperation = False
            op.metadata = meta
            with self._lock:
                self._ops[key] = op
        return result, op

    def _call_GetOperationStatus(self, args, token):
        return self._upstream("GetOperationStatus", args, token)

    def _call_GetResultSetMetadata(self, args, token):
        handle = args.req.operationHandle
        result, op = self._metadata(handle, token, self._session_of(handle))
        if result is None:
            result = TCLIService.GetResultSetMetadata_result(success=op.metadata)
        return result

    def _session_of(self, handle: T.TOperationHandle) -> T.TSessionHandle | None:
        with self._lock:
            return self._op_sessions.get(handle.operationId.guid)

    def _call_FetchResults(self, args, token):
        req: T.TFetchResultsReq = args.req
        if self.delay_fetch:
            time.sleep(self.delay_fetch)
        _, op = self._metadata(req.operationHandle, token, self._session_of(req.operationHandle))
        req.includeResultSetMetadata = None
        result = self._upstream("FetchResults", args, token)
        resp: T.TFetchResultsResp = result.success
        if resp is None or resp.status.statusCode not in (0, 1) or op.schema is None or resp.results is None:
            return result
        batch = arrow_batch(resp.results, op.schema)
        resp.results = T.TRowSet(startRowOffset=resp.results.startRowOffset, rows=[],
                                 arrowBatches=[T.TSparkArrowBatch(batch=batch.serialize().to_pybytes(),
                                                                  rowCount=batch.num_rows)])
        resp.hasMoreRows = batch.num_rows > 0
        resp.resultSetMetadata = op.metadata
        return result

    def _call_CloseOperation(self, args, token):
        key = args.req.operationHandle.operationId.guid
        with self._lock:
            self._ops.pop(key, None)
            self._op_sessions.pop(key, None)
        return self._upstream("CloseOperation", args, token)
