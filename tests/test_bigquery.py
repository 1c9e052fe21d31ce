"""The BigQuery connector with the real google-cloud-bigquery client against bqemulator on
loopback (started once for this module from `.venvs/bqemulator`, see tests/bqemulator.py).

What runs against the emulator: the conformance kit (REST pages, and again with the Storage
Read API switched on), DATE/TIMESTAMP parameters, probes and fingerprints, the type mapping, bad
queries and missing tables, access denied, and the daemon end to end through the `ingestd` CLI
(load, then a re-check that reloads a changed day).

What the emulator cannot show, and how it is covered instead:

- Cost: the emulator has no cost model. Its dry runs estimate 0 bytes, and it ignores
  `maximumBytesBilled`. The connector therefore enforces the limit itself from the dry-run
  estimate, before the query runs (it also sets the limit on the job, for BigQuery to enforce).
  To test that, a small recording HTTP proxy (tests/bqemulator.py) sits in front of the
  emulator's REST port and answers dry runs with a byte estimate, the way BigQuery does for a
  real table. Everything else in those answers comes from the emulator. The proxy also shows
  what the client sent (labels, parameters, the limit), which the emulator does not keep.
- Throttling and server failures (429, 500, 503, `rateLimitExceeded`, `backendError`) and
  BigQuery's own `bytesBilledLimitExceeded` job failure: the emulator never answers with them.
  They are tested on the exception objects google-api-core and google-cloud-bigquery raise for
  them, built the way the libraries build them. A real unreachable endpoint is tested too.
- Storage Read API: the emulator's gRPC Storage Read API serves tables. The connector's read
  client, pointed at that gRPC port without TLS, creates read sessions and reads a table through
  the library's Storage download path (the same `to_arrow_iterable` code a fetch uses). `check()`
  opens its read session there too. The emulator does not store query results as tables, so the
  read session that a fetch asks for on a query's (anonymous) result table is answered with
  NotFound. That shows the fetch really goes through the Storage Read API, and it tests the
  fallback: the rows are then read over REST pages, complete, with a warning. A fetch that
  reads query results through the Storage Read API from start to end could not be run here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import textwrap
import threading
import uuid
from decimal import Decimal

import duckdb
import pyarrow as pa
import pytest
from structlog.testing import capture_logs

import ingestd.plugins.bigquery as bigquery_plugin
from ingestd import PermanentError, Registry, SourceInfo, TransientError, build_model
from ingestd.core.models import ConfigErrors
from ingestd.core.query import DayWindow, render
from ingestd.core.schema import Mapping, RowMapper
from ingestd.plugins.bigquery import connector as bq
from ingestd.plugins.bigquery.connector import BigQueryConfig, BigQueryConnector, translate
from ingestd.testing import ConnectorSuite
from ingestd.testing.connector_suite import DAY, day_rows
from tests.bqemulator import PROJECT, bqemulator, recording_proxy  # noqa: F401  (bqemulator: the fixture)
from tests.support import ingestd, state_query

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")]


# -- helpers ---------------------------------------------------------------------------------------

def lit(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def new_dataset(client, prefix: str = "t") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    client.create_dataset(f"{PROJECT}.{name}")
    return name


def run(client, sql: str, params=None):
    from google.cloud import bigquery
    config = bigquery.QueryJobConfig(query_parameters=params or [])
    return list(client.query(sql, job_config=config).result())


def connector_for(emu, *, endpoint: str | None = None, **config) -> BigQueryConnector:
    config.setdefault("use_storage_api", False)
    config.setdefault("retry_seconds", 5.0)
    cfg = BigQueryConfig(project=PROJECT, anonymous=True, api_endpoint=endpoint or emu.endpoint,
                         storage_api_endpoint=emu.storage_endpoint, **config)
    return BigQueryConnector(cfg, name="bq")


def unreachable_connector(**config) -> BigQueryConnector:
    """A connector on a loopback port nobody listens on (the client's own retries off)."""
    from tests.bqemulator import free_port
    return BigQueryConnector(BigQueryConfig(project=PROJECT, anonymous=True, retry_seconds=0,
                                            api_endpoint=f"http://127.0.0.1:{free_port()}", **config), name="bq")


def day_query(table: str, day=DAY, where="ts >= {start} AND ts < {end}", columns="ts, user_id, event, value"):
    return render(f"SELECT {columns} FROM {table} WHERE {where}", DayWindow.of(day), "at", quote="`")


async def fetch_all(c, query, batch_rows=100, source=None):
    return [b async for b in c.fetch(query, batch_rows, source)]


class BQKitTable:
    """The kit's table in its own dataset of the emulator, written with DML."""

    def __init__(self, client):
        self.client = client
        self.dataset = new_dataset(client, "kit")
        self.table = f"{PROJECT}.{self.dataset}.kit_events"
        self.name = f"`{self.table}`"
        run(client, f"CREATE TABLE {self.name} (ts TIMESTAMP, user_id STRING, event STRING, value FLOAT64)")

    def _insert(self, rows):
        values = ", ".join(f"(TIMESTAMP '{ts:%Y-%m-%d %H:%M:%S}', {lit(u)}, {lit(e)}, {float(v)!r})"
                           for ts, u, e, v in rows)
        run(self.client, f"INSERT INTO {self.name} (ts, user_id, event, value) VALUES {values}")

    async def insert(self, rows):
        await asyncio.to_thread(self._insert, rows)

    async def update_value(self, user_id, value):
        from google.cloud import bigquery
        params = [bigquery.ScalarQueryParameter("v", "FLOAT64", value),
                  bigquery.ScalarQueryParameter("u", "STRING", user_id)]
        await asyncio.to_thread(run, self.client, f"UPDATE {self.name} SET value = @v WHERE user_id = @u", params)


@pytest.fixture(scope="module")
def bq_client(bqemulator):
    client = bqemulator.client()
    yield client
    client.close()


@pytest.fixture
def kit(bq_client):
    return BQKitTable(bq_client)


# -- the conformance kit -----------------------------------------------------------------------------

class TestBigQueryConnector(ConnectorSuite):
    """REST pages (tabledata) through `to_arrow_iterable`, page size = batch_rows."""

    @pytest.fixture
    def kit_table(self, kit):
        return kit

    @pytest.fixture
    async def connector(self, bqemulator):
        c = connector_for(bqemulator)
        yield c
        await c.close()

    @pytest.fixture
    def broken_connector(self):
        return unreachable_connector()


class TestBigQueryConnectorWithStorageApi(ConnectorSuite):
    """The same bar with the Storage Read API on (the emulator's gRPC port): results of more than
    one page ask for a read session, which the emulator cannot give for query results, so those
    loads fall back to REST pages (see the module docstring)."""

    batch_rows = 40

    @pytest.fixture
    def kit_table(self, kit):
        return kit

    @pytest.fixture
    async def connector(self, bqemulator):
        c = connector_for(bqemulator, use_storage_api=True, page_size=50)
        yield c
        await c.close()

    @pytest.fixture
    def broken_connector(self):
        return unreachable_connector(use_storage_api=True)


# -- plugin and config -------------------------------------------------------------------------------

def test_registers_the_bigquery_type_and_declares_its_api():
    registry = Registry()
    bigquery_plugin.ingestd_register(registry)
    assert registry.connectors["bigquery"] is BigQueryConnector
    assert bigquery_plugin.INGESTD_API == (2, 2)
    caps = BigQueryConnector.capabilities
    assert (caps.fingerprint, caps.paramstyle, caps.quote) == (True, "at", "`")


def test_config_defaults_and_bad_keys(tmp_path):
    (tmp_path / "daemon.toml").write_text("")
    cfg = build_model(BigQueryConfig, {"project": "p"}, "connections.bq")
    assert (cfg.location, cfg.default_dataset, cfg.credentials_file, cfg.maximum_bytes_billed,
            cfg.use_storage_api, cfg.max_stream_count, cfg.anonymous) == (None, None, None, None, True, 1, False)
    bad = [
        ({"project": "p", "api_endpoint": "127.0.0.1:9050"}, "connections.bq.api_endpoint"),
        ({"project": "p", "anonymous": True, "credentials_file": "key.json"}, "connections.bq.anonymous"),
        ({"project": "p", "maximum_bytes_billed": 0}, "connections.bq.maximum_bytes_billed"),
        ({"project": "p", "maximum_bytes_billed_by_source": {"orders": 0}},
         "connections.bq.maximum_bytes_billed_by_source.orders"),
        ({"project": "p", "impersonation_delegates": ["a@b"]}, "connections.bq.impersonation_delegates"),
        ({"project": "p", "default_dataset": "a b"}, "connections.bq.default_dataset"),
        ({"project": "p", "nope": 1}, "connections.bq.nope"),
        ({}, "connections.bq.project"),
    ]
    for table, key in bad:
        with pytest.raises(ConfigErrors) as err:
            build_model(BigQueryConfig, table, "connections.bq")
        assert key in str(err.value), (table, str(err.value))


def test_credentials_file_impersonation_and_their_errors(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.auth import impersonated_credentials
    from google.oauth2 import service_account

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = tmp_path / "key.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "p", "private_key_id": "k1", "private_key": pem,
        "client_email": "loader@p.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token"}))

    def conn(**kw):
        return BigQueryConnector(BigQueryConfig(project="p", **kw), name="bq")

    creds = conn(credentials_file=path).credentials()
    assert isinstance(creds, service_account.Credentials)
    assert creds.service_account_email == "loader@p.iam.gserviceaccount.com"
    assert "https://www.googleapis.com/auth/cloud-platform" in creds.scopes

    imp = conn(credentials_file=path, impersonate_service_account="reader@p.iam.gserviceaccount.com").credentials()
    assert isinstance(imp, impersonated_credentials.Credentials)
    assert imp.service_account_email == "reader@p.iam.gserviceaccount.com"

    with pytest.raises(PermanentError, match="nowhere.json does not exist"):
        conn(credentials_file=tmp_path / "nowhere.json").credentials()
    (tmp_path / "bad.json").write_text('{"type": "authorized_user"}')
    with pytest.raises(PermanentError, match="not a service-account JSON key"):
        conn(credentials_file=tmp_path / "bad.json").credentials()
    assert conn().credentials() is None, "no key file: Application Default Credentials (the client's default)"


def test_a_missing_google_cloud_bigquery_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.cloud.bigquery", None)
    with pytest.raises(PermanentError, match=r"pip install 'ingestd\[bigquery\]'"):
        bq._bigquery()


def test_labels_are_sanitised_to_what_bigquery_accepts():
    labels = bq.job_labels("Main WH", "fetch", SourceInfo("Orders.EU/Daily"), {"Team": "Growth Analytics", "9x": "y"})
    assert labels == {"team": "growth_analytics", "l_9x": "y", "app": "ingestd", "ingestd_connection": "main_wh",
                      "ingestd_step": "fetch", "ingestd_source": "orders_eu_daily"}
    assert len(bq.sanitize_label("x" * 100)) == 63


def test_day_values_become_date_and_utc_timestamp_parameters():
    q = render("SELECT 1 FROM t WHERE d = {day} AND ts >= {start} AND ts < {end}",
               DayWindow.of(dt.date(2026, 3, 29), "Europe/Berlin"), "at", quote="`")
    assert q.sql == "SELECT 1 FROM t WHERE d = @day AND ts >= @start AND ts < @end"
    params = {p.name: p for p in bq.query_parameters(q.params)}
    assert (params["day"].type_, params["day"].value) == ("DATE", dt.date(2026, 3, 29))
    assert params["start"].type_ == "TIMESTAMP"
    assert params["start"].value == dt.datetime(2026, 3, 28, 23, 0, tzinfo=dt.UTC)
    assert params["end"].value == dt.datetime(2026, 3, 29, 22, 0, tzinfo=dt.UTC)  # the DST day has 23 hours
    assert params["start"].to_api_repr()["parameterValue"]["value"] == "2026-03-28 23:00:00+00:00"


# -- against the emulator: parameters, labels, cost guard ------------------------------------------------

async def test_jobs_carry_labels_parameters_limit_and_default_dataset(bqemulator, kit):
    await kit.insert(day_rows(DAY, 30))
    with recording_proxy(bqemulator) as proxy:
        c = connector_for(bqemulator, endpoint=proxy.endpoint, maximum_bytes_billed=10**9, location="US",
                          default_dataset=kit.dataset, labels={"Team": "Growth"})
        query = day_query("kit_events")  # unqualified: resolved in default_dataset
        source = SourceInfo("Orders.EU")
        assert (await c.probe(query, source)).rows == 30
        assert sum(b.num_rows for b in await fetch_all(c, query, 100, source)) == 30
        await c.close()
    jobs = proxy.jobs()
    runs = [j for j in jobs if not j.get("dryRun")]
    dry = [j for j in jobs if j.get("dryRun")]
    assert len(runs) == 2 and len(dry) == 2, "probe and fetch each: one dry run (the estimate), one job"
    for j in jobs:
        step = j["labels"]["ingestd_step"]
        assert j["labels"] == {"app": "ingestd", "ingestd_connection": "bq", "ingestd_source": "orders_eu",
                               "ingestd_step": step, "team": "growth"}
        assert j["query"]["defaultDataset"] == {"projectId": PROJECT, "datasetId": kit.dataset}
        assert j["query"]["useLegacySql"] is False
        params = {p["name"]: (p["parameterType"]["type"], p["parameterValue"]["value"])
                  for p in j["query"]["queryParameters"]}
        assert params == {"start": ("TIMESTAMP", "2026-03-10 00:00:00+00:00"),
                          "end": ("TIMESTAMP", "2026-03-11 00:00:00+00:00")}
    assert {j["labels"]["ingestd_step"] for j in runs} == {"probe", "fetch"}
    assert all(j["query"]["maximumBytesBilled"] == str(10**9) for j in runs)
    probe_job = next(j for j in runs if j["labels"]["ingestd_step"] == "probe")
    assert "FARM_FINGERPRINT(TO_JSON_STRING(q))" in probe_job["query"]["query"]


async def test_a_query_estimated_over_maximum_bytes_billed_fails_before_it_runs(bqemulator, kit):
    """Enforced by the connector from the dry-run estimate (the emulator estimates through the
    proxy and does not enforce the limit itself)."""
    await kit.insert(day_rows(DAY, 30))
    query = day_query(kit.name)
    with recording_proxy(bqemulator) as proxy:
        proxy.dry_run_bytes = 5_000_000
        c = connector_for(bqemulator, endpoint=proxy.endpoint, maximum_bytes_billed=1_000_000,
                          maximum_bytes_billed_by_source={"big": 10_000_000})
        with capture_logs() as logs, pytest.raises(PermanentError) as err:
            await fetch_all(c, query, 100, SourceInfo("orders"))
        assert err.value.code == "bytesBilledLimitExceeded"
        message = str(err.value)
        assert "source orders for 2026-03-10 would process 5.0 MB (5000000 bytes)" in message
        assert "more than maximum_bytes_billed = 1000000" in message and "it was not run" in message
        estimate = next(e for e in logs if e["event"] == "bigquery.estimate")
        assert (estimate["source"], estimate["day"], estimate["bytes"]) == ("orders", "2026-03-10", 5_000_000)

        with pytest.raises(PermanentError, match="the probe query of source orders"):
            await c.probe(query, SourceInfo("orders"))
        assert not [j for j in proxy.jobs() if not j.get("dryRun")], "no query ran"

        # a source with a higher limit of its own runs, and its estimate is logged
        with capture_logs() as logs:
            assert (await c.probe(query, SourceInfo("big"))).rows == 30
            assert sum(b.num_rows for b in await fetch_all(c, query, 100, SourceInfo("big"))) == 30
        estimates = [(e["step"], e["source"], e["day"], e["bytes"], e["limit"])
                     for e in logs if e["event"] == "bigquery.estimate"]
        assert estimates == [("probe", "big", "2026-03-10", 5_000_000, 10_000_000),
                             ("fetch", "big", "2026-03-10", 5_000_000, 10_000_000)]
        assert {j["query"]["maximumBytesBilled"] for j in proxy.jobs() if not j.get("dryRun")} == {"10000000"}
        await c.close()


# -- against the emulator: errors ------------------------------------------------------------------------

async def test_a_missing_table_is_a_permanent_error_naming_it(bqemulator, kit):
    c = connector_for(bqemulator)
    query = day_query(f"`{PROJECT}.{kit.dataset}.no_such_table`")
    for call in (lambda: c.check(query), lambda: c.probe(query), lambda: fetch_all(c, query)):
        with pytest.raises(PermanentError) as err:
            await call()
        assert err.value.code == "notFound"
        assert f"Table {PROJECT}.{kit.dataset}.no_such_table was not found" in str(err.value)
        assert "Job ID" not in str(err.value) and "\n" not in str(err.value)
    await c.close()


async def test_a_bad_query_is_a_permanent_error_with_bigquerys_message(bqemulator, kit):
    c = connector_for(bqemulator)
    bad = render(f"SELEC ts FROM {kit.name} WHERE ts >= {{start}}", DayWindow.of(DAY), "at", quote="`")
    for call in (lambda: c.check(bad), lambda: c.probe(bad), lambda: fetch_all(c, bad)):
        with pytest.raises(PermanentError) as err:
            await call()
        assert err.value.code == "invalidQuery"
        assert str(err.value).startswith("[invalidQuery] BigQuery refused the query: Syntax error")
    column = day_query(kit.name, columns="no_such_column")
    with pytest.raises(PermanentError, match="no_such_column") as err:
        await c.check(column)
    assert err.value.code == "invalidQuery" and "LINE" not in str(err.value)
    await c.close()


async def test_access_denied_names_the_role_to_grant(bqemulator):
    """The emulator answers accessDenied for a table in a project id BigQuery could not have."""
    c = connector_for(bqemulator)
    query = day_query("`Bad--Project.ds.events`")
    with pytest.raises(PermanentError) as err:
        await c.check(query)
    assert err.value.code == "accessDenied"
    assert "data viewer role" in str(err.value) and "roles/bigquery.dataViewer" in str(err.value)
    assert "User does not have permission to query table" in str(err.value)
    await c.close()


async def test_an_unreachable_endpoint_is_a_transient_error():
    c = unreachable_connector()
    with pytest.raises(TransientError) as err:
        await c.check()
    assert err.value.code == "connection" and "cannot reach BigQuery at http://127.0.0.1:" in str(err.value)
    await c.close()


def _api_exceptions():
    from google.api_core import exceptions as gexc
    from google.cloud.bigquery.job.base import _error_result_to_exception  # how QueryJob.result() raises
    return gexc, _error_result_to_exception


@pytest.mark.parametrize("make, code", [
    (lambda g, job: g.TooManyRequests("Too many requests"), "429"),
    (lambda g, job: g.InternalServerError("Internal error"), "500"),
    (lambda g, job: g.ServiceUnavailable("The service is currently unavailable"), "503"),
    (lambda g, job: g.Forbidden("Exceeded rate limits: too many table update operations",
                                errors=[{"reason": "rateLimitExceeded", "message": "Exceeded rate limits"}]),
     "rateLimitExceeded"),
    (lambda g, job: job({"reason": "rateLimitExceeded", "message": "Exceeded rate limits"}), "rateLimitExceeded"),
    (lambda g, job: job({"reason": "backendError", "message": "Backend error. Retry the job."}), "backendError"),
    (lambda g, job: job({"reason": "internalError", "message": "An internal error occurred"}), "internalError"),
    (lambda g, job: g.RetryError("Deadline of 60.0s exceeded", cause=g.ServiceUnavailable("unavailable")), "503"),
    (lambda g, job: g.DeadlineExceeded("Deadline Exceeded"), "504"),
], ids=["429", "500", "503", "403-rateLimitExceeded", "job-rateLimitExceeded", "job-backendError",
        "job-internalError", "retry-deadline", "grpc-deadline"])
def test_throttling_and_server_errors_are_transient(make, code):
    """The emulator never throttles or fails this way: these are the exception objects the
    libraries raise for such answers."""
    gexc, job = _api_exceptions()
    err = translate(make(gexc, job), project="p")
    assert isinstance(err, TransientError), err
    assert err.code == code


@pytest.mark.parametrize("make, code, words", [
    (lambda g, job: job({"reason": "bytesBilledLimitExceeded",
                         "message": "Query exceeded limit for bytes billed: 1000000. 10485760 or higher required."}),
     "bytesBilledLimitExceeded", "would bill more bytes than maximum_bytes_billed allows"),
    (lambda g, job: job({"reason": "invalidQuery", "message": "Unrecognized name: foo at [1:8]"}),
     "invalidQuery", "Unrecognized name: foo"),
    (lambda g, job: g.NotFound("Not found: Table p:d.t",
                               errors=[{"reason": "notFound", "message": "Not found: Table p:d.t"}]),
     "notFound", "Not found: Table p:d.t"),
    (lambda g, job: g.Forbidden("Access Denied: Project p: User does not have bigquery.jobs.create permission in "
                                "project p.",
                                errors=[{"reason": "accessDenied", "message": "Access Denied: Project p: User does "
                                         "not have bigquery.jobs.create permission in project p."}]),
     "accessDenied", "job user role — grant roles/bigquery.jobUser on project p"),
    (lambda g, job: g.PermissionDenied("request failed: the user does not have 'bigquery.readsessions.create' "
                                       "permission for 'projects/p'"),
     "accessDenied", "read session user role — grant roles/bigquery.readSessionUser on project p"),
    (lambda g, job: g.BadRequest("Invalid value", errors=[{"reason": "invalid", "message": "Invalid value"}]),
     "invalid", "BigQuery refused the request"),
], ids=["bytesBilledLimitExceeded", "invalidQuery", "notFound", "no-job-user", "no-read-session-user", "invalid"])
def test_query_and_permission_errors_are_permanent_with_the_reason(make, code, words):
    gexc, job = _api_exceptions()
    exc = make(gexc, job)
    err = translate(exc, project="p")
    assert isinstance(err, PermanentError), err
    assert err.code == code
    assert words in str(err)


def test_credential_and_transport_errors():
    import requests
    from google.auth import exceptions as auth
    assert isinstance(translate(requests.exceptions.ConnectionError("Connection refused")), TransientError)
    assert isinstance(translate(auth.TransportError("token endpoint unreachable")), TransientError)
    missing = translate(auth.DefaultCredentialsError("Your default credentials were not found."))
    assert isinstance(missing, PermanentError) and "credentials_file" in str(missing)
    assert isinstance(translate(auth.RefreshError("invalid_grant: Invalid JWT Signature.")), PermanentError)


# -- against the emulator: types ---------------------------------------------------------------------------

TYPES_DDL = """CREATE TABLE {t} (i INT64, n NUMERIC, bn BIGNUMERIC, f FLOAT64, b BOOL, s STRING, d DATE,
    dtm DATETIME, ts TIMESTAMP, j JSON, st STRUCT<a INT64, b STRING>, ar ARRAY<INT64>)"""
TYPES_ROWS = """INSERT INTO {t} VALUES
    (7, NUMERIC '12345.678', BIGNUMERIC '1234567890123456789012345.5', 1.5, TRUE, 'héllo', DATE '2026-03-10',
     DATETIME '2026-03-10 12:34:56.789', TIMESTAMP '2026-03-10 12:34:56.789+00', JSON '{{"k": [1, 2], "s": "x"}}',
     STRUCT(7 AS a, 'z' AS b), [1, 2, 3]),
    (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, [])"""


async def test_types_arrive_as_arrow_types_and_map_to_the_schema(bqemulator, bq_client):
    """NUMERIC/BIGNUMERIC values are ones the emulator stores exactly (it keeps NUMERIC as
    DECIMAL(18,3) and BIGNUMERIC as DECIMAL(38,5), and reports BIGNUMERIC and JSON columns as
    NUMERIC and STRING in table schemas); the Arrow types are what the client makes of them."""
    ds = new_dataset(bq_client, "types")
    table = f"`{PROJECT}.{ds}.types`"
    run(bq_client, TYPES_DDL.format(t=table))
    run(bq_client, TYPES_ROWS.format(t=table))
    c = connector_for(bqemulator)
    query = render(f"SELECT * FROM {table} WHERE ts >= {{start}} AND ts < {{end}} OR ts IS NULL",
                   DayWindow.of(DAY), "at", quote="`")
    batches = await fetch_all(c, query, 10)
    await c.close()
    assert len(batches) == 1 and batches[0].num_rows == 2
    batch = batches[0]
    types = {f.name: f.type for f in batch.schema}
    assert types["i"] == pa.int64() and types["f"] == pa.float64() and types["b"] == pa.bool_()
    assert pa.types.is_decimal(types["n"]) and pa.types.is_decimal(types["bn"])
    assert types["s"] == pa.string() and types["d"] == pa.date32()
    assert types["dtm"] == pa.timestamp("us"), "DATETIME: a timestamp without zone"
    assert types["ts"] == pa.timestamp("us", tz="UTC")
    assert types["j"] == types["st"] == types["ar"] == pa.string(), "JSON, STRUCT and ARRAY as JSON text"
    row, empty = batch.to_pylist()
    assert row["i"] == 7 and row["n"] == Decimal("12345.678") and row["bn"] == Decimal("1234567890123456789012345.5")
    assert row["f"] == 1.5 and row["b"] is True and row["s"] == "héllo" and row["d"] == dt.date(2026, 3, 10)
    assert row["dtm"] == dt.datetime(2026, 3, 10, 12, 34, 56, 789000)
    assert row["ts"] == dt.datetime(2026, 3, 10, 12, 34, 56, 789000, tzinfo=dt.UTC)
    assert json.loads(row["j"]) == {"k": [1, 2], "s": "x"}
    assert json.loads(row["st"]) == {"a": 7, "b": "z"} and json.loads(row["ar"]) == [1, 2, 3]
    assert empty["st"] is None and empty["j"] is None and empty["ar"] == "[]"

    window = DayWindow.of(DAY)
    now = dt.datetime(2026, 3, 11, tzinfo=dt.UTC)
    for ts_column in ("ts", "dtm"):
        mapper = RowMapper("events", Mapping(timestamp=ts_column, event_name="s", event_value="n", ids={"user_id": "i"},
                                             metadata=["b", "f", "d", "bn", "st", "ar"], metadata_json="j"),
                           window, source="bq_types", generation=1, ingested_at=now)
        mapped = mapper.map(batch)
        mapper.close()
        assert dict(mapped.rejects) == {"missing_timestamp": 1}
        event = mapped.rows.to_pylist()[0]
        assert event["timestamp"] == dt.datetime(2026, 3, 10, 12, 34, 56, 789000, tzinfo=dt.UTC)
        assert (event["event_name"], event["unit_id"], json.loads(event["ids"])) == ("héllo", "7", {"user_id": "7"})
        assert Decimal(event["event_value"]) == Decimal("12345.678")
        meta = json.loads(event["metadata"])
        assert meta["k"] == [1, 2] and meta["s"] == "x", "the JSON column is unpacked one level"
        assert meta["b"] is True and meta["f"] == 1.5 and meta["d"] == "2026-03-10"
        assert json.loads(meta["st"]) == {"a": 7, "b": "z"} and json.loads(meta["ar"]) == [1, 2, 3]

    mapper = RowMapper("metrics", Mapping(date="d", metric_name="s", metric_value="n", ids={"user_id": "i"},
                                          numerator="bn", denominator="f"),
                       window, source="bq_types", generation=1, ingested_at=now)
    mapped = mapper.map(batch)
    mapper.close()
    metric = mapped.rows.to_pylist()[0]
    assert metric["metric_value"] == pytest.approx(1234567890123456789012345.5 / 1.5)
    assert metric["numerator"] == pytest.approx(1.2345678901234568e24) and metric["denominator"] == 1.5


# -- against the emulator: streaming and the Storage Read API ------------------------------------------------

async def test_fetch_rechunks_pages_into_batches_of_batch_rows(bqemulator, kit):
    await kit.insert(day_rows(DAY, 230))
    c = connector_for(bqemulator, page_size=70)  # pages of 70 rows, batches of 100
    batches = await fetch_all(c, day_query(kit.name), 100)
    assert [b.num_rows for b in batches] == [100, 100, 30]
    assert len({b.schema for b in batches}) == 1
    c2 = connector_for(bqemulator)  # page size = batch rows
    assert [b.num_rows for b in await fetch_all(c2, day_query(kit.name), 100)] == [100, 100, 30]
    await c.close()
    await c2.close()


async def test_closing_a_fetch_stops_its_worker_thread(bqemulator, kit):
    await kit.insert(day_rows(DAY, 300))
    c = connector_for(bqemulator, page_size=10)
    stream = c.fetch(day_query(kit.name), 10)
    assert (await anext(stream)).num_rows == 10
    await stream.aclose()
    alive = [t.name for t in threading.enumerate() if t.name.startswith("ingestd-bigquery-bq")]
    assert alive == [], "the worker thread is stopped once the stream is closed"
    assert (await c.probe(day_query(kit.name))).rows == 300
    await c.close()


async def test_a_cancelled_probe_or_fetch_cancels_its_job(bqemulator, kit):
    """A slow job (the proxy holds getQueryResults for 3 s): cancelling the task that waits for
    it asks BigQuery to cancel the job at once, and the task ends without waiting for the job."""
    import time
    await kit.insert(day_rows(DAY, 10))
    query = day_query(kit.name)
    with recording_proxy(bqemulator) as proxy:
        proxy.delay_match, proxy.delay_seconds = "/queries/", 3.0
        c = connector_for(bqemulator, endpoint=proxy.endpoint)
        for step, call in (("probe", lambda: c.probe(query)), ("fetch", lambda: fetch_all(c, query))):
            before = len(proxy.job_ids())
            task = asyncio.create_task(call())
            for _ in range(200):
                if len(proxy.job_ids()) > before:
                    break
                await asyncio.sleep(0.02)
            job_id = proxy.job_ids()[-1]
            assert f"_{step}_" in job_id
            await asyncio.sleep(0.2)  # the client is now waiting for the job's results
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(100):
                if job_id in proxy.cancelled():
                    break
                await asyncio.sleep(0.02)
            assert job_id in proxy.cancelled(), f"the {step} job was not cancelled"
            assert time.monotonic() - started < 5.0
        proxy.delay_match = None
        assert (await c.probe(query)).rows == 10, "the connector is still usable"
        await c.close()


async def test_the_storage_read_client_reads_a_table_from_the_emulators_grpc_port(bqemulator, kit, bq_client):
    await kit.insert(day_rows(DAY, 120))
    c = connector_for(bqemulator, use_storage_api=True)
    _, read_client = await c._clients()
    tracked = bq._TrackedReadClient(read_client)
    rows = bq_client.list_rows(kit.table, page_size=50)

    def read():
        return list(rows.to_arrow_iterable(bqstorage_client=tracked, max_queue_size=1, max_stream_count=1))
    batches = await asyncio.to_thread(read)
    assert tracked.created, "the rows came through a Storage Read API session"
    assert sum(b.num_rows for b in batches) == 120
    assert batches[0].schema.field("ts").type == pa.timestamp("us", tz="UTC")
    await c.close()


async def test_a_fetch_asks_for_a_read_session_and_falls_back_to_rest_pages(bqemulator, kit):
    await kit.insert(day_rows(DAY, 120) + [(dt.datetime(2026, 3, 9, 12), "before", "click", 1.0)])
    c = connector_for(bqemulator, use_storage_api=True, page_size=50)
    with capture_logs() as logs:
        first = await fetch_all(c, day_query(kit.name), 50, SourceInfo("orders"))
        second = await fetch_all(c, day_query(kit.name), 50, SourceInfo("orders"))
    await c.close()
    assert [b.num_rows for b in first] == [b.num_rows for b in second] == [50, 50, 20]
    assert {u for b in first for u in b.column("user_id").to_pylist()} == {r[1] for r in day_rows(DAY, 120)}
    fallbacks = [e for e in logs if e["event"] == "bigquery.storage_fallback"]
    assert [e["log_level"] for e in fallbacks] == ["warning", "info"], "warned once per connection"
    assert "_bqemu_anonymous" in fallbacks[0]["error"], "the read session was asked for the query's result table"
    fetched = [e for e in logs if e["event"] == "bigquery.fetched"]
    assert [(e["path"], e["rows"]) for e in fetched] == [("rest", 120), ("rest", 120)]


async def test_a_one_page_result_is_read_over_rest_without_a_read_session(bqemulator, kit):
    await kit.insert(day_rows(DAY, 20))
    c = connector_for(bqemulator, use_storage_api=True)
    with capture_logs() as logs:
        assert sum(b.num_rows for b in await fetch_all(c, day_query(kit.name), 100)) == 20
    await c.close()
    assert not [e for e in logs if e["event"] == "bigquery.storage_fallback"]


async def test_check_opens_a_read_session_on_the_tables_the_dry_run_names(bqemulator, kit):
    with recording_proxy(bqemulator) as proxy:
        proxy.dry_run_tables = [{"projectId": PROJECT, "datasetId": kit.dataset, "tableId": "kit_events"}]
        c = connector_for(bqemulator, endpoint=proxy.endpoint, use_storage_api=True)
        with capture_logs() as logs:
            await c.check(day_query(kit.name))
        await c.close()
    opened = [e for e in logs if e["event"] == "bigquery.check_read_session"]
    assert [e["table"] for e in opened] == [kit.table]
    assert opened[0]["session"].startswith(f"projects/{PROJECT}/locations/")


async def test_without_the_storage_package_rows_come_over_rest(bqemulator, kit, monkeypatch):
    monkeypatch.setattr(bq, "_storage", lambda: None)
    await kit.insert(day_rows(DAY, 120))
    c = connector_for(bqemulator, use_storage_api=True, page_size=50)
    with capture_logs() as logs:
        assert sum(b.num_rows for b in await fetch_all(c, day_query(kit.name), 50)) == 120
    await c.close()
    warned = [e for e in logs if e["event"] == "bigquery.storage_unavailable"]
    assert len(warned) == 1 and "pip install 'ingestd[bigquery]'" in warned[0]["reason"]


# -- end to end: the daemon loads a BigQuery source into the DuckDB sink ----------------------------------------

D = dt.date(2026, 11, 20)


def e2e_config(folder, emu, dataset: str, query: str) -> object:
    text = f"""
    [daemon]
    state_path = "state.db"
    batch_rows = 100
    retry_attempts = 2
    retry_base_seconds = 0.05
    retry_max_seconds = 0.2

    [bus]
    enabled = false

    [sinks.main]
    type = "duckdb"
    path = "analytics.duckdb"

    [connections.bq]
    type = "bigquery"
    project = "{PROJECT}"
    anonymous = true
    api_endpoint = "{emu.endpoint}"
    storage_api_endpoint = "{emu.storage_endpoint}"
    default_dataset = "{dataset}"
    maximum_bytes_billed = 1_000_000_000
    labels = {{ team = "growth" }}
    retry_seconds = 5.0

    [sources.orders]
    connection = "bq"
    kind = "events"
    query = "{query}"
    schedule = ["0 6 * * *"]
    lag_days = 1

    [sources.orders.recheck]
    schedule = ["0 18 * * *"]
    lookback_days = 1
    detect = "checksum"

    [sources.orders.mapping]
    timestamp = "ts"
    event_name = "event"
    event_value = "value"
    ids = {{ user_id = "user_id" }}
    metadata_json = "props"
    """
    path = folder / "daemon.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_the_daemon_loads_a_bigquery_day_and_reloads_it_when_it_changed(tmp_path, bqemulator, bq_client):
    ds = new_dataset(bq_client, "e2e")
    table = f"`{PROJECT}.{ds}.events_raw`"
    run(bq_client, f"CREATE TABLE {table} (ts TIMESTAMP, user_id STRING, event STRING, value STRING, props JSON)")
    run(bq_client, f"""INSERT INTO {table}
        SELECT TIMESTAMP_ADD(TIMESTAMP '{D} 00:00:00+00', INTERVAL i * 287 SECOND), CONCAT('u', CAST(i AS STRING)),
               'click', CAST(i AS STRING), JSON '{{"k": 1}}'
        FROM UNNEST(GENERATE_ARRAY(0, 299)) AS i""")
    run(bq_client, f"INSERT INTO {table} VALUES "
                   f"(TIMESTAMP '{D - dt.timedelta(days=1)} 23:59:59+00', 'before', 'click', '1', NULL)")
    cfg = e2e_config(tmp_path, bqemulator, ds, "SELECT ts, user_id, event, value, props FROM events_raw "
                                               "WHERE ts >= {start} AND ts < {end}")
    sink = tmp_path / "analytics.duckdb"

    def partition():
        rows = state_query(tmp_path / "state.db", "SELECT status, generation, rows FROM partitions "
                                                  "WHERE source = 'orders' AND day = ?", (D.isoformat(),))
        return rows[0] if rows else None

    def sink_rows():
        with duckdb.connect(str(sink), read_only=True) as con:
            return con.execute("SELECT unit_id, event_value, metadata, generation FROM events WHERE source = 'orders' "
                               "AND day = ? ORDER BY unit_id", [D]).fetchall()

    out = ingestd("run", "--once", "--now", f"{D + dt.timedelta(days=1)}T06:05:00+00:00", config=cfg, check=True)
    assert partition() == ("succeeded", 1, 300), out.stdout
    loaded = sink_rows()
    assert len(loaded) == 300 and {r[3] for r in loaded} == {1}
    assert json.loads(loaded[0][2]) == {"k": 1}
    estimates = [json.loads(line) for line in out.stdout.splitlines() if '"bigquery.estimate"' in line]
    assert any(e["source"] == "orders" and e["day"] == D.isoformat() and e["bytes"] == 0 and e["step"] == "fetch"
               for e in estimates), out.stdout

    # issue 16: a preview's row limit runs in BigQuery (LIMIT on the wrapped day query)
    out = ingestd("preview", "orders", "--day", D.isoformat(), "--rows", "7", "--json", config=cfg)
    p = json.loads(out.stdout)
    assert (p["rows_read"], p["mapped"], p["limit"], p["ok"]) == (7, 7, "in the warehouse", True), out.stderr
    assert p["rows"][0]["metadata"] == {"k": 1}

    run(bq_client, f"UPDATE {table} SET value = 'changed' WHERE user_id = 'u7'")  # same count, new content
    out = ingestd("run", "--once", "--now", f"{D + dt.timedelta(days=1)}T18:05:00+00:00", config=cfg, check=True)
    assert '"schema.changed"' not in out.stdout, "the dry run's schema must be the schema the load stored"
    assert partition() == ("succeeded", 2, 300), out.stdout
    reloaded = dict((r[0], (r[1], r[3])) for r in sink_rows())
    assert len(reloaded) == 300 and reloaded["u7"] == ("changed", 2) and reloaded["u8"] == ("8", 2)
    runs = state_query(tmp_path / "state.db", "SELECT trigger, status FROM runs WHERE day = ? ORDER BY started_at",
                       (D.isoformat(),))
    assert runs == [("scheduled", "succeeded"), ("recheck", "succeeded")]

    out = ingestd("run", "--once", "--now", f"{D + dt.timedelta(days=1)}T18:35:00+00:00", config=cfg, check=True)
    assert partition() == ("succeeded", 2, 300), "an unchanged day is not reloaded"


def test_ingestd_check_names_a_missing_table(tmp_path, bqemulator, bq_client):
    ds = new_dataset(bq_client, "chk")
    cfg = e2e_config(tmp_path, bqemulator, ds, "SELECT ts, user_id, event, value, props FROM no_such_events "
                                               "WHERE ts >= {start} AND ts < {end}")
    out = ingestd("check", config=cfg)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED orders: connection bq: [notFound]" in out.stdout
    assert f"Table {PROJECT}.{ds}.no_such_events was not found" in out.stdout
