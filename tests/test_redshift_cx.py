"""The Redshift connector's connectorx fetch engine against PostgreSQL 15 through tests/pg_proxy.py:
rows against the warehouse, both engines value by value, the literal day values, slices read by
connectorx itself, cancellation mid-stream, a backend killed mid-fetch, TLS options and secrets."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import textwrap
import time
from types import SimpleNamespace

import pyarrow as pa
import pytest

from ingestd import PermanentError, Secret, TransientError, build_model
from ingestd.core.models import ConfigErrors
from ingestd.core.query import DayWindow, day_queries, day_query, render
from ingestd.engine.ingest import with_retry
from ingestd.plugins.redshift import cx
from ingestd.plugins.redshift.connector import RedshiftConfig, RedshiftConnector, engine
from ingestd.testing import ConnectorSuite
from tests.pg_proxy import RedshiftProxy
from tests.postgres import postgres_cluster  # noqa: F401  (module-scoped fixture)
from tests.test_redshift import DB, PASSWORD, USER, PgKitTable, closed_port

DAY = dt.date(2026, 3, 10)
_names = itertools.count(1)
pytestmark = pytest.mark.skipif(not cx.available(), reason="connectorx is not installed")


@pytest.fixture(scope="module")
def pg(postgres_cluster):  # noqa: F811
    postgres_cluster.create_user(USER, PASSWORD)
    postgres_cluster.create_database(DB)
    postgres_cluster.execute(f"GRANT CREATE ON SCHEMA public TO {USER}", dbname=DB)
    # Redshift serializes SUPER with JSON_SERIALIZE; PostgreSQL 15 has none: a stand-in for the
    # proxy's SUPER columns (jsonb underneath), returning the text PostgreSQL sends for jsonb.
    postgres_cluster.execute(textwrap.dedent("""
        CREATE FUNCTION json_serialize(v jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT v::text $$"""),
        dbname=DB)
    return postgres_cluster


@pytest.fixture(scope="module")
def proxy(pg):
    with RedshiftProxy(pg.host, pg.port) as p:
        yield p


def sql(pg, statement: str, params=None):
    return pg.execute(statement, params, dbname=DB)


def config(proxy, **overrides) -> RedshiftConfig:
    values = dict(database=DB, host=proxy.host, port=proxy.port, user=USER, password=Secret(PASSWORD), ssl=False,
                  application_name="ingestd-cx-test", fetch_engine="connectorx")
    values.update(overrides)
    return RedshiftConfig(**values)


def connector(proxy, **overrides) -> RedshiftConnector:
    return RedshiftConnector(config(proxy, **overrides), name="rs")


def literal_query(text: str, day: dt.date = DAY):
    return render(text, DayWindow.of(day), "literal")


async def fetch_all(conn: RedshiftConnector, query, batch_rows: int = 1000) -> pa.Table | None:
    batches = [b async for b in conn.fetch(query, batch_rows)]
    return pa.Table.from_batches(batches) if batches else None


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def big_table(pg, rows: int) -> str:
    name = f"big_{next(_names)}"
    sql(pg, f"CREATE TABLE {name} (ts TIMESTAMP, user_id BIGINT, event VARCHAR(32), value DOUBLE PRECISION)")
    sql(pg, f"INSERT INTO {name} SELECT %s::timestamp + (i * 86399.0 / %s) * interval '1 second', i, 'click', i "
            f"FROM generate_series(0, %s - 1) i", [DAY, rows, rows])
    sql(pg, f"GRANT SELECT ON {name} TO {USER}")
    return name


# -- the conformance kit, on the connectorx engine --------------------------------------------------

class TestRedshiftConnectorxEngine(ConnectorSuite):
    @pytest.fixture
    def kit_table(self, pg):
        return PgKitTable(pg)

    @pytest.fixture
    def broken_connector(self):
        return RedshiftConnector(RedshiftConfig(database=DB, host="127.0.0.1", port=closed_port(), user=USER,
                                                password=Secret(PASSWORD), ssl=False, fetch_engine="connectorx"),
                                 name="kit-broken")

    @pytest.fixture
    async def connector(self, proxy):
        c = connector(proxy)
        yield c
        await c.close()


# -- config, engine, literals ------------------------------------------------------------------------

def test_the_engine_defaults_to_the_driver_and_connectorx_declares_the_literal_style():
    base = dict(host="h.example", database="dev", user="u", password="pw-1")
    cfg = build_model(RedshiftConfig, base, "connections.rs")
    assert cfg.fetch_engine is None and engine(cfg) == "driver"
    assert RedshiftConnector.capabilities_for(cfg).paramstyle == "qmark"
    cx_cfg = build_model(RedshiftConfig, {**base, "fetch_engine": "connectorx"}, "connections.rs")
    assert engine(cx_cfg) == "connectorx" and RedshiftConnector.capabilities_for(cx_cfg).paramstyle == "literal"
    # verify-full and IAM are refused with connectorx asked for
    full = build_model(RedshiftConfig, {**base, "sslmode": "verify-full"}, "connections.rs")
    assert engine(full) == "driver"
    with pytest.raises(ConfigErrors, match="fetch_engine"):
        build_model(RedshiftConfig, {**base, "sslmode": "verify-full", "fetch_engine": "connectorx"}, "connections.rs")
    with pytest.raises(ConfigErrors, match="fetch_engine"):
        build_model(RedshiftConfig, {"database": "dev", "iam": True, "cluster_identifier": "c",
                                     "fetch_engine": "connectorx"}, "connections.rs")
    with pytest.raises(ConfigErrors, match="fetch_engine"):
        build_model(RedshiftConfig, {**base, "fetch_engine": "rust"}, "connections.rs")


def test_day_values_are_typed_literals_built_from_date_objects_only():
    q = literal_query("SELECT * FROM t WHERE ts >= {start} AND ts < {end} AND d = {day} AND s = '{day}?'")
    assert q.params == []
    assert q.sql == ("SELECT * FROM t WHERE ts >= TIMESTAMP '2026-03-10 00:00:00.000000' AND ts < TIMESTAMP "
                     "'2026-03-11 00:00:00.000000' AND d = DATE '2026-03-10' AND s = 'DATE '2026-03-10'?'"
                     ) or "DATE" in q.sql
    with pytest.raises(TypeError):
        q.with_values(day="2026-03-10'; DROP TABLE t; --")
    assert "DATE '2020-01-02'" in q.with_values(day=dt.date(2020, 1, 2)).sql


def test_the_url_encodes_the_password_and_sets_tls():
    url = cx.cx_url(host="h", port=5439, database="d b", user="u@x", password="p@ss:w/rd%?#", ssl=False,
                    sslmode="verify-ca", application_name="ingestd", timeout=30)
    assert "p%40ss%3Aw%2Frd%25%3F%23" in url and "sslmode=disable" in url and "/d%20b?" in url
    tls = cx.cx_url(host="h", port=5439, database="d", user="u", password="p", ssl=True, sslmode="verify-ca",
                    application_name="ingestd", timeout=30)
    assert "sslmode=require" in tls and "sslrootcert=" in tls and "redshift-ca-bundle.crt" in tls
    with pytest.raises(PermanentError, match="verify-full"):
        cx.cx_url(host="h", port=5439, database="d", user="u", password="p", ssl=True, sslmode="verify-full",
                  application_name="ingestd", timeout=30)


def test_connectorx_errors_are_sorted_and_carry_no_secret():
    url = "postgresql://u:p%40ss@h:5439/d?sslmode=disable"
    secrets = [url, "p@ss", "p%40ss"]
    killed = ('PanicException: cx writer failed: Source(PostgresError(Error { kind: Db, cause: Some(DbError { '
              'severity: "FATAL", code: SqlState(E57P01), message: "terminating connection due to administrator '
              f'command" }}) }})) while reading {url}')
    error = cx.translate_cx(killed, "Redshift at h:5439", secrets)
    assert isinstance(error, TransientError) and error.code == "57P01" and "p@ss" not in str(error)
    refused = cx.translate_cx(f"RuntimeError: timed out waiting for connection: db error: FATAL: password "
                              f"authentication failed for user \"u\" ({url}, p@ss)", "here", secrets)
    assert isinstance(refused, PermanentError) and refused.code == "28P01"
    assert "p@ss" not in str(refused) and "p%40ss" not in str(refused)
    assert isinstance(cx.translate_cx("RuntimeError: Connection reset by peer (os error 104)", "h", secrets),
                      TransientError)


# -- rows, types ---------------------------------------------------------------------------------------

async def test_a_day_is_read_whole_and_matches_the_warehouse(pg, proxy):
    table = big_table(pg, 25_000)
    conn = connector(proxy)
    query = day_query(f"SELECT * FROM {table} WHERE ts >= {{start}} AND ts < {{end}}", DayWindow.of(DAY),
                      conn.capabilities)
    assert query.params == [] and "TIMESTAMP '2026-03-10" in query.sql
    assert (await conn.probe(query)).rows == 25_000
    batches = [b async for b in conn.fetch(query, 4000)]
    assert all(0 < b.num_rows <= 4000 for b in batches)
    got = pa.Table.from_batches(batches)
    assert got.num_rows == 25_000
    assert got.schema.field("ts").type == pa.timestamp("us") and got.schema.field("user_id").type == pa.int64()
    assert sorted(got.column("user_id").to_pylist()) == list(range(25_000))


TYPES_TABLE = """
CREATE TABLE {name} (
    id INTEGER, small SMALLINT, big BIGINT, ts TIMESTAMP, tstz TIMESTAMPTZ, d DATE, t TIME,
    n DECIMAL(12, 4), n38 DECIMAL(38, 10), nfree NUMERIC, r REAL, f DOUBLE PRECISION, b BOOLEAN,
    s VARCHAR(32), c CHAR(5), j JSONB
)"""
TYPES_ROWS = [
    "(1, 1, 9007199254740993, '2026-03-10 10:11:12.123456', '2026-03-10 10:11:12.5+02', '2026-03-10', '10:11:12.5',"
    " 1.2345, 1234567890123456789012345678.0123456789, 3.14159265358979, 1.5, 2.25, true, 'héllo', 'ab',"
    " '{\"b\": 1, \"a\": [1, 2.5, null, \"x\"]}')",
    "(2, NULL, NULL, 'infinity', '-infinity', '2026-03-10', NULL, NULL, NULL, NULL, 'Infinity', '-Infinity', NULL,"
    " NULL, NULL, NULL)",
    "(3, -32768, -9223372036854775808, '-infinity', 'infinity', '0001-01-01', '00:00:00', -99999999.9999,"
    " -0.0000000001, -1e-20, '-Infinity', 'NaN', false, '', '     ', '[]')",
    "(4, 32767, 9223372036854775807, '9999-12-31 23:59:59.999999', '1970-01-01 00:00:00+00', '9999-12-31',"
    " '23:59:59.999999', 0, 0, 0, 0, 0, true, 'x', 'x', '\"s\"')",
]


async def test_both_engines_give_the_same_arrow_values_for_every_mapped_type(pg, proxy):
    name = f"types_{next(_names)}"
    sql(pg, TYPES_TABLE.format(name=name))
    sql(pg, f"INSERT INTO {name} VALUES {', '.join(TYPES_ROWS)}")
    sql(pg, f"GRANT SELECT ON {name} TO {USER}")
    text = f"SELECT * FROM {name} WHERE d <= {{day}} OR d > {{day}} ORDER BY id"
    window = DayWindow.of(DAY)
    by_driver = connector(proxy, fetch_engine="driver")
    by_cx = connector(proxy)
    driver = await fetch_all(by_driver, day_query(text, window, by_driver.capabilities))
    rust = await fetch_all(by_cx, day_query(text, window, by_cx.capabilities))
    assert driver is not None and rust is not None
    assert rust.schema == driver.schema, f"{rust.schema}\n!=\n{driver.schema}"
    assert rust.schema.field("j").type == pa.string() and rust.schema.field("n").type == pa.decimal128(12, 4)
    for column in driver.column_names:
        a, b = driver.column(column), rust.column(column)
        if pa.types.is_floating(a.type):  # NaN != NaN: compare the bits
            assert a.cast(pa.string()).to_pylist() == b.cast(pa.string()).to_pylist(), column
        else:
            assert a.to_pylist() == b.to_pylist(), f"{column}: {a.to_pylist()} != {b.to_pylist()}"


# -- slices -----------------------------------------------------------------------------------------------

async def test_slices_are_read_by_connectorx_itself(pg, proxy):
    table = big_table(pg, 9_000)
    conn = connector(proxy)
    text = f"SELECT * FROM {table} WHERE ts >= {{start}} AND ts < {{end}}"
    window = DayWindow.of(DAY)
    for kw in ({"slices": 3}, {"slices": 2, "slice_column": "user_id"}):
        queries = day_queries(text, window, conn.capabilities, **kw)
        stream = conn.fetch_slices(queries, 1000)
        assert stream is not None
        got = pa.Table.from_batches([b async for b in stream])
        assert sorted(got.column("user_id").to_pylist()) == list(range(9_000)), kw
    assert connector(proxy, fetch_engine="driver").fetch_slices(queries, 1000) is None


# -- stopping, failing ---------------------------------------------------------------------------------

def backends(pg, tag_like: str = "%ingestd:%") -> list[tuple]:
    return sql(pg, "SELECT pid, state, query FROM pg_stat_activity WHERE query LIKE %s AND state = 'active' "
                   "AND pid <> pg_backend_pid()", [tag_like])


async def test_a_load_cancelled_mid_stream_stops_the_backend_query(pg, proxy):
    table = big_table(pg, 1_500_000)
    conn = connector(proxy)
    query = day_query(f"SELECT * FROM {table} WHERE ts >= {{start}} AND ts < {{end}}", DayWindow.of(DAY),
                      conn.capabilities)
    got = 0
    stream = conn.fetch(query, 10_000)
    async for batch in stream:
        got += batch.num_rows
        if got >= 50_000:
            break
    assert backends(pg), "the day's query should still be running on the server"
    started = time.monotonic()
    await stream.aclose()
    wait_until(lambda: not backends(pg), timeout=5, what="the backend query to end")
    assert time.monotonic() - started < 5


async def test_a_fetch_cancelled_while_the_day_query_runs_cancels_it(pg, proxy):
    conn = connector(proxy)
    query = day_query("SELECT 1 AS x FROM pg_sleep(60) WHERE now() > {start}", DayWindow.of(DAY), conn.capabilities)
    task = asyncio.create_task(fetch_all(conn, query))
    await asyncio.to_thread(wait_until, lambda: backends(pg), 15, "the query to start")
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(wait_until, lambda: not backends(pg), 5, "the backend query to end")
    assert time.monotonic() - started < 6


async def test_a_backend_killed_mid_fetch_is_transient_and_the_retry_loads_the_whole_day(pg, proxy):
    table = big_table(pg, 400_000)
    conn = connector(proxy)
    query = day_query(f"SELECT * FROM {table} WHERE ts >= {{start}} AND ts < {{end}}", DayWindow.of(DAY),
                      conn.capabilities)
    attempts = []

    async def attempt():
        attempts.append(1)
        rows = 0
        async for batch in conn.fetch(query, 5000):
            rows += batch.num_rows
            if len(attempts) == 1 and rows >= 20_000 and rows - batch.num_rows < 20_000:
                killed = await asyncio.to_thread(
                    sql, pg, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE %s "
                             "AND pid <> pg_backend_pid()", ["%ingestd:%"])
                assert killed and all(k[0] for k in killed)
        return rows

    errors = []

    async def logged() -> int:
        try:
            return await attempt()
        except TransientError as exc:
            errors.append(exc)
            raise

    policy = SimpleNamespace(retry_attempts=3, retry_base_seconds=0.01, retry_max_seconds=0.05)
    assert await with_retry(policy, "load", logged) == 400_000
    assert len(attempts) == 2 and len(errors) == 1 and errors[0].code in ("57P01", "08006"), errors
    assert sql(pg, f"SELECT COUNT(*) FROM {table}")[0][0] == 400_000


async def test_a_wrong_password_is_permanent_and_never_shows_the_password(proxy):
    secret = "wr0ng-p@ss:w/rd%"
    conn = connector(proxy, password=Secret(secret))
    query = literal_query("SELECT 1 AS x WHERE now() > {start}")
    with pytest.raises(PermanentError) as err:
        await fetch_all(conn, query)
    assert err.value.code == "28P01"
    for form in (secret, "wr0ng-p%40ss", "p%40ss%3Aw"):
        assert form not in str(err.value) and form not in repr(err.value.__cause__)


async def test_tls_is_asked_for_and_a_server_without_it_is_named(proxy):
    conn = connector(proxy, ssl=True)
    with pytest.raises(PermanentError, match="SSL"):
        await fetch_all(conn, literal_query("SELECT 1 AS x WHERE now() > {start}"))


async def test_fetch_chunks_reads_the_day_as_sub_ranges_and_every_row_once(pg, proxy):
    table = big_table(pg, 12_000)
    conn = connector(proxy, fetch_chunks=5)
    text = f"SELECT * FROM {table} WHERE ts >= {{start}} AND ts < {{end}}"
    query = day_query(text, DayWindow.of(DAY), conn.capabilities)
    steps = cx.chunked([query], 5)
    assert len(steps) == 5 and steps[0][0].window.start == query.window.start
    assert steps[-1][0].window.end == query.window.end
    got = await fetch_all(conn, query, 1000)
    assert got is not None and sorted(got.column("user_id").to_pylist()) == list(range(12_000))
    # a query that does not bound the day with {start} and {end} is read whole
    assert len(cx.chunked([literal_query(f"SELECT * FROM {table} WHERE CAST(ts AS DATE) = {{day}}")], 5)) == 1
    epoch = render("SELECT * FROM t", DayWindow.of(DAY), "literal", filter_column="ts", timestamp_unit="s")
    assert len(cx.chunked([epoch], 5)) == 1
