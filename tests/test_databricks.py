"""The Databricks connector with the real databricks-sql-connector (Thrift backend) over a real
HTTPS connection, against Apache Spark's Thrift server (tests/spark_thrift.py, started once per
test session from `.venvs/pyspark`) through tests/databricks_proxy.py, which patches exactly the
protocol fields Spark answers differently from a Databricks SQL warehouse (listed there). The
proxy's certificate is self-signed, made by the test, and trusted through `tls_ca_file`.

What runs for real: the conformance kit, loads of an events and a metrics source from a
day-partitioned table through the `ingestd` CLI, native parameters (a quote in a value), probes
and fingerprints (a changed value at the same count reloads), `check()` for a refused token, a
wrong http_path, a missing table or column and bad SQL, OAuth M2M and a credentials provider, a
warehouse answering 503 while it starts, the server killed mid-fetch (the load is retried and
completes once it is back), the type mapping, query tags and user agent, cancellation.

What Spark cannot show, and how it is covered instead:

- Unity Catalog privileges (no USE CATALOG, no SELECT) and a missing catalog: Spark has no grants
  and one catalog. `translate` gets the driver's own `ServerOperationError`, built as the driver
  builds it, with the messages Databricks sends.
- The OAuth token endpoint and the 403 of a refused token are answered by the proxy in
  Databricks' shapes (Spark has no tokens); the driver's own requests go through them.
- TIMESTAMP_NTZ: Spark's Thrift server sends TIMESTAMP and TIMESTAMP_NTZ alike as wall-clock
  text of the session time zone, so the proxy cannot tell them apart and sends both as
  TIMESTAMP in that zone. The server-side comparison of NTZ columns with {start}/{end} runs for
  real; reading a naive (NTZ) Arrow column is tested on `normalize` directly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import uuid
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import ingestd.plugins.databricks as databricks_plugin
from ingestd import PermanentError, Registry, SourceInfo, TransientError, build_model
from ingestd.core.models import ConfigErrors
from ingestd.core.query import DayWindow, render
from ingestd.core.schema import Mapping, RowMapper
from ingestd.plugins.databricks import connector as dbx
from ingestd.plugins.databricks.connector import DatabricksConfig, DatabricksConnector, normalize, translate
from ingestd.testing import ConnectorSuite
from tests.databricks_proxy import DatabricksProxy
from tests.spark_thrift import free_port, spark_server  # noqa: F401  (spark_server: the session fixture)
from tests.support import ROOT, cli_env, ingestd, sink_rows, state_query

TOKEN = "dapi-ingestd-test-token"
DAY = dt.date(2026, 3, 10)
PLUGIN_FILE = Path(dbx.__file__)


def driver():
    try:
        from databricks import sql
    except ImportError:
        pytest.fail("databricks-sql-connector is not installed: ./scripts/test installs it "
                    "(pip install -e '.[test,all]')", pytrace=False)
    return sql


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (and its key), made for this module."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ingestd test warehouse")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def proxy(spark_server, tls):  # noqa: F811
    p = DatabricksProxy(spark_server.port, tls_cert=tls[0], tls_key=tls[1], tokens={TOKEN},
                        oauth_clients={"sp-ingestd": "sp-secret"}).start()
    yield p
    p.stop()
    assert not p.errors, "the proxy failed:\n" + "\n".join(p.errors)


@pytest.fixture
def admin(proxy, tls):
    """A plain driver connection through the proxy, to create and fill tables (per test: the
    fault test kills the server, and its sessions with it)."""
    con = driver().connect(server_hostname="127.0.0.1", _port=proxy.port, http_path=proxy.path, access_token=TOKEN,
                           _tls_trusted_ca_file=str(tls[0]), enable_telemetry=False,
                           _retry_stop_after_attempts_duration=30)
    yield con
    with _quiet():
        con.close()


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def run(con, statement: str, params=None) -> list[tuple]:
    cur = con.cursor()
    try:
        cur.execute(statement, params)
        try:
            return [tuple(r) for r in cur.fetchall()]
        except Exception:
            return []
    finally:
        cur.close()


@pytest.fixture
def db(admin):
    """A schema of the test's own in the shared Spark server."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    run(admin, f"CREATE SCHEMA {name}")
    return name


def config_of(proxy, tls, db: str | None = None, **overrides) -> DatabricksConfig:
    table = {"server_hostname": "127.0.0.1", "port": proxy.port, "http_path": proxy.path, "access_token": TOKEN,
             "tls_ca_file": str(tls[0]), "schema": db, "retry_seconds": 2.0, "socket_timeout_seconds": 60.0}
    table.update(overrides)
    return build_model(DatabricksConfig, {k: v for k, v in table.items() if v is not None}, "connections.dbx")


def connector_on(proxy, tls, db: str | None = None, **overrides) -> DatabricksConnector:
    return DatabricksConnector(config_of(proxy, tls, db, **overrides), name="dbx")


def day_query(sql: str, day: dt.date = DAY, timezone: str = "UTC"):
    return render(sql, DayWindow.of(day, timezone), "named", quote="`")


def spark_literal(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, dt.datetime):
        return f"TIMESTAMP_NTZ'{value:%Y-%m-%d %H:%M:%S}'"
    if isinstance(value, float):
        return f"CAST({value!r} AS DOUBLE)"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


class SparkKitTable:
    """The kit's table in the test's schema, written with the plain driver (Spark's parquet
    tables have no UPDATE: a value is changed by rewriting the table)."""

    def __init__(self, con, schema: str):
        self.con = con
        self.schema = schema
        self.name = f"{schema}.kit_events"
        run(con, f"CREATE TABLE {self.name} (ts TIMESTAMP_NTZ, user_id STRING, event STRING, value DOUBLE) "
                 "USING parquet")

    def _insert(self, rows):
        for i in range(0, len(rows), 500):
            values = ", ".join("(" + ", ".join(spark_literal(v) for v in row) + ")" for row in rows[i:i + 500])
            run(self.con, f"INSERT INTO {self.name} VALUES {values}")

    async def insert(self, rows):
        await asyncio.to_thread(self._insert, rows)

    def _update(self, user_id, value):
        tmp = f"{self.schema}.kit_rewrite_{uuid.uuid4().hex[:6]}"
        run(self.con, f"CREATE TABLE {tmp} USING parquet AS SELECT ts, user_id, event, CASE WHEN user_id = "
                      f"{spark_literal(user_id)} THEN {float(value)!r} ELSE value END AS value FROM {self.name}")
        run(self.con, f"INSERT OVERWRITE TABLE {self.name} SELECT * FROM {tmp}")
        run(self.con, f"DROP TABLE {tmp}")

    async def update_value(self, user_id, value):
        await asyncio.to_thread(self._update, user_id, value)


# -- the conformance kit ---------------------------------------------------------------------

class TestDatabricksConnector(ConnectorSuite):
    @pytest.fixture
    def kit_table(self, admin, db):
        return SparkKitTable(admin, db)

    @pytest.fixture
    async def connector(self, proxy, tls, db):
        c = connector_on(proxy, tls, db, timestamp_ntz_zone="UTC")
        yield c
        await c.close()

    @pytest.fixture
    def broken_connector(self, tls):
        return DatabricksConnector(build_model(DatabricksConfig, {
            "server_hostname": "127.0.0.1", "port": free_port(), "http_path": "/sql/1.0/warehouses/x",
            "access_token": TOKEN, "tls_ca_file": str(tls[0]), "retry_seconds": 1.0}, "c"), name="kit-broken")


# -- plugin and configuration ----------------------------------------------------------------

def test_registers_the_databricks_type_and_declares_its_api():
    registry = Registry()
    databricks_plugin.ingestd_register(registry)
    assert registry.connectors["databricks"] is DatabricksConnector
    assert databricks_plugin.INGESTD_API == (2, 2)
    caps = DatabricksConnector.capabilities
    assert caps.fingerprint and caps.paramstyle == "named" and caps.quote == "`"


def test_the_plugin_imports_without_the_driver_and_says_how_to_install_it():
    code = textwrap.dedent("""
        import asyncio, sys
        sys.modules["databricks"] = None
        sys.modules["databricks.sql"] = None
        from ingestd import PermanentError, build_model
        from ingestd.plugins.databricks.connector import DatabricksConfig, DatabricksConnector
        c = DatabricksConnector(build_model(DatabricksConfig, {"server_hostname": "h", "http_path": "/p",
                                                               "access_token": "dapi-t"}, "c"), name="dbx")
        try:
            asyncio.run(c.check())
        except PermanentError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=cli_env(),
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'ingestd[databricks]'" in out.stdout


def test_sample_toml_says_the_defaults_and_its_other_ways_to_log_in_build(monkeypatch):
    """tests/test_readme.py checks every sample as written and with all its keys uncommented; here:
    each commented-out key shows its default, and each way to log in builds on its own."""
    sample = (PLUGIN_FILE.parent / "sample.toml").read_text()
    monkeypatch.setenv("DATABRICKS_TOKEN", "dapi-x")
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", "s")
    table = tomllib.loads(sample)["connections"]["NAME"]
    assert table.pop("type") == "databricks"
    assert build_model(DatabricksConfig, table, "connections.NAME").access_token.reveal() == "dapi-x"
    commented = {}
    for line in sample.splitlines():
        if line.startswith("# ") and " = " in line:
            commented.update(tomllib.loads(line[2:]))
    defaults = DatabricksConfig("h", "/p")
    for key in ("port", "fingerprint", "timestamp_ntz_zone", "use_cloud_fetch", "retry_seconds",
                "socket_timeout_seconds", "session_configuration", "query_tags", "user_agent_entry"):
        assert getattr(defaults, key) == commented[key], f"{key}: the sample says {commented[key]!r}, the default " \
                                                          f"is {getattr(defaults, key)!r}"
    base = {k: v for k, v in table.items() if k != "access_token_env"}
    m2m = build_model(DatabricksConfig, {**base, "client_id": commented["client_id"],
                                         "client_secret_env": commented["client_secret_env"]}, "c")
    assert m2m.client_secret.reveal() == "s"
    provider = build_model(DatabricksConfig, {**base, "credentials_provider": commented["credentials_provider"]}, "c")
    assert provider.credentials_provider == "mycompany.databricks_auth:provider"


def test_config_defaults_secrets_and_host_forms(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("dapi-secret\n")
    cfg = build_model(DatabricksConfig, {"server_hostname": "https://dbc-1.cloud.databricks.com/", "http_path": "/p",
                                         "access_token_file": str(secret)}, "connections.dbx")
    assert cfg.server_hostname == "dbc-1.cloud.databricks.com" and cfg.access_token.reveal() == "dapi-secret"
    assert "dapi-secret" not in repr(cfg)
    kwargs = DatabricksConnector(cfg, name="dbx").connect_kwargs(("orders", "UTC"))
    assert kwargs["access_token"] == "dapi-secret" and kwargs["user_agent_entry"] == "ingestd"
    assert kwargs["query_tags"] == {"app": "ingestd", "connection": "dbx", "source": "orders"}
    assert kwargs["use_cloud_fetch"] is True and kwargs["use_inline_params"] is False


@pytest.mark.parametrize("table, key, words", [
    ({"server_hostname": "h", "http_path": "/p"}, "connections.dbx", "got none"),
    ({"server_hostname": "h", "http_path": "/p", "access_token": "dapi-t", "client_id": "c", "client_secret": "sp-s"},
     "connections.dbx", "exactly one way"),
    ({"server_hostname": "h", "http_path": "/p", "client_id": "c"}, "connections.dbx.client_secret", "both"),
    ({"server_hostname": "h", "http_path": "/p", "credentials_provider": "nocolon"},
     "connections.dbx.credentials_provider", "module:callable"),
    ({"server_hostname": "a b", "http_path": "/p", "access_token": "dapi-t"}, "connections.dbx.server_hostname",
     "host name"),
    ({"server_hostname": "h", "http_path": "/", "access_token": "dapi-t"}, "connections.dbx.http_path", "HTTP path"),
    ({"server_hostname": "h", "http_path": "/p", "access_token": "dapi-t", "timestamp_ntz_zone": "Mars/Base"},
     "connections.dbx.timestamp_ntz_zone", "IANA"),
    ({"server_hostname": "h", "http_path": "/p", "access_token": "dapi-t",
      "session_configuration": {"TIMEZONE": "UTC"}},
     "connections.dbx.session_configuration.TIMEZONE", "set by ingestd"),
    ({"server_hostname": "h", "http_path": "/p", "access_token": "dapi-t", "warehouse": "w"},
     "connections.dbx.warehouse",
     "unknown key"),
])
def test_config_errors_name_the_key(table, key, words):
    with pytest.raises(ConfigErrors) as err:
        build_model(DatabricksConfig, table, "connections.dbx")
    assert f"{key}: " in str(err.value) and words in str(err.value)


# -- sessions, auth and check() --------------------------------------------------------------

async def test_sessions_carry_query_tags_user_agent_time_zone_and_schema(proxy, tls, db, admin):
    run(admin, f"CREATE TABLE {db}.events (ts TIMESTAMP, user_id STRING) USING parquet")
    c = connector_on(proxy, tls, db, query_tags={"team": "growth"})
    before = len(proxy.session_confs)
    query = day_query("SELECT * FROM events WHERE ts >= {start} AND ts < {end}", timezone="Europe/Paris")
    assert (await c.probe(query, SourceInfo("orders", "Europe/Paris"))).rows == 0  # `events` found via `schema`
    await c.probe(query, SourceInfo("orders", "Europe/Paris"))
    await c.close()
    confs = proxy.session_confs[before:]
    assert len(confs) == 1, "one session per source and zone, reused by the next call"
    tags = dict(pair.split(":", 1) for pair in confs[0]["QUERY_TAGS"].split(","))
    assert tags == {"team": "growth", "app": "ingestd", "connection": "dbx", "source": "orders"}
    assert proxy.user_agents[-1].endswith("(ingestd)")
    assert "SET TIME ZONE 'Europe/Paris'" in proxy.statements


async def test_a_refused_token_and_a_wrong_http_path_are_permanent_and_named(proxy, tls):
    with pytest.raises(PermanentError, match=r"refused the credentials \(HTTP 403\).*Invalid access token") as err:
        await connector_on(proxy, tls, access_token="dapi-wrong").check()
    assert "dapi-wrong" not in str(err.value) and err.value.code == "HTTP 403"
    with pytest.raises(PermanentError, match=r"no SQL warehouse or cluster answers at .*/sql/1.0/warehouses/"
                                             r"nope \(HTTP 404\)"):
        await connector_on(proxy, tls, http_path="/sql/1.0/warehouses/nope").check()


async def test_check_names_a_missing_table_and_column_and_bad_sql(proxy, tls, db, admin):
    run(admin, f"CREATE TABLE {db}.events (ts TIMESTAMP, user_id STRING) USING parquet")
    c = connector_on(proxy, tls, db)
    await c.check(day_query("SELECT * FROM events WHERE ts >= {start} AND ts < {end}"))
    with pytest.raises(PermanentError, match="table or view that does not exist.*needs USE CATALOG, USE SCHEMA "
                                             "and SELECT") as err:
        await c.check(day_query("SELECT * FROM no_such_events WHERE ts >= {start}"))
    assert err.value.code == "TABLE_OR_VIEW_NOT_FOUND (42P01)"
    with pytest.raises(PermanentError, match="column that does not exist"):
        await c.check(day_query("SELECT nope FROM events WHERE ts >= {start}"))
    with pytest.raises(PermanentError, match="not valid Databricks SQL") as err:
        await c.check(day_query("SELEC ts FROM events WHERE ts >= {start}"))
    assert err.value.code.startswith("PARSE_SYNTAX_ERROR")
    await c.close()


def server_error(message: str):
    """A ServerOperationError as the driver raises it for a failed statement."""
    from databricks.sql.exc import ServerOperationError
    return ServerOperationError(message, {"operation-id": "01ef", "diagnostic-info": None})


@pytest.mark.parametrize("message, cls, words", [
    ("[INSUFFICIENT_PERMISSIONS] Insufficient privileges:\nUser does not have USE CATALOG on Catalog 'main'. "
     "SQLSTATE: 42501", PermanentError, "lacks USE CATALOG on catalog main (GRANT USE CATALOG ON CATALOG main"),
    ("[INSUFFICIENT_PERMISSIONS] Insufficient privileges:\nUser does not have SELECT on Table "
     "'main.analytics.events'. SQLSTATE: 42501", PermanentError,
     "lacks SELECT on table main.analytics.events (GRANT SELECT ON TABLE main.analytics.events"),
    ("[INSUFFICIENT_PERMISSIONS] Insufficient privileges:\nUser does not have USE SCHEMA on Schema "
     "'main.analytics'. SQLSTATE: 42501", PermanentError, "lacks USE SCHEMA on schema main.analytics"),
    ("[NO_SUCH_CATALOG_EXCEPTION] Catalog 'mian' was not found. Please verify the catalog name and then retry "
     "the query or command again. SQLSTATE: 42704", PermanentError, "catalog does not exist"),
    ("[SCHEMA_NOT_FOUND] The schema `main`.`nope` cannot be found. SQLSTATE: 42704", PermanentError,
     "schema does not exist"),
    ("Invalid SessionHandle: SessionHandle [01ef-aa]", TransientError, "session is gone"),
    ("[INTERNAL_ERROR] The Spark SQL phase optimization failed. SQLSTATE: XX000", TransientError,
     "could not run the query right now"),
    ("[CAST_INVALID_INPUT] The value 'x' of the type \"STRING\" cannot be cast to \"DATE\". SQLSTATE: 22018",
     PermanentError, "could not be converted"),
])
def test_warehouse_errors_that_spark_cannot_produce_are_sorted_and_explained(message, cls, words):
    error = translate(server_error(message))
    assert isinstance(error, cls) and words in str(error), str(error)


def test_http_errors_of_the_driver_are_sorted_by_status():
    from databricks.sql.exc import MaxRetryDurationError, RequestError
    for status, cls in [(401, PermanentError), (403, PermanentError), (404, PermanentError), (400, PermanentError),
                        (429, TransientError), (503, TransientError), (502, TransientError)]:
        error = translate(RequestError("Error during request to server", {"http-code": status}))
        assert isinstance(error, cls) and error.code == f"HTTP {status}", (status, error)
    error = translate(MaxRetryDurationError("Retry request would exceed Retry policy max retry duration", {}))
    assert isinstance(error, TransientError)
    assert isinstance(translate(ConnectionResetError(104, "Connection reset by peer")), TransientError)


async def test_a_warehouse_starting_answers_503_and_is_retried(proxy, tls):
    """While a stopped warehouse starts, Databricks answers 503 with Retry-After: the driver retries
    within `retry_seconds`; past that, the error is transient (the daemon retries later). The 503
    is the proxy's (test control); the driver's retry policy is real."""
    try:
        c = connector_on(proxy, tls, retry_seconds=20.0)  # the driver waits 5 s before its retry
        proxy.fail_next(503, 1)
        await c.check()  # a 503, then the session opens
        await c.close()
        c = connector_on(proxy, tls, retry_seconds=1.0)
        proxy.fail_next(503, 50)
        with pytest.raises(TransientError, match="starting or busy"):
            await c.check()
    finally:
        proxy.fail_next(503, 0)
    await c.close()


async def test_oauth_machine_to_machine_gets_a_token_and_a_wrong_secret_is_named(proxy, tls):
    c = connector_on(proxy, tls, access_token=None, client_id="sp-ingestd", client_secret="sp-secret")
    await c.check()
    await c.close()
    c = connector_on(proxy, tls, access_token=None, client_id="sp-ingestd", client_secret="wrong-secret")
    with pytest.raises(PermanentError, match="refused the OAuth client sp-ingestd") as err:
        await c.check()
    assert "wrong-secret" not in str(err.value)


PROVIDER = '''
from databricks.sql.auth.authenticators import CredentialsProvider

class Provider(CredentialsProvider):
    def auth_type(self):
        return "test"
    def __call__(self, *args, **kwargs):
        return lambda: {"Authorization": "Bearer %s"}

provider = Provider()
'''


async def test_a_credentials_provider_named_by_module_and_attribute(proxy, tls, tmp_path, monkeypatch):
    (tmp_path / "dbx_test_auth.py").write_text(PROVIDER % TOKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    c = connector_on(proxy, tls, access_token=None, credentials_provider="dbx_test_auth:provider")
    await c.check()
    await c.close()
    with pytest.raises(PermanentError, match="cannot load credentials_provider"):
        await connector_on(proxy, tls, access_token=None, credentials_provider="dbx_test_auth:nope").check()


# -- parameters, probes, fingerprints ------------------------------------------------------------

async def test_day_values_travel_as_native_parameters_even_with_a_quote(proxy, tls, db, admin):
    run(admin, f"CREATE TABLE {db}.names (name STRING, d DATE) USING parquet")
    run(admin, f"INSERT INTO {db}.names VALUES ('o''brien', DATE'2026-03-10'), ('obrien', DATE'2026-03-10'), "
               f"('x', DATE'2026-03-11')")
    c = connector_on(proxy, tls, db)
    base = day_query("SELECT name FROM names WHERE d = {day} AND name = {day}")
    query = base.with_values(day="o'brien")
    with pytest.raises(PermanentError):  # DATE compared with o'brien: a value, not SQL
        [b async for b in c.fetch(query, 10)]
    query = day_query("SELECT name, d FROM names WHERE d = {day}")
    rows = [r for b in [b async for b in c.fetch(query, 10)] for r in b.to_pylist()]
    assert sorted(r["name"] for r in rows) == ["o'brien", "obrien"]
    quoted = day_query("SELECT name FROM names WHERE name = {day}").with_values(day="o'brien")
    assert [r["name"] for b in [b async for b in c.fetch(quoted, 10)] for r in b.to_pylist()] == ["o'brien"]
    sent = proxy.statements[-1]
    assert sent.endswith("WHERE name = :day") and "brien" not in sent
    (param,) = proxy.parameters[-1]
    assert (param.name, param.type, param.value.stringValue) == ("day", "STRING", "o'brien")
    await c.close()


async def test_probe_counts_and_fingerprints_ignore_row_order_and_see_nulls(proxy, tls, db, admin):
    run(admin, f"CREATE TABLE {db}.f (id BIGINT, v STRING, m MAP<STRING, INT>) USING parquet")
    run(admin, f"INSERT INTO {db}.f SELECT id, CAST(id AS STRING), map('k', CAST(id AS INT)) FROM range(20)")
    c = connector_on(proxy, tls, db)
    q = day_query("SELECT * FROM f WHERE {day} IS NOT NULL")
    first = await c.probe(q)
    assert first.rows == 20 and len(first.fingerprint) == 32
    reordered = await c.probe(day_query("SELECT * FROM (SELECT * FROM f ORDER BY id DESC) WHERE {day} IS NOT NULL"))
    assert reordered == first
    run(admin, f"INSERT OVERWRITE TABLE {db}.f SELECT id, IF(id = 3, NULL, CAST(id AS STRING)), "
               f"map('k', CAST(id AS INT)) FROM range(20)")
    nulled = await c.probe(q)
    assert nulled.rows == 20 and nulled.fingerprint != first.fingerprint
    counted = await connector_on(proxy, tls, db, fingerprint=False).probe(q)
    assert counted.rows == 20 and counted.fingerprint is None
    await c.close()


async def test_cancelling_a_fetch_cancels_the_statement(proxy, tls, db, admin):
    run(admin, f"CREATE TABLE {db}.big (id BIGINT) USING parquet")
    run(admin, f"INSERT INTO {db}.big SELECT id FROM range(30000)")
    c = connector_on(proxy, tls, db)
    q = day_query("SELECT id FROM big WHERE {day} IS NOT NULL")
    stream = c.fetch(q, 1000)
    first = await stream.__anext__()
    assert first.num_rows == 1000
    await stream.aclose()
    assert not [t for t in threading.enumerate() if t.name.startswith("ingestd-databricks-")]
    assert "CancelOperation" in proxy.calls or "CloseOperation" in proxy.calls
    assert (await c.probe(q)).rows == 30000
    await c.close()


# -- types -----------------------------------------------------------------------------------

TYPED = """
CREATE TABLE {db}.typed (ts TIMESTAMP, ntz TIMESTAMP_NTZ, amount DECIMAL(12,2), n INT, big BIGINT, f FLOAT,
                         ok BOOLEAN, name STRING, d DATE, a ARRAY<INT>, m MAP<STRING, INT>,
                         s STRUCT<plan: STRING, seats: INT>) USING parquet
"""
TYPED_ROWS = """
INSERT INTO {db}.typed SELECT TIMESTAMP'2026-03-10 09:00:00+00:00', CAST(t AS TIMESTAMP_NTZ), 12.34, 7,
    9000000000, 1.5, true, 'signup', DATE'2026-03-10', array(1, 2, 3), map('k', 1),
    named_struct('plan', 'pro', 'seats', 3)
FROM VALUES ('2026-03-09 23:59:59'), ('2026-03-10 01:02:03'), ('2026-03-10 23:30:00'), ('2026-03-11 00:00:00') AS v(t)
"""


async def test_databricks_types_arrive_as_arrow_types_and_map_to_the_schema(proxy, tls, db, admin):
    """The source is in Los Angeles: its day 2026-03-10 is [07:00Z, 07:00Z next day). The
    TIMESTAMP_NTZ column holds LA wall-clock times (documented default `timestamp_ntz_zone =
    "source"`, the session's time zone): Spark compares it with the UTC-instant parameters in
    that zone, so exactly the two NTZ rows of the LA day come back."""
    run(admin, TYPED.format(db=db))
    run(admin, TYPED_ROWS.format(db=db))
    c = connector_on(proxy, tls, db)
    query = day_query("SELECT * FROM typed WHERE ntz >= {start} AND ntz < {end}", timezone="America/Los_Angeles")
    assert (await c.probe(query)).rows == 2
    batches = [b async for b in c.fetch(query, 1000, SourceInfo("typed", "America/Los_Angeles"))]
    assert len(batches) == 1
    batch = batches[0]
    utc = pa.timestamp("us", tz="UTC")
    assert dict(zip(batch.schema.names, batch.schema.types, strict=True)) == {
        "ts": utc, "ntz": utc, "amount": pa.decimal128(12, 2), "n": pa.int64(), "big": pa.int64(),
        "f": pa.float64(), "ok": pa.bool_(), "name": pa.string(), "d": pa.date32(), "a": pa.string(),
        "m": pa.string(), "s": pa.string()}
    rows = batch.to_pylist()
    assert sorted(r["ntz"] for r in rows) == [dt.datetime(2026, 3, 10, 8, 2, 3, tzinfo=dt.UTC),
                                              dt.datetime(2026, 3, 11, 6, 30, tzinfo=dt.UTC)]
    first = rows[0]
    assert first["ts"] == dt.datetime(2026, 3, 10, 9, tzinfo=dt.UTC)
    assert (first["amount"], first["n"], first["big"], first["f"], first["ok"], first["name"], first["d"]) == (
        Decimal("12.34"), 7, 9000000000, 1.5, True, "signup", DAY)
    assert json.loads(first["a"]) == [1, 2, 3] and json.loads(first["m"]) == {"k": 1}
    assert json.loads(first["s"]) == {"plan": "pro", "seats": 3}

    window = DayWindow.of(DAY, "America/Los_Angeles")
    now = dt.datetime(2026, 3, 12, tzinfo=dt.UTC)
    events = RowMapper("events", Mapping(timestamp="ntz", event_name="name", event_value="amount",
                                         ids={"user_id": "n"}, metadata=["ok", "d", "f", "a"], metadata_json="s"),
                       window, source="typed", generation=1, ingested_at=now)
    try:
        mapped = events.map(batch)
        assert mapped.rejects == {}
        out = mapped.rows.to_pylist()
        assert (out[0]["event_name"], out[0]["event_value"], out[0]["unit_id"]) == ("signup", "12.34", "7")
        meta = json.loads(out[0]["metadata"])
        assert meta["plan"] == "pro" and meta["seats"] == 3 and meta["ok"] is True and meta["d"] == "2026-03-10"
    finally:
        events.close()
    await c.close()


def test_normalize_reads_naive_timestamps_in_the_ntz_zone_and_nested_values_as_json():
    """What Databricks sends for TIMESTAMP_NTZ (a naive Arrow timestamp) and for complex types
    requested as Arrow (lists, maps, structs); Spark's Thrift server sends neither."""
    table = pa.table({
        "ntz": pa.array([dt.datetime(2026, 11, 1, 1, 30)], pa.timestamp("us")),
        "ltz": pa.array([dt.datetime(2026, 11, 1, 1, 30, tzinfo=dt.UTC)], pa.timestamp("us", tz="America/Denver")),
        "i": pa.array([1], pa.int8()),
        "f": pa.array([0.5], pa.float32()),
        "l": pa.array([[1, 2]], pa.list_(pa.int32())),
        "m": pa.array([[("a", 1)]], pa.map_(pa.string(), pa.int32())),
        "s": pa.array([{"x": 1, "d": dt.date(2026, 1, 2)}], pa.struct([("x", pa.int32()), ("d", pa.date32())])),
    })
    out = normalize(table, "America/Los_Angeles")
    assert out.column("ntz").to_pylist() == [dt.datetime(2026, 11, 1, 8, 30, tzinfo=dt.UTC)]  # PDT, first of two
    assert out.column("ltz").to_pylist() == [dt.datetime(2026, 11, 1, 1, 30, tzinfo=dt.UTC)]
    assert out.schema.field("i").type == pa.int64() and out.schema.field("f").type == pa.float64()
    assert [json.loads(out.column(c)[0].as_py()) for c in ("l", "m", "s")] == [[1, 2], {"a": 1},
                                                                               {"x": 1, "d": "2026-01-02"}]


# -- the daemon end to end -------------------------------------------------------------------

D = dt.date(2026, 11, 20)

E2E_CONFIG = """
[daemon]
state_path = "state.db"
batch_rows = 1000
retry_attempts = {attempts}
retry_base_seconds = {base}
retry_max_seconds = 8

[bus]
enabled = false

[sinks.main]
type = "duckdb"
path = "analytics.duckdb"

[connections.dbx]
type = "databricks"
server_hostname = "127.0.0.1"
port = {port}
http_path = "{path}"
access_token_env = "DBX_TEST_TOKEN"
schema = "{db}"
tls_ca_file = "{ca}"
retry_seconds = 2.0

[sources.orders]
connection = "dbx"
kind = "events"
query = '''SELECT ts, user_id, event, value, props FROM events_raw
           WHERE ds = {{day}} AND ts >= {{start}} AND ts < {{end}}'''
schedule = ["0 6 * * *"]
lag_days = 1

[sources.orders.recheck]
schedule = ["0 18 * * *"]
lookback_days = 1
threshold_pct = 1.0
detect = "checksum"

[sources.orders.mapping]
timestamp = "ts"
event_name = "event"
event_value = "value"
ids = {{ user_id = "user_id" }}
metadata_json = "props"

[sources.daily]
connection = "dbx"
kind = "metrics"
query = "SELECT ds, user_id, metric, value FROM metrics_daily WHERE ds = {{day}}"
schedule = ["0 6 * * *"]
lag_days = 1

[sources.daily.mapping]
date = "ds"
ids = {{ user_id = "user_id" }}
metric_name = "metric"
metric_value = "value"
"""

EVENTS_TABLE = ("CREATE TABLE {db}.events_raw (ts TIMESTAMP, user_id STRING, event STRING, value STRING, "
                "props STRUCT<k: INT>, ds DATE) USING parquet PARTITIONED BY (ds)")


def add_events(con, db: str, day: dt.date, n: int, first: int = 0) -> None:
    """`n` events on `day` (UTC), 7 s apart from midnight, in the table's `ds` partition of that day."""
    run(con, f"INSERT INTO {db}.events_raw PARTITION (ds = DATE'{day}') SELECT TIMESTAMP'{day} 00:00:00+00:00' + "
             f"make_interval(0, 0, 0, 0, 0, 0, (id + {first}) * 7), concat('u', id + {first}), 'click', "
             f"CAST(id + {first} AS STRING), named_struct('k', 1) FROM range({n})")


def write_e2e(tmp_path, proxy, tls, db, *, attempts: int = 3, base: float = 0.05) -> Path:
    cfg = tmp_path / "daemon.toml"
    cfg.write_text(E2E_CONFIG.format(port=proxy.port, path=proxy.path, db=db, ca=tls[0], attempts=attempts,
                                     base=base))
    return cfg


def test_the_daemon_loads_events_and_metrics_and_reloads_a_changed_value(tmp_path, proxy, tls, db, admin):
    run(admin, EVENTS_TABLE.format(db=db))
    add_events(admin, db, D, 500)
    add_events(admin, db, D + dt.timedelta(days=1), 50, first=5000)  # the next day must not leak in
    run(admin, f"CREATE TABLE {db}.metrics_daily (ds DATE, user_id STRING, metric STRING, value DOUBLE) "
               "USING parquet")
    run(admin, f"INSERT INTO {db}.metrics_daily SELECT DATE'{D}', concat('u', id), 'revenue', id * 1.5 FROM range(40)"
               f" UNION ALL SELECT DATE'{D + dt.timedelta(days=1)}', 'u0', 'revenue', 1.0")
    cfg = write_e2e(tmp_path, proxy, tls, db)
    env = cli_env(DBX_TEST_TOKEN=TOKEN)
    at = lambda hh: dt.datetime(2026, 11, 21, hh, 5, tzinfo=dt.UTC).isoformat()  # noqa: E731

    out = ingestd("run", "--once", "--now", at(6), config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    part = "SELECT status, generation, rows FROM partitions WHERE source = ? AND day = ?"
    assert state_query(tmp_path / "state.db", part, ("orders", D.isoformat())) == [("succeeded", 1, 500)]
    assert state_query(tmp_path / "state.db", part, ("daily", D.isoformat())) == [("succeeded", 1, 40)]
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 500
    assert sink_rows(tmp_path / "analytics.duckdb", "daily", D, table="metrics") == 40
    assert TOKEN not in out.stdout + out.stderr
    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        row = con.execute("SELECT timestamp, event_name, unit_id, metadata FROM events "
                          "WHERE source = 'orders' AND unit_id = 'u1'").fetchone()
        metric = con.execute("SELECT metric_name, metric_value FROM metrics WHERE source = 'daily' "
                             "AND unit_id = 'u3'").fetchone()
    assert row[0] == dt.datetime(2026, 11, 20, 0, 0, 7, tzinfo=dt.UTC)
    assert (row[1], row[2], json.loads(row[3])) == ("click", "u1", {"k": 1})
    assert metric == ("revenue", 4.5)

    # issue 16: a preview's row limit runs in Spark SQL (LIMIT on the wrapped day query)
    out = ingestd("preview", "daily", "--day", D.isoformat(), "--rows", "5", "--json", config=cfg, env=env)
    p = json.loads(out.stdout)
    assert (p["rows_read"], p["mapped"], p["limit"], p["ok"]) == (5, 5, "in the warehouse", True), out.stderr
    assert {r["metric_name"] for r in p["rows"]} == {"revenue"}

    # the same count, one value changed: the re-check's fingerprint sees it and reloads the day
    run(admin, f"CREATE TABLE {db}.rewrite USING parquet AS SELECT ts, user_id, event, "
               f"IF(user_id = 'u7', 'changed', value) AS value, props FROM {db}.events_raw WHERE ds = DATE'{D}'")
    run(admin, f"INSERT OVERWRITE TABLE {db}.events_raw PARTITION (ds = DATE'{D}') SELECT * FROM {db}.rewrite")
    out = ingestd("run", "--once", "--now", at(18), config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"schema.changed"' not in out.stdout, "the re-check's schema probe must see the loaded schema"
    assert state_query(tmp_path / "state.db", part, ("orders", D.isoformat())) == [("succeeded", 2, 500)]
    runs = state_query(tmp_path / "state.db", "SELECT trigger, status FROM runs WHERE source = 'orders' AND day = ? "
                                              "ORDER BY started_at", (D.isoformat(),))
    assert runs == [("scheduled", "succeeded"), ("recheck", "succeeded")]
    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        assert con.execute("SELECT event_value, generation FROM events WHERE source = 'orders' AND unit_id = 'u7'"
                           ).fetchone() == ("changed", 2)


def test_the_server_killed_mid_fetch_is_retried_and_the_day_loads_whole(tmp_path, proxy, tls, db, admin,
                                                                         spark_server):  # noqa: F811
    """Spark is killed (SIGKILL) after the first page of a load; the fetch fails as transient, the
    daemon retries with backoff while the server comes back (same port, metastore and files), and
    the load then completes with every row once."""
    run(admin, EVENTS_TABLE.format(db=db))
    add_events(admin, db, D, 12000)  # two pages of the driver's 10000 rows
    cfg = write_e2e(tmp_path, proxy, tls, db, attempts=16, base=1.0)  # ~2 min: Spark restarts slowly on a busy machine
    text = cfg.read_text().replace('[sources.daily]', '[sources.daily]\nenabled = false')
    cfg.write_text(text)
    before = proxy.calls.count("FetchResults")
    proxy.delay_fetch = 1.0
    load = subprocess.Popen([sys.executable, "-m", "ingestd", "-c", str(cfg), "load", "orders", "--day", D.isoformat()],
                            env=cli_env(DBX_TEST_TOKEN=TOKEN), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while proxy.calls.count("FetchResults") == before:
            assert time.monotonic() < deadline and load.poll() is None, load.communicate()
            time.sleep(0.05)
        spark_server.kill()
        proxy.delay_fetch = 0.0
        spark_server.start()
        out, err = load.communicate(timeout=240)
    finally:
        proxy.delay_fetch = 0.0
        if load.poll() is None:
            load.kill()
    assert load.returncode == 0, out + err
    assert "succeeded: generation 1, 12000 rows" in out
    failed = state_query(tmp_path / "state.db", "SELECT status FROM runs WHERE source = 'orders'")
    assert failed == [("succeeded",)]
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 12000
