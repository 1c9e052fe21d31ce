"""The DuckDB connector on real DuckDB files: the conformance suite, and the demo warehouse."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import ingestd.plugins.duckdb as duckdb_plugin
from ingestd import PermanentError, Registry, TransientError, build_model
from ingestd.core.models import ConfigErrors
from ingestd.core.query import DayWindow, render
from ingestd.core.schema import Mapping, RowMapper
from ingestd.plugins.duckdb import connector as duckdb_connector
from ingestd.plugins.duckdb.connector import DuckDBConfig, DuckDBConnector
from ingestd.plugins.duckdb.demo_warehouse import MARKER, event_rows
from ingestd.testing import ConnectorSuite

EVENTS_QUERY = ("SELECT ts, user_id, device_id, event, value, country, platform, props FROM events_raw "
                "WHERE ts >= {start} AND ts < {end}")
METRICS_QUERY = "SELECT ds, user_id, metric, value, num, den FROM metrics_daily WHERE ds = {day}"
EVENTS_MAPPING = Mapping(timestamp="ts", event_name="event", event_value="value",
                         ids={"user_id": "user_id", "stable_id": "device_id"},
                         metadata=["country", "platform"], metadata_json="props")
METRICS_MAPPING = Mapping(date="ds", ids={"user_id": "user_id"}, metric_name="metric", metric_value="value",
                          numerator="num", denominator="den")

NOW = dt.datetime(2026, 3, 22, 10, 30, tzinfo=dt.UTC)
TODAY = NOW.date()


class DuckKitTable:
    """The kit's table in a DuckDB file, written through short read-write connections."""

    name = "kit_events"

    def __init__(self, path):
        self.path = str(path)
        with duckdb.connect(self.path) as con:
            con.execute(f"CREATE TABLE {self.name} (ts TIMESTAMP, user_id VARCHAR, event VARCHAR, value DOUBLE)")

    def _write(self, sql, rows):
        with duckdb.connect(self.path) as con:
            con.executemany(sql, rows)

    async def insert(self, rows):
        await asyncio.to_thread(self._write, f"INSERT INTO {self.name} VALUES (?, ?, ?, ?)", rows)

    async def update_value(self, user_id, value):
        await asyncio.to_thread(self._write, f"UPDATE {self.name} SET value = ? WHERE user_id = ?", [(value, user_id)])


def connector_on(path, clock=NOW, **config) -> DuckDBConnector:
    c = DuckDBConnector(DuckDBConfig(path=Path(path), **config), name="wh")
    c.clock = lambda: clock
    return c


class TestDuckDBConnector(ConnectorSuite):
    @pytest.fixture
    def kit_table(self, tmp_path):
        return DuckKitTable(tmp_path / "warehouse.duckdb")

    @pytest.fixture
    async def connector(self, kit_table):
        c = connector_on(kit_table.path)
        yield c
        await c.close()

    @pytest.fixture
    async def broken_connector(self, tmp_path):
        c = connector_on(tmp_path / "missing" / "warehouse.duckdb")
        yield c
        await c.close()


class TestDuckDBConnectorInDemoMode(ConnectorSuite):
    """The same bar with demo landing before every call, on a demo file holding the kit table."""

    batch_rows = 64

    @pytest.fixture
    def kit_table(self, tmp_path):
        path = tmp_path / "demo.duckdb"
        duckdb_connector.ensure_demo_warehouse(path, today=TODAY, days=2, rows_per_day=50)
        return DuckKitTable(path)

    @pytest.fixture
    async def connector(self, kit_table):
        c = connector_on(kit_table.path, demo=True, demo_days=2, demo_rows_per_day=50)
        yield c
        await c.close()

    @pytest.fixture
    async def broken_connector(self, tmp_path):
        (tmp_path / "not-a-file").mkdir()
        c = connector_on(tmp_path / "not-a-file", demo=True, demo_days=2, demo_rows_per_day=50)
        yield c
        await c.close()


# -- plugin and config -----------------------------------------------------------------------

def test_registers_the_duckdb_type_and_declares_its_api():
    registry = Registry()
    duckdb_plugin.ingestd_register(registry)
    assert registry.connectors["duckdb"] is DuckDBConnector
    assert duckdb_plugin.INGESTD_API == (2, 2)
    assert DuckDBConnector.capabilities.fingerprint and DuckDBConnector.capabilities.paramstyle == "qmark"


def test_config_defaults_and_bad_keys():
    cfg = build_model(DuckDBConfig, {"path": "var/warehouse.duckdb", "demo": True}, "connections.demo")
    assert (cfg.demo, cfg.demo_days, cfg.demo_rows_per_day, cfg.threads) == (True, 21, 5000, 1)
    with pytest.raises(ConfigErrors) as err:
        build_model(DuckDBConfig, {"path": "x", "demo_days": 0}, "connections.demo")
    assert "connections.demo.demo_days" in str(err.value)
    with pytest.raises(ConfigErrors):
        build_model(DuckDBConfig, {"path": "x", "nope": 1}, "connections.demo")


# -- errors ----------------------------------------------------------------------------------

async def test_a_missing_file_is_a_permanent_error_naming_it(tmp_path):
    c = connector_on(tmp_path / "nowhere.duckdb")
    with pytest.raises(PermanentError, match="nowhere.duckdb"):
        await c.check()
    assert not (tmp_path / "nowhere.duckdb").exists()


async def test_a_missing_table_is_named_in_the_error(tmp_path):
    kit = DuckKitTable(tmp_path / "w.duckdb")
    c = connector_on(kit.path)
    query = render("SELECT * FROM no_such_table WHERE ts >= {start} AND ts < {end}", DayWindow.of(TODAY), "qmark")
    with pytest.raises(PermanentError, match="no_such_table") as err:
        await c.check(query)
    assert "LINE" not in str(err.value) and "Catalog Error" not in str(err.value)


async def test_a_file_locked_by_another_process_is_a_transient_error(tmp_path):
    path = tmp_path / "w.duckdb"
    DuckKitTable(path)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import duckdb, sys, time
            con = duckdb.connect({str(path)!r})
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TransientError):
            await connector_on(path).check()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    await connector_on(path).check()


async def test_a_fetch_cancelled_during_a_long_read_is_interrupted_and_releases_the_file(tmp_path):
    kit = DuckKitTable(tmp_path / "w.duckdb")
    c = connector_on(kit.path)
    slow = render("SELECT sum(hash(i) % 7) AS s FROM range(20000000000) t(i) WHERE {day} IS NOT NULL",
                  DayWindow.of(TODAY), "qmark")

    async def consume():
        async for _ in c.fetch(slow, 10):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    await kit.insert([(dt.datetime(2026, 3, 10), "u", "e", 1.0)])  # read-write: only once the reader is closed


async def test_a_cancelled_probe_interrupts_its_query(tmp_path):
    kit = DuckKitTable(tmp_path / "w.duckdb")
    c = connector_on(kit.path)
    slow = render("SELECT i FROM range(20000000000) t(i) WHERE hash(i) = 12345 AND {day} IS NOT NULL",
                  DayWindow.of(TODAY), "qmark")
    task = asyncio.create_task(c.probe(slow))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    await kit.insert([(dt.datetime(2026, 3, 10), "u", "e", 1.0)])


async def test_a_fetch_dropped_without_aclose_is_closed_by_the_event_loop(tmp_path):
    kit = DuckKitTable(tmp_path / "w.duckdb")
    await kit.insert([(dt.datetime(2026, 3, 10) + dt.timedelta(seconds=i), f"u{i}", "e", float(i)) for i in range(500)])
    c = connector_on(kit.path)
    query = render(f"SELECT * FROM {kit.name} WHERE ts >= {{start}} AND ts < {{end}}",
                   DayWindow.of(dt.date(2026, 3, 10)), "qmark")

    async def stalled_consumer():
        async for _ in c.fetch(query, 10):
            await asyncio.sleep(10)

    task = asyncio.create_task(stalled_consumer())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    del task
    gc.collect()
    for _ in range(50):
        await asyncio.sleep(0.02)
        try:
            await kit.update_value("u1", 2.0)
            break
        except duckdb.ConnectionException:
            continue
    else:
        raise AssertionError("the abandoned fetch still holds its connection")
    assert (await c.probe(query)).rows == 500


async def test_fetch_rechunks_and_keeps_timestamps_naive_utc(tmp_path):
    kit = DuckKitTable(tmp_path / "w.duckdb")
    await kit.insert([(dt.datetime(2026, 3, 10, 23, 59, 59), "late", "e", 1.0)])
    c = connector_on(kit.path)
    query = render(f"SELECT * FROM {kit.name} WHERE ts >= {{start}} AND ts < {{end}}",
                   DayWindow.of(dt.date(2026, 3, 10)), "qmark")
    batches = [b async for b in c.fetch(query, 1)]
    assert [b.num_rows for b in batches] == [1]
    assert batches[0].column(0).to_pylist() == [dt.datetime(2026, 3, 10, 23, 59, 59)]
    assert batches[0].schema.field("ts").type == pa.timestamp("us")


# -- the demo warehouse ----------------------------------------------------------------------

def days_in(path, table="events_raw", column="CAST(ts AS DATE)"):
    with duckdb.connect(str(path), read_only=True) as con:
        return [r[0] for r in con.execute(f"SELECT DISTINCT {column} FROM {table} ORDER BY 1").fetchall()]


def demo_query(sql, day):
    return render(sql, DayWindow.of(day), "qmark")


async def test_demo_warehouse_is_created_when_missing_with_demo_days_of_history(tmp_path):
    path = tmp_path / "var" / "warehouse.duckdb"
    c = connector_on(path, demo=True, demo_days=5, demo_rows_per_day=400)
    await c.check()
    expected = [TODAY - dt.timedelta(days=i) for i in range(5, 0, -1)]
    assert days_in(path) == expected
    assert days_in(path, "metrics_daily", "ds") == expected
    assert days_in(path, MARKER, "day") == expected
    for day in expected:
        assert (await c.probe(demo_query(EVENTS_QUERY, day))).rows == event_rows(day, 400)
        assert (await c.probe(demo_query(METRICS_QUERY, day))).rows == 400 // 20 * 4
    assert (await c.probe(demo_query(EVENTS_QUERY, TODAY))).rows == 0


async def test_demo_days_are_the_same_rows_every_time(tmp_path):
    one, two = tmp_path / "one.duckdb", tmp_path / "two.duckdb"
    a = connector_on(one, demo=True, demo_days=3, demo_rows_per_day=300)
    b = connector_on(two, demo=True, demo_days=3, demo_rows_per_day=300, clock=NOW + dt.timedelta(days=1))
    await a.check()
    await b.check()
    day = TODAY - dt.timedelta(days=1)
    for sql in (EVENTS_QUERY, METRICS_QUERY):
        pa_, pb = await a.probe(demo_query(sql, day)), await b.probe(demo_query(sql, day))
        assert pa_ == pb and pa_.rows > 0
    shared = f"BETWEEN DATE '{TODAY - dt.timedelta(days=2)}' AND DATE '{TODAY - dt.timedelta(days=1)}'"
    with duckdb.connect() as con:
        con.execute(f"ATTACH '{one}' AS one (READ_ONLY)")
        con.execute(f"ATTACH '{two}' AS two (READ_ONLY)")
        for table, day_of in (("events_raw", "CAST(ts AS DATE)"), ("metrics_daily", "ds")):
            side = lambda db, table=table, day_of=day_of: (  # noqa: E731
                f"SELECT * FROM {db}.{table} WHERE {day_of} {shared}")
            rows = con.execute(f"SELECT count(*) FROM ({side('one')})").fetchone()[0]
            diff = con.execute(f"SELECT count(*) FROM (({side('one')} EXCEPT ALL {side('two')})"
                               f" UNION ALL ({side('two')} EXCEPT ALL {side('one')}))").fetchone()[0]
            assert rows > 0 and diff == 0, f"{table}: days shared by both files must hold identical rows"


async def test_shipped_queries_and_mappings_work_on_a_demo_day_with_a_few_rejects(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    c = connector_on(path, demo=True, demo_days=2)
    day = TODAY - dt.timedelta(days=1)
    for kind, sql, mapping, columns in [
        ("events", EVENTS_QUERY, EVENTS_MAPPING,
         ["ts", "user_id", "device_id", "event", "value", "country", "platform", "props"]),
        ("metrics", METRICS_QUERY, METRICS_MAPPING, ["ds", "user_id", "metric", "value", "num", "den"]),
    ]:
        query = demo_query(sql, day)
        await c.check(query)
        probed = await c.probe(query)
        mapper = RowMapper(kind, mapping, DayWindow.of(day), source=f"demo_{kind}", generation=1,
                           ingested_at=NOW)
        loaded, rejects, fetched = 0, Counter(), 0
        try:
            async for batch in c.fetch(query, 2000):
                assert batch.schema.names == columns
                fetched += batch.num_rows
                mapped = mapper.map(batch)
                loaded += mapped.rows.num_rows
                rejects.update(mapped.rejects)
        finally:
            mapper.close()
        assert fetched == probed.rows >= 1000
        assert rejects["missing_unit_id"] > 0, "the demo shows the reject path"
        assert 0 < sum(rejects.values()) < 0.01 * fetched, rejects
        assert loaded == fetched - sum(rejects.values())


async def test_newly_completed_days_land_before_the_next_call(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    c = connector_on(path, demo=True, demo_days=3, demo_rows_per_day=200)
    yesterday = TODAY - dt.timedelta(days=1)
    before = await c.probe(demo_query(EVENTS_QUERY, yesterday))
    assert (await c.probe(demo_query(EVENTS_QUERY, TODAY))).rows == 0
    c.clock = lambda: NOW + dt.timedelta(days=2)
    landed = await c.probe(demo_query(EVENTS_QUERY, TODAY))
    assert landed.rows == event_rows(TODAY, 200)
    assert (await c.probe(demo_query(METRICS_QUERY, TODAY + dt.timedelta(days=1)))).rows > 0
    assert (await c.probe(demo_query(EVENTS_QUERY, TODAY + dt.timedelta(days=2)))).rows == 0
    assert await c.probe(demo_query(EVENTS_QUERY, yesterday)) == before
    assert len(days_in(path)) == 5


async def test_a_landing_waits_for_an_open_fetch_and_happens_on_a_later_call(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    c = connector_on(path, demo=True, demo_days=2, demo_rows_per_day=5000)
    stream = c.fetch(demo_query(EVENTS_QUERY, TODAY - dt.timedelta(days=1)), 100)
    await anext(stream)
    c.clock = lambda: NOW + dt.timedelta(days=1)
    assert (await c.probe(demo_query(EVENTS_QUERY, TODAY))).rows == 0
    await stream.aclose()
    assert (await c.probe(demo_query(EVENTS_QUERY, TODAY))).rows == event_rows(TODAY, 5000)


async def test_a_removed_day_is_landed_again_with_the_same_rows(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    c = connector_on(path, demo=True, demo_days=3, demo_rows_per_day=300)
    day = TODAY - dt.timedelta(days=2)
    first = await c.probe(demo_query(EVENTS_QUERY, day))
    with duckdb.connect(str(path)) as con:
        con.execute("DELETE FROM events_raw WHERE CAST(ts AS DATE) = ?", [day])
        con.execute("DELETE FROM metrics_daily WHERE ds = ?", [day])
        con.execute(f"DELETE FROM {MARKER} WHERE day = ?", [day])
    c2 = connector_on(path, demo=True, demo_days=3, demo_rows_per_day=300)
    assert await c2.probe(demo_query(EVENTS_QUERY, day)) == first


async def test_an_existing_file_without_demo_tables_is_left_untouched(tmp_path):
    kit = DuckKitTable(tmp_path / "mine.duckdb")
    c = connector_on(kit.path, demo=True)
    await c.check()
    with duckdb.connect(kit.path, read_only=True) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert tables == {"kit_events"}
