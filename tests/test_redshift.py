"""The Redshift connector with the real redshift-connector driver, against a PostgreSQL cluster of
this module's own, through tests/pg_proxy.py (which smooths what PostgreSQL answers differently
from Redshift). The conformance kit, the daemon end to end, errors and their classes, types,
cancellation and the server-side binding of day values."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import re
import socket
import textwrap
import threading
import time
from decimal import Decimal
from types import SimpleNamespace

import pyarrow as pa
import pytest

import ingestd.plugins.redshift as redshift_plugin
from ingestd import PermanentError, Registry, Secret, TransientError, build_model
from ingestd.core.models import ConfigErrors, redact
from ingestd.core.query import DayWindow, render
from ingestd.core.schema import Mapping, RowMapper
from ingestd.engine.ingest import with_retry
from ingestd.plugins.redshift import connector as redshift
from ingestd.plugins.redshift import fast_rows
from ingestd.plugins.redshift.connector import RedshiftConfig, RedshiftConnector, connect_kwargs
from ingestd.testing import ConnectorSuite
from tests.pg_proxy import RedshiftProxy
from tests.postgres import postgres_cluster  # noqa: F401  (module-scoped fixture)
from tests.support import cli_env, ingestd, sink_rows, state_query

DB = "dev"
USER = "ingestd"
PASSWORD = "rs-test-password"
DAY = dt.date(2026, 3, 10)
_names = itertools.count(1)


@pytest.fixture(scope="module")
def pg(postgres_cluster):  # noqa: F811
    """The cluster with Redshift's default database `dev` and a login for the connector."""
    postgres_cluster.create_user(USER, PASSWORD)
    postgres_cluster.create_database(DB)
    postgres_cluster.execute(f"GRANT CREATE ON SCHEMA public TO {USER}", dbname=DB)
    postgres_cluster.execute(textwrap.dedent("""
        CREATE FUNCTION raise_sqlstate(code text, msg text) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION USING ERRCODE = code, MESSAGE = msg; END $$"""), dbname=DB)
    return postgres_cluster


@pytest.fixture(scope="module")
def proxy(pg):
    with RedshiftProxy(pg.host, pg.port) as p:
        yield p


def sql(pg, statement: str, params=None):
    return pg.execute(statement, params, dbname=DB)


def config(proxy, **overrides) -> RedshiftConfig:
    values = dict(database=DB, host=proxy.host, port=proxy.port, user=USER, password=Secret(PASSWORD), ssl=False,
                  application_name="ingestd-test", fetch_engine="driver")  # tests/test_redshift_cx.py: connectorx
    values.update(overrides)
    return RedshiftConfig(**values)


def connector(proxy, **overrides) -> RedshiftConnector:
    return RedshiftConnector(config(proxy, **overrides), name="rs")


def day_query(text: str, day: dt.date = DAY):
    return render(text, DayWindow.of(day), RedshiftConnector.capabilities.paramstyle)


def sessions(pg, application_name: str) -> list[tuple]:
    return sql(pg, "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = %s", [application_name])


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def events_table(pg, name: str | None = None) -> str:
    name = name or f"events_{next(_names)}"
    sql(pg, f"CREATE TABLE {name} (ts TIMESTAMP, user_id VARCHAR(64), event VARCHAR(128), value VARCHAR(128),"
            f" props VARCHAR(1024))")
    sql(pg, f"GRANT SELECT ON {name} TO {USER}")
    return name


def add_events(pg, table: str, day: dt.date, n: int, start_id: int = 0) -> None:
    sql(pg, f"INSERT INTO {table} SELECT %s::timestamp + (i * 86399.0 / %s) * interval '1 second', 'u' || (i + %s),"
            f" 'click', i::text, '{{\"k\": 1}}' FROM generate_series(0, %s - 1) i", [day, max(n, 1), start_id, n])


# -- the conformance kit ---------------------------------------------------------------------------

class PgKitTable:
    """The kit's table in the test cluster, written by the superuser and readable by the connector."""

    def __init__(self, pg):
        self.pg = pg
        self.name = f"kit_events_{next(_names)}"
        sql(pg, f"CREATE TABLE {self.name} "
                "(ts TIMESTAMP, user_id VARCHAR(64), event VARCHAR(64), value DOUBLE PRECISION)")
        sql(pg, f"GRANT SELECT ON {self.name} TO {USER}")

    def _write(self, statement, rows):
        with self.pg.connect(dbname=DB) as con:
            con.cursor().executemany(statement, rows)

    async def insert(self, rows):
        await asyncio.to_thread(self._write, f"INSERT INTO {self.name} VALUES (%s, %s, %s, %s)", rows)

    async def update_value(self, user_id, value):
        await asyncio.to_thread(self._write, f"UPDATE {self.name} SET value = %s WHERE user_id = %s",
                                [(value, user_id)])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestRedshiftConnector(ConnectorSuite):
    """fetch_size 64 against batch_rows 100: batches are cut across FETCH chunks."""

    @pytest.fixture
    def kit_table(self, pg):
        return PgKitTable(pg)

    @pytest.fixture
    def broken_connector(self):
        return RedshiftConnector(RedshiftConfig(database=DB, host="127.0.0.1", port=closed_port(), user=USER,
                                                password=Secret(PASSWORD), ssl=False), name="kit-broken")

    @pytest.fixture
    async def connector(self, proxy):
        c = connector(proxy, fetch_size=64)
        yield c
        await c.close()


class TestRedshiftConnectorLargeFetches(TestRedshiftConnector):
    """fetch_size above batch_rows: one FETCH chunk is cut into several batches."""

    batch_rows = 40

    @pytest.fixture
    async def connector(self, proxy):
        c = connector(proxy, fetch_size=1000)
        yield c
        await c.close()


# -- plugin, config, driver ----------------------------------------------------------------------------

def test_registers_the_redshift_type_and_declares_its_api():
    registry = Registry()
    redshift_plugin.ingestd_register(registry)
    assert registry.connectors["redshift"] is RedshiftConnector
    assert redshift_plugin.INGESTD_API == (2, 2)
    caps = RedshiftConnector.capabilities
    assert caps.fingerprint is False and caps.paramstyle == "qmark"


def test_config_defaults_secrets_and_bad_keys(monkeypatch):
    monkeypatch.setenv("RS_PW", "s3cret")
    cfg = build_model(RedshiftConfig, {"host": "h.example", "database": "dev", "user": "u", "password_env": "RS_PW"},
                      "connections.rs")
    assert (cfg.port, cfg.ssl, cfg.sslmode, cfg.application_name, cfg.fetch_size, cfg.statement_timeout_ms,
            cfg.timeout) == (5439, True, "verify-ca", "ingestd", 1000, 3_600_000, 30)
    assert "s3cret" not in repr(cfg) and redact(cfg)["password"] == "***"
    kw = connect_kwargs(cfg)
    assert kw["password"] == "s3cret" and kw["user"] == "u" and kw["ssl"] is True and "iam" not in kw

    def errors(table):
        with pytest.raises(ConfigErrors) as err:
            build_model(RedshiftConfig, table, "connections.rs")
        return str(err.value)

    assert "connections.rs.password" in errors({"host": "h", "database": "dev", "user": "u"})
    assert "connections.rs.fetch_size" in errors({"host": "h", "database": "dev", "user": "u", "password": "pw-1",
                                                  "fetch_size": 0})
    assert "connections.rs.nope" in errors({"host": "h", "database": "dev", "user": "u", "password": "pw-1", "nope": 1})
    assert "connections.rs.sslmode" in errors({"host": "h", "database": "dev", "user": "u", "password": "pw-1",
                                               "sslmode": "disable"})
    assert "IAM authentication needs ssl" in errors({"database": "dev", "iam": True, "cluster_identifier": "c",
                                                     "ssl": False})
    assert "only used with iam" in errors({"host": "h", "database": "dev", "user": "u", "password": "pw-1",
                                           "workgroup": "w"})


def test_iam_config_maps_to_the_drivers_arguments(monkeypatch):
    monkeypatch.setenv("AK", "AKIA123")
    monkeypatch.setenv("SK", "secret-key")
    cluster = build_model(RedshiftConfig, {"database": "dev", "iam": True, "cluster_identifier": "examplecluster",
                                           "region": "us-west-2", "user": "loader", "access_key_id_env": "AK",
                                           "secret_access_key_env": "SK"}, "connections.rs")
    kw = connect_kwargs(cluster)
    assert kw["iam"] is True and kw["cluster_identifier"] == "examplecluster" and kw["region"] == "us-west-2"
    assert kw["db_user"] == "loader" and kw["access_key_id"] == "AKIA123" and kw["secret_access_key"] == "secret-key"
    assert "password" not in kw and "host" not in kw
    serverless = build_model(RedshiftConfig, {"database": "dev", "iam": True, "workgroup": "default-workgroup",
                                              "profile": "analytics"}, "connections.rs")
    kw = connect_kwargs(serverless)
    assert kw["is_serverless"] is True and kw["serverless_work_group"] == "default-workgroup"
    assert kw["profile"] == "analytics" and "db_user" not in kw


async def test_a_missing_driver_is_a_permanent_error_saying_how_to_install_it(proxy, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "redshift_connector", None)
    c = connector(proxy)
    for call in (c.check(), c.probe(day_query("SELECT 1 AS x WHERE {day} IS NOT NULL"))):
        with pytest.raises(PermanentError, match=r"pip install 'ingestd\[redshift\]'"):
            await call
    with pytest.raises(PermanentError, match="redshift-connector"):
        async for _ in c.fetch(day_query("SELECT 1 AS x WHERE {day} IS NOT NULL"), 10):
            pass


async def test_the_proxy_fixes_the_start_up_exchange(proxy):
    await connector(proxy).check()
    stats = proxy.stats
    assert {"client_protocol_version", "driver_version", "os_version",
            "driver_discovery_version"} <= stats.dropped_params
    assert stats.server_versions and stats.server_versions[0].startswith("15")
    assert stats.sasl_fixed >= 1, "SCRAM auth went through the proxy's fix of the mechanism list"


# -- parameters ----------------------------------------------------------------------------------------

async def test_day_values_are_bound_server_side_and_literals_are_left_alone(pg, proxy):
    role = "ingestd_logged"
    pg.create_user(role, PASSWORD)
    sql(pg, f"ALTER ROLE {role} SET log_statement = 'all'")
    table = events_table(pg)
    sql(pg, f"GRANT SELECT ON {table} TO {role}")
    add_events(pg, table, DAY, 10)
    c = connector(proxy, user=role, fetch_size=4)
    query = day_query(f"SELECT '100%' AS pct, '?' AS mark, user_id FROM {table} "
                      f"WHERE ts >= {{start}} AND ts < {{end}} AND user_id LIKE 'u%' -- a comment?")
    assert "2026" not in query.sql
    batches = [b async for b in c.fetch(query, 100)]
    table_out = pa.Table.from_batches(batches)
    assert table_out.num_rows == 10
    assert set(table_out.column("pct").to_pylist()) == {"100%"} and set(table_out.column("mark").to_pylist()) == {"?"}
    log = wait_until(lambda: "parameters: $1 = '2026-03-10 00:00:00'" in pg.log_tail(200_000) and pg.log_tail(200_000),
                     what="the statement log")
    declared = [(statement, values) for statement, values in re.findall(
        r"LOG:  execute [^:]+: (DECLARE ingestd_\w+ CURSOR FOR.*?)\n"
        r"\d{4}-\d\d-\d\d [^\n]*DETAIL:  parameters: ([^\n]*)",
        log, re.S) if table in statement]
    assert len(declared) == 1, log[-3000:]
    statement, values = declared[0]
    assert "ts >= $1 AND ts < $2" in statement and "2026" not in statement
    assert values == "$1 = '2026-03-10 00:00:00', $2 = '2026-03-11 00:00:00'"


# -- types -----------------------------------------------------------------------------------------------

TYPES_DDL = """CREATE TABLE {name} (
    c_smallint SMALLINT, c_integer INTEGER, c_bigint BIGINT, c_decimal DECIMAL(18, 4), c_real REAL,
    c_double DOUBLE PRECISION, c_boolean BOOLEAN, c_char CHAR(6), c_varchar VARCHAR(64), c_date DATE,
    c_timestamp TIMESTAMP, c_timestamptz TIMESTAMPTZ, c_super JSONB)"""

EXPECTED_TYPES = {
    "c_smallint": pa.int16(), "c_integer": pa.int32(), "c_bigint": pa.int64(), "c_decimal": pa.decimal128(18, 4),
    "c_real": pa.float32(), "c_double": pa.float64(), "c_boolean": pa.bool_(), "c_char": pa.string(),
    "c_varchar": pa.string(), "c_date": pa.date32(), "c_timestamp": pa.timestamp("us"),
    "c_timestamptz": pa.timestamp("us", tz="UTC"), "c_super": pa.string(),
}


async def test_every_redshift_type_arrives_as_its_arrow_type_and_maps_to_the_schemas(pg, proxy):
    name = f"typed_{next(_names)}"
    sql(pg, TYPES_DDL.format(name=name))
    sql(pg, f"GRANT SELECT ON {name} TO {USER}")
    sql(pg, f"""INSERT INTO {name} VALUES
        (-7, 2000000000, 9000000000, 12345.6789, 1.5, 2.25, true, 'ab', 'héllo wörld', '2026-03-10',
         '2026-03-10 08:30:00.123456', '2026-03-10 12:00:00+02', '{{"b": "x", "a": [1, 2]}}'),
        (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)""")
    supers_before = proxy.stats.super_columns
    query = day_query(f"SELECT * FROM {name} WHERE c_date = {{day}} OR c_date IS NULL ORDER BY c_smallint")
    fetched = [b async for b in connector(proxy).fetch(query, 100)]
    batch = pa.Table.from_batches(fetched).combine_chunks().to_batches()[0]
    assert proxy.stats.super_columns > supers_before, "the jsonb column reached the driver as SUPER (oid 4000)"
    assert {f.name: f.type for f in batch.schema} == EXPECTED_TYPES
    full, empty = batch.to_pylist()
    assert full == {
        "c_smallint": -7, "c_integer": 2000000000, "c_bigint": 9000000000, "c_decimal": Decimal("12345.6789"),
        "c_real": 1.5, "c_double": 2.25, "c_boolean": True, "c_char": "ab    ", "c_varchar": "héllo wörld",
        "c_date": DAY, "c_timestamp": dt.datetime(2026, 3, 10, 8, 30, 0, 123456),
        "c_timestamptz": dt.datetime(2026, 3, 10, 10, 0, tzinfo=dt.UTC), "c_super": '{"a": [1, 2], "b": "x"}',
    }
    assert set(empty.values()) == {None}

    events = Mapping(timestamp="c_timestamptz", event_name="c_varchar", event_value="c_decimal",
                     ids={"user_id": "c_bigint", "device_id": "c_char"},
                     metadata=["c_smallint", "c_integer", "c_real", "c_double", "c_boolean", "c_date", "c_timestamp"],
                     metadata_json="c_super")
    mapper = RowMapper("events", events, DayWindow.of(DAY), source="rs", generation=1,
                       ingested_at=dt.datetime(2026, 3, 11, tzinfo=dt.UTC))
    try:
        mapped = mapper.map(batch)
    finally:
        mapper.close()
    assert dict(mapped.rejects) == {"missing_timestamp": 1}
    row = mapped.rows.to_pylist()[0]
    assert row["timestamp"] == dt.datetime(2026, 3, 10, 10, 0, tzinfo=dt.UTC)
    assert (row["event_name"], row["event_value"], row["unit_id"], row["id_type"]) == (
        "héllo wörld", "12345.6789", "9000000000", "user_id")
    assert json.loads(row["ids"]) == {"user_id": "9000000000", "device_id": "ab    "}
    meta = json.loads(row["metadata"])
    assert meta["a"] == [1, 2] and meta["b"] == "x" and meta["c_boolean"] is True and meta["c_smallint"] == -7
    assert meta["c_real"] == 1.5 and meta["c_date"] == "2026-03-10"
    assert meta["c_timestamp"].startswith("2026-03-10 08:30")

    metrics = Mapping(date="c_date", ids={"user_id": "c_integer"}, metric_name="c_varchar", metric_value="c_decimal",
                      numerator="c_bigint", denominator="c_smallint")
    mapper = RowMapper("metrics", metrics, DayWindow.of(DAY), source="rs", generation=1,
                       ingested_at=dt.datetime(2026, 3, 11, tzinfo=dt.UTC))
    try:
        mapped = mapper.map(batch)
    finally:
        mapper.close()
    row = mapped.rows.to_pylist()[0]
    assert row["unit_id"] == "2000000000" and row["metric_value"] == pytest.approx(9000000000 / -7)
    assert (row["numerator"], row["denominator"]) == (9000000000.0, -7.0)


async def test_timestamps_decoded_from_wire_integers_equal_the_drivers_own_datetimes(pg, proxy):
    """The fetch keeps TIMESTAMP/TIMESTAMPTZ as the wire's int64 and converts whole columns in
    Arrow, through its own DataRow handler (the other types' values are compared with the
    driver's in the test above); every value, including ±infinity and values outside Python's datetime range (which the
    driver clamps to datetime.min/max), must come out as the driver's own decoding gives it."""
    import redshift_connector

    name = f"stamps_{next(_names)}"
    sql(pg, f"CREATE TABLE {name} (n int, ts TIMESTAMP, tz TIMESTAMPTZ)")
    sql(pg, f"GRANT SELECT ON {name} TO {USER}")
    sql(pg, f"""INSERT INTO {name} VALUES
        (1, '2026-03-10 08:30:00.123456', '2026-03-10 08:30:00.123456+00'), (2, '1999-12-31 23:59:59.999999',
         '1969-07-20 20:17:40+00'), (3, '2000-01-01', '2000-01-01 00:00:00+00'), (4, '0001-01-01', '0001-01-01+00'),
        (5, '9999-12-31 23:59:59.999999', '9999-12-31 23:59:59.999999+00'), (6, 'infinity', 'infinity'),
        (7, '-infinity', '-infinity'), (8, '12000-01-01', '12000-01-01+00'), (9, '4000-01-01 BC', '4000-01-01 BC'),
        (10, NULL, NULL)""")
    query = f"SELECT n, ts, tz FROM {name} ORDER BY n"
    bound = day_query(f"SELECT n, ts, tz FROM {name} WHERE {{day}} IS NOT NULL ORDER BY n")
    got = pa.Table.from_batches([b async for b in connector(proxy).fetch(bound, 100)]).to_pylist()

    con = redshift_connector.connect(host=proxy.host, port=proxy.port, database=DB, user=USER, password=PASSWORD,
                                     ssl=False)
    try:
        cur = con.cursor()
        cur.execute("SET timezone TO 'UTC'")
        cur.execute(query)
        expected = cur.fetchall()
    finally:
        con.close()
    assert len(got) == len(expected) == 10
    for row, (n, ts, tz) in zip(got, expected, strict=True):
        tz = tz if tz is None or tz.tzinfo else tz.replace(tzinfo=dt.UTC)  # the driver's clamp drops the zone
        assert (row["n"], row["ts"], row["tz"]) == (n, ts, tz), n


def test_the_driver_internals_the_connector_relies_on_are_still_there(proxy):
    """fast_rows.py patches redshift-connector internals (its docstring lists them and why), and
    the connector's cancel path and NUMERIC types read a few more. A driver release that changed
    one would quietly fall back to the driver's slow decoding, or lose the server-side cancel:
    this fails instead, naming each internal that changed."""
    import importlib.metadata

    import redshift_connector

    con = redshift_connector.connect(host=proxy.host, port=proxy.port, database=DB, user=USER, password=PASSWORD,
                                     ssl=False)
    try:
        cur = con.cursor()
        cur.execute("SELECT 1::int AS n, now()::timestamp AS ts, now() AS tz, 'x'::varchar AS s, "
                    "1.5::numeric(5, 2) AS d")
        cur.fetchall()
        changed = fast_rows.internals_changed(con, cur)
        usock, key = getattr(con, "_usock", None), getattr(con, "_backend_key_data", None)
        if not all(callable(getattr(usock, m, None)) for m in ("getpeername", "settimeout", "shutdown")):
            changed.append("Connection._usock (the socket the cancel request and the session timeout use) is "
                           f"{usock!r}")
        if not isinstance(key, (bytes, bytearray)) or len(key) != 8:
            changed.append(f"Connection._backend_key_data (the key a CancelRequest sends) is {key!r}")
        row_desc = (getattr(cur, "ps", None) or {}).get("row_desc") or []
        if len(row_desc) != 5 or row_desc[4].get("type_modifier") != ((5 << 16) | 2) + 4:
            changed.append("Cursor.ps['row_desc'][i]['type_modifier'] (NUMERIC precision and scale) is gone")
        patched = fast_rows.use_raw_values(con), fast_rows.use_fast_data_rows(con)
    finally:
        con.close()
    version = importlib.metadata.version("redshift-connector")
    assert not changed, (f"redshift-connector {version} changed internals the Redshift connector relies on "
                         "(see plugins/redshift/fast_rows.py):\n" + "\n".join(changed))
    assert patched == (frozenset(fast_rows.RAW_DECODERS), True)


def test_a_changed_internal_is_named():
    driver_like = SimpleNamespace(
        redshift_types={1114: (1, lambda data, offset, length: 0)},
        message_types={b"D": lambda data, cursor: None})
    changed = "\n".join(fast_rows.internals_changed(driver_like))
    assert "Connection.redshift_types[1114]: the decoder is <lambda>, no longer timestamp_recv_integer" in changed
    assert "Connection.redshift_types[1043] is missing (expected the decoder text_recv)" in changed
    assert "Connection.message_types[b'D'] is '<lambda>', no longer handle_DATA_ROW" in changed
    assert fast_rows.use_raw_values(driver_like) == frozenset() and not fast_rows.use_fast_data_rows(driver_like)


def test_numeric_types_follow_the_declared_precision():
    modifier = lambda p, s: ((p << 16) | s) + 4  # noqa: E731  (what the server sends for NUMERIC(p, s))
    assert redshift.arrow_type(1700, modifier(38, 10)) == pa.decimal128(38, 10)
    assert redshift.arrow_type(1700, modifier(5, 0)) == pa.decimal128(5, 0)
    assert redshift.arrow_type(1700, -1) == pa.float64()
    assert redshift.arrow_type(1186) == pa.string()  # INTERVAL and other types: their text


# -- errors ------------------------------------------------------------------------------------------------

async def test_a_bad_password_is_a_permanent_error_with_its_sqlstate(proxy):
    c = connector(proxy, password=Secret("not-the-password"))
    with pytest.raises(PermanentError) as err:
        await c.check()
    assert err.value.code == "28P01"
    assert str(err.value) == (f'[28P01] Redshift refused the user name or password: '
                              f'password authentication failed for user "{USER}"')


async def test_bad_sql_is_a_permanent_error_with_its_sqlstate_and_a_plain_sentence(pg, proxy):
    table = events_table(pg)
    c = connector(proxy)
    cases = [
        (f"SELEC ts FROM {table} WHERE ts >= {{start}}", "42601",
         "the query is not valid SQL: syntax error at or near"),
        ("SELECT ts FROM no_such_table WHERE ts >= {start}", "42P01",
         'the query names a table or view that does not exist: relation "no_such_table" does not exist'),
        (f"SELECT no_such_column FROM {table} WHERE ts >= {{start}}", "42703",
         'the query names a column that does not exist: column "no_such_column" does not exist'),
        (f"SELECT ts FROM {table} WHERE ts >= {{start}} AND 1 / (length(event) - 5) = 1", "22012",
         "a value in the data could not be converted or computed: division by zero"),
    ]
    add_events(pg, table, DAY, 3)
    for text, code, message in cases:
        query = day_query(text)
        for call in ("check", "probe", "fetch"):
            if code == "22012" and call == "check":
                continue  # check reads no row (LIMIT 0), so nothing is divided
            with pytest.raises(PermanentError) as err:
                if call == "fetch":
                    async for _ in c.fetch(query, 10):
                        pass
                else:
                    await getattr(c, call)(query)
            assert err.value.code == code, (call, text)
            assert str(err.value).startswith(f"[{code}] {message}"), str(err.value)


async def test_check_names_the_missing_grant(pg, proxy):
    hidden = f"secret_{next(_names)}"
    sql(pg, f"CREATE TABLE {hidden} (ts TIMESTAMP)")
    sql(pg, "CREATE SCHEMA IF NOT EXISTS locked")
    sql(pg, "CREATE TABLE IF NOT EXISTS locked.events (ts TIMESTAMP)")
    c = connector(proxy)
    with pytest.raises(PermanentError) as err:
        await c.check(day_query(f"SELECT ts FROM {hidden} WHERE ts >= {{start}}"))
    assert err.value.code == "42501"
    assert f"user {USER} lacks SELECT on table {hidden}" in str(err.value)
    assert f"GRANT SELECT ON {hidden} TO {USER}" in str(err.value)
    with pytest.raises(PermanentError) as err:
        await c.check(day_query("SELECT ts FROM locked.events WHERE ts >= {start}"))
    assert err.value.code == "42501" and f"GRANT USAGE ON SCHEMA locked TO {USER}" in str(err.value)
    with pytest.raises(PermanentError, match="42501"):  # probe and fetch fail permanently too
        await c.probe(day_query(f"SELECT ts FROM {hidden} WHERE ts >= {{start}}"))


@pytest.mark.parametrize("code, message, transient", [
    ("40001", "could not serialize access due to concurrent update", True),
    ("40P01", "deadlock detected", True),
    ("55P03", "canceling statement due to lock timeout", True),
    ("57P01", "terminating connection due to administrator command", True),
    ("53300", "too many connections", True),
    ("58030", "could not read block", True),
    ("XX000", "1023 Serializable isolation violation on table - 12345", True),
    ("57014", "canceling statement due to statement timeout", False),
    ("42501", "permission denied for table t", False),
    ("22P02", "invalid input syntax for type integer", False),
    ("0A000", "feature not supported", False),
    ("XX000", "Invalid digit, Value x, Pos 0, Type: Integer", False),
])
async def test_server_errors_are_sorted_by_sqlstate(pg, proxy, code, message, transient):
    c = connector(proxy)
    query = day_query(f"SELECT 1 AS x WHERE {{day}} IS NOT NULL AND raise_sqlstate('{code}', '{message}')")
    with pytest.raises(TransientError if transient else PermanentError) as err:
        await c.probe(query)
    assert err.value.code == code and message in str(err.value)


async def test_a_real_lock_timeout_is_transient(pg, proxy):
    table = events_table(pg)
    role = f"ingestd_lock_{next(_names)}"
    pg.create_user(role, PASSWORD)
    sql(pg, f"ALTER ROLE {role} SET lock_timeout = '200ms'")
    sql(pg, f"GRANT SELECT ON {table} TO {role}")
    with pg.connect(dbname=DB, autocommit=False) as holder:
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(TransientError) as err:
            await connector(proxy, user=role).probe(day_query(f"SELECT * FROM {table} WHERE ts >= {{start}}"))
        holder.rollback()
    assert err.value.code == "55P03"


async def test_a_statement_running_past_statement_timeout_ms_is_permanent(proxy):
    c = connector(proxy, statement_timeout_ms=200)
    with pytest.raises(PermanentError) as err:
        await c.probe(day_query("SELECT 1 AS x FROM pg_sleep(2) WHERE {day} IS NOT NULL"))
    assert err.value.code == "57014" and "ran longer than statement_timeout_ms" in str(err.value)


async def test_a_refused_connection_is_transient():
    port = closed_port()
    c = RedshiftConnector(RedshiftConfig(database=DB, host="127.0.0.1", port=port, user=USER,
                                         password=Secret(PASSWORD), ssl=False), name="rs")
    with pytest.raises(TransientError) as err:
        await c.check()
    assert err.value.code == "08006" and f"127.0.0.1:{port}" in str(err.value) and "refused" in str(err.value)


async def test_a_server_without_ssl_is_named_when_ssl_is_on(proxy):
    with pytest.raises(PermanentError, match="does not accept SSL"):
        await connector(proxy, ssl=True).check()


async def test_a_connection_reset_during_a_query_is_transient(pg):
    with RedshiftProxy(pg.host, pg.port) as own:
        c = connector(own, application_name="ingestd-reset")
        task = asyncio.create_task(c.probe(day_query("SELECT 1 AS x FROM pg_sleep(5) WHERE {day} IS NOT NULL")))
        await asyncio.to_thread(wait_until, lambda: any(s[1] == "active" for s in sessions(pg, "ingestd-reset")),
                                10, "the probe to run")
        own.reset_connections()
        with pytest.raises(TransientError) as err:
            await asyncio.wait_for(task, 10)
    assert err.value.code == "08006"


async def test_a_backend_terminated_during_a_fetch_is_transient_and_the_kernel_retry_succeeds(pg, proxy):
    table = events_table(pg)
    add_events(pg, table, DAY, 3000)
    c = connector(proxy, fetch_size=100, application_name="ingestd-kill")
    query = day_query(f"SELECT * FROM {table} WHERE ts >= {{start}} AND ts < {{end}}")
    policy = SimpleNamespace(retry_attempts=3, retry_base_seconds=0.01, retry_max_seconds=0.05)
    attempts, errors = [], []

    async def attempt() -> int:
        attempts.append(1)
        rows = 0
        try:
            async for batch in c.fetch(query, 100):
                rows += batch.num_rows
                if len(attempts) == 1 and rows == 100:
                    pids = [s[0] for s in sessions(pg, "ingestd-kill")]
                    assert len(pids) == 1
                    sql(pg, "SELECT pg_terminate_backend(%s)", [pids[0]])
        except TransientError as exc:
            errors.append(exc)
            raise
        return rows

    assert await with_retry(policy, "load", attempt) == 3000
    assert len(attempts) == 2 and len(errors) == 1
    assert errors[0].code in ("08006", "57P01"), str(errors[0])


# -- cancellation and abandoned fetches -----------------------------------------------------------------------

async def test_a_cancelled_probe_cancels_its_query_on_the_server(pg, proxy):
    c = connector(proxy, application_name="ingestd-cancel")
    cancels = proxy.stats.cancels
    task = asyncio.create_task(c.probe(day_query("SELECT 1 AS x FROM pg_sleep(30) WHERE {day} IS NOT NULL")))
    await asyncio.to_thread(wait_until, lambda: any(s[1] == "active" for s in sessions(pg, "ingestd-cancel")),
                            10, "the probe to run")
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 5
    await asyncio.to_thread(wait_until, lambda: not sessions(pg, "ingestd-cancel"), 5, "the session to end")
    assert proxy.stats.cancels > cancels, "the query was cancelled with a CancelRequest"


async def test_an_abandoned_fetch_stops_its_thread_and_closes_the_cursor_and_session(pg, proxy):
    table = events_table(pg)
    add_events(pg, table, DAY, 5000)
    c = connector(proxy, fetch_size=50, application_name="ingestd-abandon")
    stream = c.fetch(day_query(f"SELECT * FROM {table} WHERE ts >= {{start}} AND ts < {{end}}"), 100)
    first = await anext(stream)
    assert first.num_rows == 100
    assert len(sessions(pg, "ingestd-abandon")) == 1
    await stream.aclose()
    assert not [t for t in threading.enumerate() if t.name.startswith("redshift-fetch-")]
    await asyncio.to_thread(wait_until, lambda: not sessions(pg, "ingestd-abandon"), 5, "the session to end")
    assert (await c.probe(day_query(f"SELECT * FROM {table} WHERE ts >= {{start}} AND ts < {{end}}"))).rows == 5000


async def test_a_fetch_cancelled_while_the_day_query_runs_cancels_it(pg, proxy):
    c = connector(proxy, application_name="ingestd-cancel-fetch")
    query = day_query("SELECT 1 AS x FROM pg_sleep(30) WHERE {day} IS NOT NULL")

    async def consume():
        async for _ in c.fetch(query, 10):
            pass

    task = asyncio.create_task(consume())
    await asyncio.to_thread(wait_until, lambda: any(s[1] == "active" for s in sessions(pg, "ingestd-cancel-fetch")),
                            10, "the fetch to run")
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 5
    await asyncio.to_thread(wait_until, lambda: not sessions(pg, "ingestd-cancel-fetch"), 5, "the session to end")


# -- the daemon end to end ---------------------------------------------------------------------------------

def daemon_toml(folder, proxy, table: str, *, password_env: str = "RS_TEST_PASSWORD") -> str:
    text = f"""
    [daemon]
    state_path = "state.db"
    batch_rows = 1000
    retry_attempts = 3
    retry_base_seconds = 0.05
    retry_max_seconds = 0.2

    [bus]
    enabled = false

    [sinks.main]
    type = "duckdb"
    path = "analytics.duckdb"

    [connections.rs]
    type = "redshift"
    host = "{proxy.host}"
    port = {proxy.port}
    database = "{DB}"
    user = "{USER}"
    password_env = "{password_env}"
    ssl = false
    fetch_size = 400
    application_name = "ingestd-e2e"

    [sources.orders]
    connection = "rs"
    kind = "events"
    query = "SELECT ts, user_id, event, value, props FROM {table} WHERE ts >= {{start}} AND ts < {{end}}"
    schedule = ["0 6 * * *"]
    lag_days = 1

    [sources.orders.recheck]
    schedule = ["0 18 * * *"]
    lookback_days = 1
    threshold_pct = 1.0

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


def at(day: dt.date, hh: int, mm: int = 5) -> str:
    return dt.datetime(day.year, day.month, day.day, hh, mm, tzinfo=dt.UTC).isoformat()


def test_the_daemon_loads_a_redshift_day_and_reloads_it_when_it_grows(tmp_path, pg, proxy):
    table = events_table(pg)
    add_events(pg, table, DAY, 4000)
    add_events(pg, table, DAY - dt.timedelta(days=1), 10, start_id=90_000)  # the day before: not in the day
    cfg = daemon_toml(tmp_path, proxy, table)
    env = cli_env(RS_TEST_PASSWORD=PASSWORD)
    nxt = DAY + dt.timedelta(days=1)

    def partition():
        rows = state_query(tmp_path / "state.db", "SELECT status, generation, rows, source_rows FROM partitions "
                           "WHERE source = 'orders' AND day = ?", (DAY.isoformat(),))
        return rows[0] if rows else None

    out = ingestd("run", "--once", "--now", at(nxt, 6), config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert partition() == ("succeeded", 1, 4000, 4000), out.stdout + out.stderr
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", DAY) == 4000

    # issue 16: a preview's row limit runs in Redshift (LIMIT on the wrapped day query)
    out = ingestd("preview", "orders", "--day", DAY.isoformat(), "--rows", "7", "--json", config=cfg, env=env)
    p = json.loads(out.stdout)
    assert (p["rows_read"], p["mapped"], p["limit"], p["ok"]) == (7, 7, "in the warehouse", True), out.stderr
    assert p["rows"][0]["event_name"] == "click" and p["rows"][0]["id_type"] == "user_id"

    add_events(pg, table, DAY, 200, start_id=50_000)  # the day grows 5%
    out = ingestd("run", "--once", "--now", at(nxt, 18), config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"schema.changed"' not in out.stdout, "the re-check's schema probe must see the loaded schema"
    assert partition() == ("succeeded", 2, 4200, 4200), out.stdout + out.stderr
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", DAY) == 4200
    runs = state_query(tmp_path / "state.db", "SELECT trigger, status, rows_fetched FROM runs WHERE day = ? "
                       "ORDER BY started_at", (DAY.isoformat(),))
    assert runs == [("scheduled", "succeeded", 4000), ("recheck", "succeeded", 4200)]
    assert PASSWORD not in out.stdout + out.stderr


def test_ingestd_check_shows_a_bad_password_with_its_sqlstate(tmp_path, pg, proxy):
    table = events_table(pg)
    cfg = daemon_toml(tmp_path, proxy, table)
    out = ingestd("check", config=cfg, env=cli_env(RS_TEST_PASSWORD="wrong-password"))
    assert out.returncode != 0
    assert (f'FAILED orders: connection rs: [28P01] Redshift refused the user name or password: '
            f'password authentication failed for user "{USER}"') in out.stdout, out.stdout + out.stderr
    assert "wrong-password" not in out.stdout + out.stderr
    out = ingestd("check", config=cfg, env=cli_env(RS_TEST_PASSWORD=PASSWORD))
    assert out.returncode == 0 and "ok     orders: connection rs (redshift)" in out.stdout, out.stdout + out.stderr
