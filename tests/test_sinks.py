"""The built-in sinks: the conformance kit's SinkSuite on real files, plus what is particular to
each (DuckDB's invisible chunks, crash garbage and file lock; SQLite's value formats)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import subprocess
import sys
import textwrap

import duckdb
import pytest

import ingestd.plugins.duckdb_sink as duckdb_sink
import ingestd.plugins.sqlite_sink as sqlite_sink
from ingestd import PartitionInfo, Registry, SinkError, Target, build_model
from ingestd.core.errors import ConfigErrors
from ingestd.plugins.duckdb_sink.sink import DuckDBSink, DuckDBSinkConfig
from ingestd.plugins.sqlite_sink.sink import SQLiteSink, SQLiteSinkConfig
from ingestd.testing import SinkSuite
from ingestd.testing.sink_suite import DAY, Gate, KitFailure, feed, kit_batch, kit_batches
from tests.support import ROOT


def duck(path, **kw) -> DuckDBSink:
    return DuckDBSink(DuckDBSinkConfig(path=str(path), **{"chunk_rows": 100, **kw}), name="test")


async def opened(sink):
    await sink.open()
    return sink


class TestDuckDBSink(SinkSuite):
    @pytest.fixture
    async def sink(self, tmp_path):
        sink = await opened(duck(tmp_path / "sink.duckdb"))
        yield sink
        await sink.close()

    @pytest.fixture
    def reopen_sink(self, tmp_path):
        return lambda: opened(duck(tmp_path / "sink.duckdb"))


class TestSQLiteSink(SinkSuite):
    @pytest.fixture
    async def sink(self, tmp_path):
        sink = await opened(SQLiteSink(SQLiteSinkConfig(path=str(tmp_path / "sink.sqlite")), name="test"))
        yield sink
        await sink.close()

    @pytest.fixture
    def reopen_sink(self, tmp_path):
        return lambda: opened(SQLiteSink(SQLiteSinkConfig(path=str(tmp_path / "sink.sqlite")), name="test"))


def events(source, generation, rows, *, start=0, batch_rows=100):
    return kit_batches("events", source, DAY, generation, rows, batch_rows=batch_rows, start=start)


def counts(con, source="s"):
    return (con.execute("SELECT count(*) FROM events WHERE source = ?", [source]).fetchone()[0],
            con.execute("SELECT count(*) FROM events_data WHERE source = ?", [source]).fetchone()[0],
            con.execute("SELECT list(DISTINCT generation) FROM events WHERE source = ?", [source]).fetchone()[0])


# -- DuckDB ------------------------------------------------------------------------------------

async def test_duckdb_views_show_only_the_visible_generation_while_a_replace_runs(tmp_path):
    path = tmp_path / "a.duckdb"
    sink = await opened(duck(path))
    try:
        await sink.replace(Target("events", "s", DAY, 1), feed(events("s", 1, 1000)))
        gate = Gate(at=5)
        task = asyncio.create_task(sink.replace(Target("events", "s", DAY, 2), feed(events("s", 2, 700, start=5000),
                                                                                    gate=gate)))
        await asyncio.wait_for(gate.reached.wait(), 30)
        # same process, same file: DuckDB hands out another connection to the sink's open database
        with duckdb.connect(str(path)) as con:
            assert counts(con) == (1000, 1500, [1])  # five committed chunks of generation 2, invisible
        gate.go.set()
        assert await task == 700
        with duckdb.connect(str(path)) as con:
            assert counts(con) == (700, 700, [2])
            assert con.execute("SELECT count(*) FROM pending_writes").fetchone()[0] == 0
            assert con.execute("SELECT generation, rows FROM partitions").fetchall() == [(2, 700)]
    finally:
        await sink.close()


async def test_duckdb_a_failed_replace_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "a.duckdb"
    sink = await opened(duck(path))
    try:
        await sink.replace(Target("events", "s", DAY, 1), feed(events("s", 1, 1000)))
        with pytest.raises(KitFailure):
            await sink.replace(Target("events", "s", DAY, 2), feed(events("s", 2, 900, start=5000), fail_after=6))
        with duckdb.connect(str(path), read_only=True) as con:  # the sink has let go of the file
            assert counts(con) == (1000, 1000, [1])
            assert con.execute("SELECT count(*) FROM pending_writes").fetchone()[0] == 0
    finally:
        await sink.close()


async def test_duckdb_chunks_are_written_while_their_batches_arrive(tmp_path):
    """A chunk (here 450 rows) is one INSERT reading the batches as they come: before the chunk
    is complete, nothing of it is committed; once it is, it is, while the next one is written."""
    path = tmp_path / "a.duckdb"
    sink = await opened(duck(path, chunk_rows=450))
    try:
        gate = Gate(at=7)  # after 7 batches of 100: one chunk of 500 committed, 200 rows in the next
        task = asyncio.create_task(sink.replace(Target("events", "s", DAY, 1), feed(events("s", 1, 1000), gate=gate)))
        await asyncio.wait_for(gate.reached.wait(), 30)
        await asyncio.sleep(0.2)  # let the INSERT read what it was given
        with duckdb.connect(str(path)) as con:
            assert counts(con) == (0, 500, None)
        gate.go.set()
        assert await task == 1000
        with duckdb.connect(str(path)) as con:
            assert counts(con) == (1000, 1000, [1])
    finally:
        await sink.close()


@pytest.mark.parametrize("how", ["fails", "cancelled"])
async def test_duckdb_a_replace_stopped_inside_a_chunk_leaves_the_file_as_it_was(tmp_path, how):
    path = tmp_path / "a.duckdb"
    sink = await opened(duck(path, chunk_rows=450))
    try:
        await sink.replace(Target("events", "s", DAY, 1), feed(events("s", 1, 1000)))
        gate = Gate(at=7)
        batches = feed(events("s", 2, 900, start=5000), fail_after=7 if how == "fails" else None,
                       gate=gate if how == "cancelled" else None)
        task = asyncio.create_task(sink.replace(Target("events", "s", DAY, 2), batches))
        if how == "fails":
            with pytest.raises(KitFailure):
                await asyncio.wait_for(task, 30)
        else:
            await asyncio.wait_for(gate.reached.wait(), 30)
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)
        with duckdb.connect(str(path), read_only=True) as con:  # the sink has let go of the file
            assert counts(con) == (1000, 1000, [1])
            assert con.execute("SELECT count(*) FROM pending_writes").fetchone()[0] == 0
        assert await sink.replace(Target("events", "s", DAY, 2), feed(events("s", 2, 300))) == 300
    finally:
        await sink.close()


CRASH = '''
import asyncio, datetime as dt, os, sys
from ingestd import Target
from ingestd.testing.sink_suite import feed, kit_batches
from ingestd.plugins.duckdb_sink.sink import DuckDBSink, DuckDBSinkConfig

DAY = dt.date(2026, 11, 20)

async def dying(batches):
    async for i, batch in aenumerate(feed(batches)):
        if i == 4:
            os._exit(0)  # killed: no rollback, no cleanup, no close
        yield batch

async def aenumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1

async def main():
    sink = DuckDBSink(DuckDBSinkConfig(path=sys.argv[1], chunk_rows=100), name="crash")
    await sink.open()
    await sink.replace(Target("events", "s", DAY, 1), feed(kit_batches("events", "s", DAY, 1, 500, batch_rows=100)))
    await sink.replace(Target("events", "s", DAY, 2),
                       dying(kit_batches("events", "s", DAY, 2, 900, batch_rows=100, start=5000)))

asyncio.run(main())
'''


async def test_duckdb_open_deletes_the_garbage_of_a_killed_replace(tmp_path):
    path = tmp_path / "a.duckdb"
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASH))
    done = subprocess.run([sys.executable, str(script), str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    with duckdb.connect(str(path), read_only=True) as con:
        assert counts(con) == (500, 900, [1])  # four chunks of generation 2 were committed before the kill
        assert con.execute("SELECT generation FROM pending_writes").fetchall() == [(2,)]

    sink = await opened(duck(path))
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            assert counts(con) == (500, 500, [1])
            assert con.execute("SELECT count(*) FROM pending_writes").fetchone()[0] == 0
        assert await sink.read_generation("events", "s", DAY) == PartitionInfo(1, 500)
        assert await sink.replace(Target("events", "s", DAY, 2), feed(events("s", 2, 300))) == 300
        assert await sink.read_generation("events", "s", DAY) == PartitionInfo(2, 300)
    finally:
        await sink.close()


async def test_duckdb_a_replace_waits_for_an_analysts_read_lock(tmp_path):
    path = tmp_path / "a.duckdb"
    sink = await opened(duck(path, lock_wait_seconds=30))
    reader = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time\n"
         f"con = duckdb.connect({str(path)!r}, read_only=True)\n"
         "print(con.execute('SELECT count(*) FROM events').fetchone()[0], flush=True)\n"
         "time.sleep(1.5)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "0"  # the file is free between the sink's operations
        assert await sink.replace(Target("events", "s", DAY, 1), feed(events("s", 1, 300))) == 300
        assert reader.wait(10) == 0
    finally:
        reader.kill()
        await sink.close()


async def test_duckdb_a_replace_that_cannot_get_the_file_fails_clearly(tmp_path):
    path = tmp_path / "a.duckdb"
    sink = await opened(duck(path, lock_wait_seconds=0))
    reader = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys\n"
         f"con = duckdb.connect({str(path)!r}, read_only=True)\n"
         "print('ready', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "ready"
        with pytest.raises(SinkError, match="lock"):
            await sink.replace(Target("events", "s", DAY, 1), feed(events("s", 1, 300)))
    finally:
        reader.kill()
        reader.wait()
        await sink.close()


async def test_duckdb_rows_keep_their_values(tmp_path):
    path = tmp_path / "a.duckdb"
    sink = await opened(duck(path))
    batch = kit_batch("events", "s", DAY, 7, 50)
    metric = kit_batch("metrics", "s", DAY, 7, 50)
    try:
        await sink.replace(Target("events", "s", DAY, 7), feed([batch]))
        await sink.replace(Target("metrics", "s", DAY, 7), feed([metric]))
    finally:
        await sink.close()
    with duckdb.connect(str(path), read_only=True) as con:
        for view, sent in (("events", batch), ("metrics", metric)):
            got = con.sql(f"SELECT * FROM {view} ORDER BY unit_id").to_arrow_table()
            assert got.schema.names == sent.schema.names
            assert got.to_pylist() == sent.sort_by("unit_id").to_pylist()


async def test_duckdb_refuses_to_rewrite_the_visible_generation(tmp_path):
    sink = await opened(duck(tmp_path / "a.duckdb"))
    try:
        await sink.replace(Target("events", "s", DAY, 1), feed(events("s", 1, 300)))
        with pytest.raises(SinkError, match="already visible"):
            await sink.replace(Target("events", "s", DAY, 1), feed(events("s", 1, 100)))
        assert await sink.read_generation("events", "s", DAY) == PartitionInfo(1, 300)
    finally:
        await sink.close()


async def test_duckdb_creates_parent_folders(tmp_path):
    sink = await opened(duck(tmp_path / "x" / "y" / "a.duckdb"))
    await sink.close()
    assert (tmp_path / "x" / "y" / "a.duckdb").exists()


def test_duckdb_config_is_checked():
    assert build_model(DuckDBSinkConfig, {"path": "a.duckdb"}, "sinks.main").chunk_rows == 200_000
    with pytest.raises(ConfigErrors, match="sinks.main.chunk_rows"):
        build_model(DuckDBSinkConfig, {"path": "a.duckdb", "chunk_rows": 0}, "sinks.main")


def test_both_modules_register_their_sink():
    registry = Registry()
    duckdb_sink.ingestd_register(registry=registry)
    sqlite_sink.ingestd_register(registry=registry)
    assert registry.sinks == {"duckdb": DuckDBSink, "sqlite": SQLiteSink}
    assert duckdb_sink.INGESTD_API == sqlite_sink.INGESTD_API == (2, 2)


# -- SQLite ------------------------------------------------------------------------------------

async def test_sqlite_stores_iso_text_and_json(tmp_path):
    path = tmp_path / "a.sqlite"
    sink = await opened(SQLiteSink(SQLiteSinkConfig(path=str(path)), name="test"))
    batch = kit_batch("events", "s", DAY, 3, 20)
    try:
        assert await sink.replace(Target("events", "s", DAY, 3), feed([batch])) == 20
        with sqlite3.connect(path) as con:
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            rows = con.execute('SELECT day, "timestamp", ids, metadata, generation, ingested_at FROM events '
                               "ORDER BY unit_id").fetchall()
        first = batch.to_pylist()[0]
        day, ts, ids, meta, gen, ingested = rows[0]
        assert day == "2026-11-20" and gen == 3
        assert ts == first["timestamp"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert dt.datetime.fromisoformat(ingested).tzinfo == dt.UTC
        assert json.loads(ids) == {"user_id": "u0"} and json.loads(meta)["kit"] is True
    finally:
        await sink.close()


async def test_sqlite_readers_of_the_file_see_the_previous_generation_during_a_replace(tmp_path):
    path = tmp_path / "a.sqlite"
    sink = await opened(SQLiteSink(SQLiteSinkConfig(path=str(path)), name="test"))
    try:
        await sink.replace(Target("events", "s", DAY, 1), feed(events("s", 1, 500)))
        gate = Gate(at=3)
        task = asyncio.create_task(sink.replace(Target("events", "s", DAY, 2), feed(events("s", 2, 400), gate=gate)))
        await asyncio.wait_for(gate.reached.wait(), 30)
        with sqlite3.connect(path) as con:
            assert con.execute("SELECT count(*), max(generation) FROM events").fetchone() == (500, 1)
        gate.go.set()
        assert await task == 400
        with sqlite3.connect(path) as con:
            assert con.execute("SELECT count(*), max(generation) FROM events").fetchone() == (400, 2)
            assert con.execute("SELECT generation, rows FROM partitions").fetchall() == [(2, 400)]
    finally:
        await sink.close()
