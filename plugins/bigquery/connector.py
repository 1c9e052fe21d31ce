"""The BigQuery connector (type `bigquery`), on google-cloud-bigquery.

Install it with `pip install 'ingestd[bigquery]'` (google-cloud-bigquery, and
google-cloud-bigquery-storage for the Storage Read API). `sample.toml` beside this module is the
documented configuration: every key, its default, what it does.

Queries name the day with `{day}` (a DATE parameter `@day`), `{start}` and `{end}` (TIMESTAMP
parameters `@start`/`@end`, in UTC): values travel as query parameters, never as SQL text.

Permissions: `roles/bigquery.jobUser` on `project` (to run jobs), `roles/bigquery.dataViewer`
on what the queries read, and `roles/bigquery.readSessionUser` on `project` for the Storage
Read API. `ingestd check` runs a dry run of each source's day query (free) and, with the
Storage Read API, opens a read session that reads nothing on each table the dry run reports;
a missing permission is named with the role that grants it. It logs the byte estimate; the
cost guard applies per source, in probes and loads.

Streaming: a worker thread runs the job and iterates `RowIterator.to_arrow_iterable` (REST
pages of `page_size` rows, or Storage Read API pages with a queue of one page per stream), cuts
and joins the pages into batches of at most `batch_rows` rows, and hands them to the event loop
two batches ahead at most (an `ingestd.ThreadStream`): memory holds a few pages whatever the
day's size. Closing the
stream stops the thread and cancels a job that is still running. STRUCT and ARRAY columns
arrive as JSON text; JSON as its text; NUMERIC/BIGNUMERIC as Arrow decimals; DATETIME as a
timestamp without zone (read as UTC by the mapping); TIMESTAMP as a UTC timestamp.

Probe: `SELECT COUNT(*), BIT_XOR(FARM_FINGERPRINT(TO_JSON_STRING(q))) FROM (<day query>) q`.
The fingerprint sees any changed value at equal count; two identical rows cancel each other in
the XOR, so replacing a pair of identical rows by another identical pair goes unseen.

Errors: BigQuery's error reason decides, then the HTTP or gRPC status. `rateLimitExceeded`,
`backendError`, `internalError`, `quotaExceeded`, 429, 500, 502, 503, 504, timeouts and dropped
connections are a `TransientError` (the daemon retries); `invalidQuery`, `invalid`,
`accessDenied`, `notFound`, `bytesBilledLimitExceeded` and other 4xx are a `PermanentError`.
The reason is the error's `code`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import datetime as dt
import decimal
import importlib
import json
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

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
    SourceInfo,
    ThreadStream,
    TransientError,
    pem_lines,
    rechunk,
)

log = structlog.get_logger("ingestd.bigquery")
T = TypeVar("T")

__all__ = ["BigQueryConfig", "BigQueryConnector", "translate", "query_parameters",
           "job_labels", "sanitize_label"]

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
INSTALL_HINT = "pip install 'ingestd[bigquery]'"
QUEUE_DEPTH = 2          # batches between the worker thread and the event loop
JOIN_SECONDS = 10.0      # how long closing a stream waits for its worker thread


# -- config ------------------------------------------------------------------------------------

@dataclass
class BigQueryConfig:
    project: str
    location: str | None = None
    default_dataset: str | None = None
    credentials_file: Path | None = None
    impersonate_service_account: str | None = None
    impersonation_delegates: list[str] = field(default_factory=list)
    maximum_bytes_billed: int | None = None
    maximum_bytes_billed_by_source: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    page_size: int | None = None
    use_storage_api: bool = True
    max_stream_count: int = 1
    job_timeout_seconds: float | None = None
    retry_seconds: float = 60.0
    api_endpoint: str | None = None
    storage_api_endpoint: str | None = None
    anonymous: bool = False

    def validate(self) -> None:
        if not self.project.strip():
            raise ConfigError("project", "must not be empty")
        if self.default_dataset is not None and not re.fullmatch(r"([A-Za-z0-9_.:-]+\.)?[A-Za-z0-9_]+",
                                                                  self.default_dataset):
            raise ConfigError("default_dataset",
                              f"expected 'dataset' or 'project.dataset', got {self.default_dataset!r}")
        if self.anonymous and (self.credentials_file or self.impersonate_service_account):
            raise ConfigError("anonymous", "anonymous credentials exclude credentials_file and impersonation")
        if self.impersonation_delegates and not self.impersonate_service_account:
            raise ConfigError("impersonation_delegates", "needs impersonate_service_account")
        if self.maximum_bytes_billed is not None and self.maximum_bytes_billed < 1:
            raise ConfigError("maximum_bytes_billed", "must be at least 1")
        for name, limit in self.maximum_bytes_billed_by_source.items():
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ConfigError(f"maximum_bytes_billed_by_source.{name}", "must be an integer of at least 1")
        for key, value in self.labels.items():
            if not isinstance(value, str):
                raise ConfigError(f"labels.{key}", "expected a string")
        if self.page_size is not None and self.page_size < 1:
            raise ConfigError("page_size", "must be at least 1")
        if self.max_stream_count < 1:
            raise ConfigError("max_stream_count", "must be at least 1")
        if self.job_timeout_seconds is not None and self.job_timeout_seconds <= 0:
            raise ConfigError("job_timeout_seconds", "must be more than 0")
        if self.retry_seconds < 0:
            raise ConfigError("retry_seconds", "must not be negative")
        if self.api_endpoint is not None and urlparse(self.api_endpoint).scheme not in ("http", "https"):
            raise ConfigError("api_endpoint", f"expected an http:// or https:// URL, got {self.api_endpoint!r}")
        if self.storage_api_endpoint is not None and not _grpc_target(self.storage_api_endpoint)[0]:
            raise ConfigError("storage_api_endpoint",
                              f"expected HOST:PORT or http://HOST:PORT, got {self.storage_api_endpoint!r}")


def _grpc_target(endpoint: str) -> tuple[str, bool]:
    """(host:port, plaintext) of a Storage Read API endpoint: `http://` means no TLS."""
    if "://" in endpoint:
        parsed = urlparse(endpoint)
        return (parsed.netloc if parsed.scheme in ("http", "https") else ""), parsed.scheme == "http"
    return endpoint, False


# -- the library, imported lazily ------------------------------------------------------------

def _bigquery():
    try:
        bigquery = importlib.import_module("google.cloud.bigquery")
    except ImportError as exc:
        raise PermanentError(f"the bigquery connector needs google-cloud-bigquery: {INSTALL_HINT} ({exc})") from exc
    return bigquery


def _storage():
    """google.cloud.bigquery_storage_v1, or None when google-cloud-bigquery-storage is missing."""
    try:
        return importlib.import_module("google.cloud.bigquery_storage_v1")
    except ImportError:
        return None


# -- labels and parameters ---------------------------------------------------------------------

_LABEL_BAD = re.compile(r"[^a-z0-9_-]+")


def sanitize_label(text: str, *, key: bool = False) -> str:
    """A label key or value BigQuery accepts: lowercase letters, digits, `_` and `-`, at most 63
    characters; a key starts with a letter."""
    out = _LABEL_BAD.sub("_", str(text).lower()).strip("_")[:63]
    if key and not out[:1].isalpha():
        out = ("l_" + out)[:63] if out else "label"
    return out


def job_labels(connection: str, step: str, source: SourceInfo | None, extra: dict[str, str]) -> dict[str, str]:
    labels = {sanitize_label(k, key=True): sanitize_label(v) for k, v in extra.items()}
    labels.update({"app": "ingestd", "ingestd_connection": sanitize_label(connection), "ingestd_step": step})
    if source is not None:
        labels["ingestd_source"] = sanitize_label(source.name)
    return labels


_NAMED_TYPES = {"day": "DATE", "start": "TIMESTAMP", "end": "TIMESTAMP"}


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT64"
    if isinstance(value, float):
        return "FLOAT64"
    if isinstance(value, decimal.Decimal):
        return "NUMERIC"
    if isinstance(value, dt.datetime):
        return "TIMESTAMP"
    if isinstance(value, dt.date):
        return "DATE"
    if isinstance(value, bytes):
        return "BYTES"
    return "STRING"


def query_parameters(params: list[Any] | dict[str, Any]) -> list:
    """DayQuery params (`@name` style, a dict) as ScalarQueryParameter objects: `day` a DATE,
    `start`/`end` TIMESTAMPs (naive values are UTC, as the kernel gives them)."""
    bigquery = _bigquery()
    if not isinstance(params, dict):
        raise PermanentError("the bigquery connector takes named parameters (@day, @start, @end)")
    out = []
    for name, value in params.items():
        typ = _NAMED_TYPES.get(name) or _type_of(value)
        if typ == "TIMESTAMP" and isinstance(value, dt.datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        out.append(bigquery.ScalarQueryParameter(name, typ, value))
    return out


# -- errors ------------------------------------------------------------------------------------

TRANSIENT_REASONS = {"rateLimitExceeded", "backendError", "internalError", "quotaExceeded", "jobRateLimitExceeded",
                     "jobBackendError", "jobInternalError", "tableUnavailable", "timeout"}
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}

PERMANENT_WORDS = {
    "invalidQuery": "BigQuery refused the query",
    "invalid": "BigQuery refused the request",
    "notFound": "the query names a table, dataset or column BigQuery does not have (or the location is wrong)",
    "bytesBilledLimitExceeded": "the query would bill more bytes than maximum_bytes_billed allows; it was not run",
    "billingNotEnabled": "billing is not enabled for the project",
    "billingTierLimitExceeded": "the query needs a higher billing tier",
    "resourcesExceeded": "the query needs more resources than BigQuery gives it; simplify it",
    "responseTooLarge": "the query result is too large",
    "duplicate": "the job already exists",
}

ROLES = {
    "job user": "roles/bigquery.jobUser",
    "data viewer": "roles/bigquery.dataViewer",
    "read session user": "roles/bigquery.readSessionUser",
    "token creator": "roles/iam.serviceAccountTokenCreator",
}


def missing_role(detail: str) -> str | None:
    """Which role a permission-denied message points at: job user, data viewer, read session
    user or token creator (impersonation); None when the message does not say."""
    d = detail.lower()
    if "bigquery.jobs.create" in d or "permission to run" in d:
        return "job user"
    if "readsessions" in d or "read session" in d:
        return "read session user"
    if "getaccesstoken" in d or "serviceaccounttokencreator" in d or "iam.serviceaccounts" in d:
        return "token creator"
    if ("tables.getdata" in d or "permission to query table" in d or "access denied: table" in d
            or "access denied: dataset" in d or "access denied: view" in d or "tables.get " in d
            or "datasets.get" in d):
        return "data viewer"
    return None


def _reason(exc: BaseException) -> str | None:
    for err in getattr(exc, "errors", None) or []:
        if isinstance(err, dict) and err.get("reason"):
            return str(err["reason"])
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) and reason else None


def _detail(exc: BaseException) -> str:
    """The error's own message, first paragraph, on one line (no job id trailer, no SQL drawing)."""
    text = None
    for err in getattr(exc, "errors", None) or []:
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
            break
    if text is None:
        text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    lines = []
    for line in str(text).splitlines():
        if not line.strip():
            if lines:
                break
            continue
        if line.startswith("LINE "):
            break
        lines.append(line.strip())
    return " ".join(lines) or type(exc).__name__


def _status(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    grpc_code = getattr(exc, "grpc_status_code", None)
    if grpc_code is not None:
        return {"RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "INTERNAL": 500, "DEADLINE_EXCEEDED": 504,
                "ABORTED": 503, "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "INVALID_ARGUMENT": 400,
                "UNAUTHENTICATED": 401}.get(getattr(grpc_code, "name", ""), None)
    return None


def translate(exc: BaseException, *, project: str = "", endpoint: str | None = None) -> ConnectorError:
    """Sort a google-cloud / google-auth / transport error into TransientError or PermanentError,
    with BigQuery's reason (or the HTTP status) as `code`."""
    if isinstance(exc, ConnectorError):
        return exc
    detail = _detail(exc)
    reason = _reason(exc)
    status = _status(exc)
    name = type(exc).__name__
    module = type(exc).__module__ or ""

    if isinstance(exc, (concurrent.futures.TimeoutError, TimeoutError)):
        return TransientError(f"BigQuery did not answer in time: {detail}", code="timeout")
    if name == "RetryError" and module.startswith("google.api_core"):
        cause = getattr(exc, "cause", None)
        inner = translate(cause, project=project, endpoint=endpoint) if cause is not None else None
        if isinstance(inner, PermanentError):
            return inner
        return TransientError(f"BigQuery kept failing until the retry deadline: "
                              f"{_detail(cause) if cause is not None else detail}",
                              code=inner.code if inner else "retry")
    if module.startswith("google.auth"):
        if name == "DefaultCredentialsError":
            return PermanentError("no Google credentials: set credentials_file, or provide Application Default "
                                  "Credentials (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default "
                                  f"login`, or a service account on the machine): {detail}", code="credentials")
        if name == "TransportError" or getattr(exc, "retryable", False):
            return TransientError(f"cannot reach Google's token service: {detail}", code="credentials")
        if "iam.serviceaccounts" in detail.lower() or "getaccesstoken" in detail.lower():
            return PermanentError(f"cannot impersonate the service account: grant {ROLES['token creator']} on it to "
                                  f"the account ingestd runs as: {detail}", code="accessDenied")
        return PermanentError(f"the Google credentials were refused: {detail}", code="credentials")
    if module.startswith(("requests", "urllib3")) or isinstance(exc, OSError):
        where = f" at {endpoint}" if endpoint else ""
        return TransientError(f"cannot reach BigQuery{where}: {detail}", code="connection")

    if reason == "accessDenied" or status == 403 or name in ("Forbidden", "PermissionDenied"):
        if reason in TRANSIENT_REASONS:
            return TransientError(f"BigQuery is throttling the account ({reason}): {detail}", code=reason)
        role = missing_role(detail)
        if role:
            scope = f"on project {project}" if role in ("job user", "read session user") and project else \
                "on the dataset or table the query reads" if role == "data viewer" else "on the impersonated account"
            return PermanentError(f"permission denied: the account lacks the {role} role — grant {ROLES[role]} "
                                  f"{scope}: {detail}", code="accessDenied")
        return PermanentError(f"permission denied: {detail}", code=reason or "accessDenied")
    if status == 401 or name in ("Unauthorized", "Unauthenticated"):
        return PermanentError(f"BigQuery refused the credentials: {detail}", code=reason or "unauthorized")
    if reason in TRANSIENT_REASONS:
        return TransientError(f"BigQuery is busy or failing ({reason}); will retry: {detail}", code=reason)
    if reason in PERMANENT_WORDS:
        return PermanentError(f"{PERMANENT_WORDS[reason]}: {detail}", code=reason)
    if reason == "stopped":
        return TransientError(f"the BigQuery job was cancelled: {detail}", code=reason)
    if status in TRANSIENT_STATUS or name in ("ServiceUnavailable", "InternalServerError", "TooManyRequests",
                                              "GatewayTimeout", "BadGateway", "DeadlineExceeded", "Aborted",
                                              "ResourceExhausted"):
        return TransientError(f"BigQuery is busy or failing ({status or name}); will retry: {detail}",
                              code=reason or (str(status) if status else name))
    if status == 404 or name == "NotFound":
        return PermanentError(f"{PERMANENT_WORDS['notFound']}: {detail}", code=reason or "notFound")
    if status is not None and 400 <= status < 500:
        return PermanentError(f"BigQuery refused the request: {detail}", code=reason or str(status))
    return PermanentError(f"BigQuery call failed ({name}): {detail}", code=reason)


# -- results as Arrow ----------------------------------------------------------------------------

def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        as_float = float(value)
        return as_float if decimal.Decimal(repr(as_float)) == value else str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dt.timedelta):
        return str(value)
    return str(value)


def _nested(typ: pa.DataType) -> bool:
    return (pa.types.is_struct(typ) or pa.types.is_list(typ) or pa.types.is_large_list(typ)
            or pa.types.is_fixed_size_list(typ) or pa.types.is_map(typ))


def as_json_text(batch: pa.RecordBatch) -> pa.RecordBatch:
    """STRUCT and ARRAY columns as JSON text (NULL stays NULL); other columns untouched."""
    if not any(_nested(f.type) for f in batch.schema):
        return batch
    arrays, fields = [], []
    for f, column in zip(batch.schema, batch.columns, strict=True):
        if _nested(f.type):
            text = [None if v is None else json.dumps(v, default=_json_default, ensure_ascii=False,
                                                       separators=(",", ":"))
                    for v in column.to_pylist()]
            column, f = pa.array(text, type=pa.string()), pa.field(f.name, pa.string())
        arrays.append(column)
        fields.append(f)
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))


class _TrackedReadClient:
    """A BigQueryReadClient that remembers whether the read session was created (so a failure to
    create one can fall back to REST pages before any row was read)."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.created = False
        self.error: BaseException | None = None

    def create_read_session(self, *args, **kwargs):
        try:
            session = self._inner.create_read_session(*args, **kwargs)
        except BaseException as exc:
            self.error = exc
            raise
        self.created = True
        return session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# -- the connector -------------------------------------------------------------------------------

def _human(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{n} B"


class BigQueryConnector(Connector):
    type_name = "bigquery"
    config_model = BigQueryConfig
    capabilities = Capabilities(fingerprint=True, paramstyle="at", quote="`", row_limit=True)

    PROBE = ("SELECT COUNT(*) AS ingestd_rows, BIT_XOR(FARM_FINGERPRINT(TO_JSON_STRING(q))) AS ingestd_fp "
             "FROM ({sql}) AS q")

    SECRET_FIELDS = ("private_key", "private_key_id", "client_secret", "refresh_token")
    """The fields of a credentials file (service-account key, authorized user) that are secret."""

    @classmethod
    def secret_values(cls, config: BigQueryConfig) -> list[str]:
        """The secret fields of the credentials file, and the PEM body lines of its private key
        (an unreadable or malformed file is `check`'s to report)."""
        if config.credentials_file is None:
            return []
        try:
            info = json.loads(Path(config.credentials_file).read_text())
        except (OSError, ValueError):
            return []
        values = [info[k] for k in cls.SECRET_FIELDS if isinstance(info, dict) and isinstance(info.get(k), str)]
        return values + [line for v in values for line in pem_lines(v)]

    def __init__(self, config: BigQueryConfig, *, name: str):
        super().__init__(config, name=name)
        self._client: Any = None
        self._read_client: Any = None
        self._read_client_made = False
        self._lock = asyncio.Lock()
        self._streams: set[ThreadStream] = set()
        self._warned_no_storage = False
        self._fallback_warned = False

    # -- clients -------------------------------------------------------------------------------

    def credentials(self):
        """The google.auth credentials of this connection (None: the client's default, i.e. ADC)."""
        cfg = self.config
        if cfg.anonymous:
            from google.auth.credentials import AnonymousCredentials
            return AnonymousCredentials()
        base = None
        if cfg.credentials_file is not None:
            from google.oauth2 import service_account
            path = Path(cfg.credentials_file)
            try:
                base = service_account.Credentials.from_service_account_file(str(path), scopes=SCOPES)
            except FileNotFoundError as exc:
                raise PermanentError(f"credentials_file {path} does not exist", code="credentials") from exc
            except OSError as exc:
                raise PermanentError(f"cannot read credentials_file {path}: {exc.strerror or exc}",
                                     code="credentials") from exc
            except (ValueError, KeyError) as exc:
                raise PermanentError(f"credentials_file {path} is not a service-account JSON key: {exc}",
                                     code="credentials") from exc
        if cfg.impersonate_service_account:
            from google.auth import impersonated_credentials
            if base is None:
                import google.auth
                try:
                    base, _ = google.auth.default(scopes=SCOPES)
                except Exception as exc:  # DefaultCredentialsError
                    raise translate(exc) from exc
            return impersonated_credentials.Credentials(
                source_credentials=base, target_principal=cfg.impersonate_service_account,
                target_scopes=SCOPES, delegates=list(cfg.impersonation_delegates) or None)
        return base

    def _make_client(self):
        bigquery = _bigquery()
        from google.api_core.client_info import ClientInfo
        cfg = self.config
        options = {"api_endpoint": cfg.api_endpoint} if cfg.api_endpoint else None
        credentials = self.credentials()
        try:
            return bigquery.Client(project=cfg.project, credentials=credentials, location=cfg.location,
                                   client_options=options, client_info=ClientInfo(user_agent="ingestd"))
        except Exception as exc:
            raise translate(exc, project=cfg.project, endpoint=cfg.api_endpoint) from exc

    def _make_read_client(self):
        """A BigQueryReadClient, or None when the Storage Read API is off or not installed."""
        cfg = self.config
        if not cfg.use_storage_api:
            return None
        storage = _storage()
        if storage is None:
            if not self._warned_no_storage:
                self._warned_no_storage = True
                log.warning("bigquery.storage_unavailable", connection=self.name,
                            reason=f"google-cloud-bigquery-storage is not installed ({INSTALL_HINT}); "
                                   "reading through REST pages")
            return None
        if cfg.storage_api_endpoint:
            target, plaintext = _grpc_target(cfg.storage_api_endpoint)
            if plaintext:
                import grpc
                from google.cloud.bigquery_storage_v1.services.big_query_read.transports import (
                    BigQueryReadGrpcTransport,
                )
                return storage.BigQueryReadClient(transport=BigQueryReadGrpcTransport(
                    channel=grpc.insecure_channel(target)))
            return storage.BigQueryReadClient(credentials=self._client._credentials,
                                              client_options={"api_endpoint": target})
        return storage.BigQueryReadClient(credentials=self._client._credentials)

    async def _clients(self) -> tuple[Any, Any]:
        async with self._lock:
            if self._client is None:
                self._client = await asyncio.to_thread(self._make_client)
            if not self._read_client_made:
                self._read_client = await asyncio.to_thread(self._make_read_client)
                self._read_client_made = True
            return self._client, self._read_client

    # -- jobs ----------------------------------------------------------------------------------

    def limit_for(self, source: SourceInfo | None) -> int | None:
        """maximum_bytes_billed for a source: its own entry, else the connection's."""
        if source is not None and source.name in self.config.maximum_bytes_billed_by_source:
            return self.config.maximum_bytes_billed_by_source[source.name]
        return self.config.maximum_bytes_billed

    def _default_dataset(self) -> str | None:
        ds = self.config.default_dataset
        if ds and "." not in ds:
            return f"{self.config.project}.{ds}"
        return ds

    def _job_config(self, query: DayQuery | None, step: str, source: SourceInfo | None, *,
                    dry_run: bool = False, limit: int | None = None):
        bigquery = _bigquery()
        cfg = bigquery.QueryJobConfig(
            query_parameters=query_parameters(query.params) if query is not None else [],
            labels=job_labels(self.name, step, source, self.config.labels),
            use_legacy_sql=False,
        )
        if self._default_dataset():
            cfg.default_dataset = self._default_dataset()
        if dry_run:
            cfg.dry_run = True
            cfg.use_query_cache = False
        if limit is not None:
            cfg.maximum_bytes_billed = limit
        if self.config.job_timeout_seconds and not dry_run:
            cfg.job_timeout_ms = int(self.config.job_timeout_seconds * 1000)
        return cfg

    def _retry(self):
        from google.cloud.bigquery import DEFAULT_RETRY
        return DEFAULT_RETRY.with_deadline(self.config.retry_seconds) if self.config.retry_seconds else None

    def _job_id(self, step: str, source: SourceInfo | None) -> str:
        src = re.sub(r"[^A-Za-z0-9_-]+", "_", source.name)[:64] + "_" if source else ""
        return f"ingestd_{src}{step}_{uuid.uuid4().hex}"

    def _start(self, client, sql: str, job_config, job_id: str | None = None):
        return client.query(sql, job_config=job_config, job_id=job_id, location=self.config.location,
                            retry=self._retry(), job_retry=None)

    def _cancel_later(self, client, job_id: str) -> None:
        """Ask BigQuery to cancel a job, from a thread of its own (never waited for)."""
        def cancel():
            with contextlib.suppress(Exception):
                client.cancel_job(job_id, location=self.config.location, retry=None, timeout=10)
                log.info("bigquery.cancel_requested", connection=self.name, job_id=job_id)
        threading.Thread(target=cancel, name="ingestd-bigquery-cancel", daemon=True).start()

    def _err(self, exc: BaseException) -> ConnectorError:
        return translate(exc, project=self.config.project, endpoint=self.config.api_endpoint)

    async def _call(self, work: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(work)
        except ConnectorError:
            raise
        except Exception as exc:
            raise self._err(exc) from exc

    async def estimate(self, sql: str, query: DayQuery | None, step: str, source: SourceInfo | None):
        """Dry run: (bytes the query would process, the dry-run job). Free; needs jobs.create."""
        client, _ = await self._clients()
        config = self._job_config(query, step, source, dry_run=True)
        job = await self._call(lambda: self._start(client, sql, config))
        return int(job.total_bytes_processed or 0), job

    def _guard(self, estimate: int, limit: int | None, step: str, query: DayQuery, source: SourceInfo | None) -> None:
        if limit is None or estimate <= limit:
            return
        src = source.name if source else "?"
        key = (f"maximum_bytes_billed_by_source.{src}" if source and source.name in
               self.config.maximum_bytes_billed_by_source else "maximum_bytes_billed")
        raise PermanentError(
            f"bytes-billed limit: the {step} query of source {src} for {query.window.day} would process "
            f"{_human(estimate)} ({estimate} bytes), more than {key} = {limit} ({_human(limit)}); it was not run. "
            f"Narrow the query to the day's partitions or raise {key} in connections.{self.name}.",
            code="bytesBilledLimitExceeded")

    # -- the connector API -----------------------------------------------------------------------

    async def check(self, query: DayQuery | None = None) -> None:
        """Dry-run the day query (or `SELECT 1`): proves the credentials, the job user role and
        read access to every table the query names; with the Storage Read API, also opens a read
        session that reads nothing on each table the dry run reports (read session user). The
        byte estimate is logged (`bigquery.check`); the cost guard itself is per source and
        applies where the source is known, in probe and fetch."""
        sql = query.sql if query is not None else "SELECT 1"
        estimate, job = await self.estimate(sql, query, "check", None)
        day = query.window.day.isoformat() if query is not None else None
        log.info("bigquery.check", connection=self.name, day=day, bytes=estimate)
        _, read_client = await self._clients()
        if query is None or read_client is None:
            return
        tables = list(getattr(job, "referenced_tables", None) or [])[:5]
        if not tables:
            log.info("bigquery.check_storage_skipped", connection=self.name,
                     reason="the dry run reported no table to open a read session on")
        for table in tables:
            await self._check_read_session(read_client, table)

    async def _check_read_session(self, read_client, table) -> None:
        from google.cloud.bigquery_storage_v1 import types

        def open_session():
            session = types.ReadSession(
                table=table.to_bqstorage(), data_format=types.DataFormat.ARROW,
                read_options=types.ReadSession.TableReadOptions(row_restriction="FALSE"))
            return read_client.create_read_session(parent=f"projects/{self.config.project}", read_session=session,
                                                   max_stream_count=1, timeout=60)
        name = f"{table.project}.{table.dataset_id}.{table.table_id}"
        try:
            session = await asyncio.to_thread(open_session)
            log.info("bigquery.check_read_session", connection=self.name, table=name, session=session.name)
        except Exception as exc:
            err = self._err(exc)
            if err.code == "accessDenied":
                raise err from exc
            log.warning("bigquery.check_read_session_failed", connection=self.name, table=name, error=str(err))

    async def result_schema(self, query: DayQuery, source: SourceInfo | None = None) -> pa.Schema | None:
        """The result's schema from a dry run (free; no row is read, no byte billed), in the Arrow
        types a fetch gives (STRUCT and ARRAY columns as JSON text); None when the dry run says no
        schema or a type has no Arrow form in the client library."""
        _, job = await self.estimate(query.sql, query, "schema", source)
        fields = getattr(job, "schema", None)
        if not fields:
            return None
        try:
            from google.cloud.bigquery import _pandas_helpers  # the library's own BigQuery -> Arrow types
            arrow = _pandas_helpers.bq_to_arrow_schema(fields)
        except Exception:  # a library without it, or a type it cannot say: the kernel reads a row instead
            return None
        if arrow is None:
            return None
        return pa.schema([pa.field(f.name, pa.string()) if _nested(f.type) else f for f in arrow])

    async def probe(self, query: DayQuery, source: SourceInfo | None = None) -> ProbeResult:
        client, _ = await self._clients()
        sql = self.PROBE.format(sql=query.sql)
        limit = self.limit_for(source)
        if limit is not None:
            estimate, _ = await self.estimate(sql, query, "probe", source)
            log.info("bigquery.estimate", connection=self.name, step="probe", source=source.name if source else None,
                     day=query.window.day.isoformat(), bytes=estimate, limit=limit)
            self._guard(estimate, limit, "probe", query, source)
        config = self._job_config(query, "probe", source, limit=limit)
        job_id = self._job_id("probe", source)
        timeout = self.config.job_timeout_seconds

        def run():
            job = self._start(client, sql, config, job_id)
            rows = list(job.result(timeout=timeout, retry=self._retry()))
            return rows[0] if rows else (0, None)

        try:
            row = await self._call(run)
        except asyncio.CancelledError:
            self._cancel_later(client, job_id)
            raise
        count, fp = row[0], row[1]
        return ProbeResult(int(count or 0), format(int(fp or 0) & 0xFFFFFFFFFFFFFFFF, "016x"))

    async def fetch(self, query: DayQuery, batch_rows: int,
                    source: SourceInfo | None = None) -> AsyncIterator[pa.RecordBatch]:
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        client, read_client = await self._clients()
        limit = self.limit_for(source)
        src = source.name if source else None
        day = query.window.day.isoformat()
        estimate, _ = await self.estimate(query.sql, query, "fetch", source)
        log.info("bigquery.estimate", connection=self.name, step="fetch", source=src, day=day, bytes=estimate,
                 limit=limit)
        self._guard(estimate, limit, "fetch", query, source)

        config = self._job_config(query, "fetch", source, limit=limit)
        job_id = self._job_id("fetch", source)
        page_size = self.config.page_size or batch_rows
        stats: dict[str, Any] = {"path": "rest", "rows": 0}

        def pages(job) -> Iterator[pa.RecordBatch]:
            rows = job.result(page_size=page_size, timeout=self.config.job_timeout_seconds, retry=self._retry())
            if read_client is None:
                yield from rows.to_arrow_iterable()
                return
            tracked = _TrackedReadClient(read_client)
            stream = rows.to_arrow_iterable(bqstorage_client=tracked, max_queue_size=self.config.max_stream_count,
                                            max_stream_count=self.config.max_stream_count)
            try:
                for batch in stream:
                    stats["path"] = "storage" if tracked.created else "rest"
                    yield batch
                return
            except Exception as exc:
                if tracked.created or tracked.error is None or exc is not tracked.error:
                    raise
                say = log.info if self._fallback_warned else log.warning  # once loud, then quiet
                self._fallback_warned = True
                say("bigquery.storage_fallback", connection=self.name, source=src, day=day,
                    error=str(self._err(exc)),
                    reason="no Storage Read API session; reading this load through REST pages")
            finally:
                stream.close()
            stats["path"] = "rest"
            yield from job.result(page_size=page_size, retry=self._retry()).to_arrow_iterable()

        def produce(out: Outlet) -> None:
            job = None
            try:
                job = self._start(client, query.sql, config, job_id)
                stats["job"] = job
                if out.stopped.is_set():  # closed while the job was being created
                    return
                # put_all closes the pages, so that Storage Read API workers stop with the stream
                out.put_all(rechunk((as_json_text(b) for b in pages(job)), batch_rows))
            except Exception as exc:
                raise self._err(exc) from exc
            finally:
                if out.stopped.is_set() and job is not None and job.state != "DONE":
                    self._cancel_later(client, job.job_id)

        # A job still running is cancelled when the stream stops, not when its thread sees it.
        stream = ThreadStream(produce, depth=QUEUE_DEPTH, interrupt=lambda: self._cancel_later(client, job_id),
                              name=f"ingestd-bigquery-{self.name}", join_seconds=JOIN_SECONDS)
        self._streams.add(stream)
        try:
            async with stream:
                async for batch in stream:
                    stats["rows"] += batch.num_rows
                    yield batch
        finally:
            self._streams.discard(stream)
        job = stats.get("job")
        log.info("bigquery.fetched", connection=self.name, source=src, day=day, rows=stats["rows"],
                 path=stats["path"], bytes=getattr(job, "total_bytes_processed", None),
                 bytes_billed=getattr(job, "total_bytes_billed", None), job_id=job_id)

    async def close(self) -> None:
        for stream in list(self._streams):
            stream.stop()
        client, read_client = self._client, self._read_client
        self._client, self._read_client, self._read_client_made = None, None, False

        def close_all():
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            if read_client is not None:
                with contextlib.suppress(Exception):
                    read_client.transport.close()
        await asyncio.to_thread(close_all)

