"""A day fetched as K slices in K worker processes (kernel/slices.py), on real DuckDB files:
the same rows as an unsliced load, boundaries included; slicing by a column; errors of a worker
coming back as the kernel's error classes; workers stopped when the stream is abandoned; and
the config checks of `slices` and `slice_column`."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from ingestd import Capabilities, Connector, PermanentError, ProbeResult, SourceInfo, TransientError
from ingestd.core.config import load_config
from ingestd.core.errors import ConfigErrors
from ingestd.core.query import DayWindow, day_queries, render, sub_windows
from ingestd.engine.slices import SliceTask, stream_slices
from ingestd.plugin.manager import load_plugins
from tests.support import cli_env, ingestd, plugin_dist, state_query, write_config

D = dt.date(2026, 11, 20)


def with_source_keys(cfg: Path, **keys) -> Path:
    """Add keys to [sources.orders] of a config made by write_config."""
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    text = cfg.read_text()
    assert "lag_days = 1\n" in text
    cfg.write_text(text.replace("lag_days = 1\n", "lag_days = 1\n" + lines, 1))
    return cfg


def sink_content(path: Path, day: dt.date = D) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT timestamp, event_name, event_value, unit_id, id_type, ids, metadata FROM events "
                           "WHERE source = 'orders' AND day = ? ORDER BY ALL", [day]).fetchall()


def fill(warehouse) -> None:
    """1,000 spread rows, plus rows exactly on the sub-range bounds of K = 2, 3, 4 and on the
    day's own bounds (the next day's midnight is not in the day)."""
    warehouse.add_events(D, 1000)
    base = dt.datetime(D.year, D.month, D.day)
    bounds = {base + (dt.timedelta(days=1) * i) // k for k in (2, 3, 4) for i in range(k + 1)}
    for n, t in enumerate(sorted(bounds)):
        warehouse.execute("INSERT INTO events_raw VALUES (?, ?, 'edge', ?, NULL)", [t, f"b{n}", str(n)])
        warehouse.execute("INSERT INTO events_raw VALUES (?, ?, 'edge', ?, NULL)",
                          [t - dt.timedelta(microseconds=1), f"m{n}", str(n)])
    warehouse.add_events(D - dt.timedelta(days=1), 7, start_id=90_000)


# -- cutting a day ------------------------------------------------------------------------------------

@pytest.mark.parametrize("timezone, day", [("UTC", D), ("America/Los_Angeles", dt.date(2026, 11, 1))])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_sub_windows_cover_the_day_exactly_without_overlap(timezone, day, k):
    window = DayWindow.of(day, timezone)  # 2026-11-01 in Los Angeles has 25 hours
    parts = sub_windows(window, k)
    assert len(parts) == k and parts[0].start == window.start and parts[-1].end == window.end
    assert all(a.end == b.start for a, b in zip(parts, parts[1:], strict=False))
    assert all(p.day == day and p.timezone == timezone and p.start < p.end for p in parts)
    lengths = [p.end - p.start for p in parts]
    assert max(lengths) - min(lengths) <= dt.timedelta(microseconds=1)


def test_slice_queries_by_time_bind_sub_ranges_and_by_column_wrap_the_day_query():
    sql = "SELECT * FROM t WHERE ts >= {start} AND ts < {end} AND d = {day}"
    window = DayWindow.of(D)
    by_time = day_queries(sql, window, Capabilities(paramstyle="qmark"), slices=2)
    assert [q.sql for q in by_time] == [render(sql, window, "qmark").sql] * 2
    assert [q.params for q in by_time] == [
        [dt.datetime(2026, 11, 20), dt.datetime(2026, 11, 20, 12), D],
        [dt.datetime(2026, 11, 20, 12), dt.datetime(2026, 11, 21), D]]
    by_col = day_queries(sql, window, Capabilities(paramstyle="pyformat"), slices=3, slice_column="user id")
    assert [q.params for q in by_col] == [render(sql, window, "pyformat").params] * 3
    assert by_col[2].sql.startswith("SELECT * FROM (\nSELECT * FROM t WHERE ts >= %(start)s")
    assert by_col[2].sql.endswith('\n) ingestd_s WHERE COALESCE(ABS(MOD(ingestd_s."user id", 3)), 0) = 2')
    # a query without placeholders is filtered on the mapped timestamp, per sub-range
    wrapped = day_queries("SELECT * FROM t", window, Capabilities(paramstyle="qmark"), slices=2, filter_column="ts")
    # the connection's own quote: none where the warehouse folds bare names (Snowflake)
    bare = day_queries(sql, window, Capabilities(paramstyle="qmark", quote=""), slices=2, slice_column="user_id")
    assert bare[1].sql.endswith("\n) ingestd_s WHERE COALESCE(ABS(MOD(ingestd_s.user_id, 2)), 0) = 1")
    assert '"ts" >= ? AND' in wrapped[1].sql and wrapped[1].params == [dt.datetime(2026, 11, 20, 12),
                                                                          dt.datetime(2026, 11, 21)]


# -- whole loads through the CLI --------------------------------------------------------------------------

def test_k_slices_load_exactly_the_rows_of_an_unsliced_load(tmp_path, warehouse):
    fill(warehouse)
    expected = None
    for k in (1, 2, 3, 4):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        cfg = with_source_keys(write_config(folder, warehouse=str(warehouse.path)), slices=k)
        out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg)
        assert out.returncode == 0, out.stdout + out.stderr
        rows = sink_content(folder / "analytics.duckdb")
        runs = state_query(folder / "state.db", "SELECT status, rows_fetched, rows_written, rows_rejected FROM runs")
        if expected is None:
            expected = rows
            assert len(rows) == warehouse.count(D) == 1012
            edges = {r[3] for r in rows if r[1] == "edge"}  # bounds 0h 6h 8h 12h 16h 18h 24h
            assert edges == {"b0", "b1", "b2", "b3", "b4", "b5", "m1", "m2", "m3", "m4", "m5", "m6"}
        assert runs == [("succeeded", len(expected), len(expected), 0)], (k, runs)
        assert rows == expected, f"slices = {k} loaded other rows than slices = 1"


def test_slicing_by_an_integer_column_keeps_negative_and_null_values(tmp_path, warehouse):
    fill(warehouse)
    query = ("SELECT ts, user_id, event, value, props, CASE WHEN user_id LIKE 'u%' "
             "THEN CAST(substr(user_id, 2) AS BIGINT) - 500 END AS n FROM events_raw "
             "WHERE ts >= {start} AND ts < {end}")
    results = []
    for k, column in ((1, None), (3, "n")):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        cfg = write_config(folder, warehouse=str(warehouse.path))
        cfg.write_text(cfg.read_text().replace(
            'query = "SELECT ts, user_id, event, value, props FROM events_raw WHERE ts >= {start} AND ts < {end}"',
            f"query = {json.dumps(query)}"))
        if column:
            with_source_keys(cfg, slices=k, slice_column=column)
        out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg)
        assert out.returncode == 0, out.stdout + out.stderr
        results.append(sink_content(folder / "analytics.duckdb"))
    assert len(results[0]) == warehouse.count(D) and results[1] == results[0]


def test_a_sliced_load_retries_a_transient_worker_error_and_fails_on_a_permanent_one(tmp_path, warehouse):
    fill(warehouse)
    plugin = plugin_dist(tmp_path / "extra", "slicefaults", FAULTY_PLUGIN)
    marker = tmp_path / "drops"
    marker.write_text("1")
    cfg = with_source_keys(write_config(tmp_path, connection_type="faultyduck", warehouse=str(warehouse.path)),
                           slices=2)
    env = cli_env([plugin], INGESTD_TEST_DROPS=str(marker), INGESTD_TEST_FAIL="")
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert marker.read_text() == "0", "the second slice dropped its connection once"
    assert "load.retry" in out.stderr and "connection dropped in slice 2 (simulated)" in out.stderr
    assert "[08006]" in out.stderr
    assert state_query(tmp_path / "state.db", "SELECT status, rows_written FROM runs") == [
        ("succeeded", warehouse.count(D))]

    env = cli_env([plugin], INGESTD_TEST_DROPS=str(marker), INGESTD_TEST_FAIL="1")
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env)
    assert out.returncode == 1
    reason = "[42P01] table gone in slice 2 (simulated)"
    assert f"orders {D}: failed: {reason}" in out.stdout, out.stdout + out.stderr
    assert "load.retry" not in out.stderr
    runs = state_query(tmp_path / "state.db", "SELECT status, reason FROM runs ORDER BY started_at")
    assert runs[-1] == ("failed", reason)


FAULTY_PLUGIN = '''
"""Test plugin: the DuckDB connector whose second slice (the day's second half) fails after
its first batch: transiently while the file INGESTD_TEST_DROPS holds a number > 0, permanently
when INGESTD_TEST_FAIL is set."""
import datetime as dt, os
from pathlib import Path
from ingestd import PermanentError, TransientError, hookimpl
from ingestd.plugins.duckdb.connector import DuckDBConnector

INGESTD_API = (2, 2)


class FaultyDuck(DuckDBConnector):
    type_name = "faultyduck"

    async def fetch(self, query, batch_rows, source=None):
        second = query.window.start.hour >= 12
        async for batch in super().fetch(query, batch_rows, source):
            yield batch
            if second and os.environ.get("INGESTD_TEST_FAIL"):
                raise PermanentError("table gone in slice 2 (simulated)", code="42P01")
            marker = Path(os.environ["INGESTD_TEST_DROPS"])
            if second and int(marker.read_text() or 0) > 0:
                marker.write_text(str(int(marker.read_text()) - 1))
                raise TransientError("connection dropped in slice 2 (simulated)", code="08006")


@hookimpl
def ingestd_register(registry):
    registry.add_connector(FaultyDuck)
'''


# -- the worker machinery on its own ---------------------------------------------------------------------

@dataclass
class PidConfig:
    rows: int = 3
    batches: int = 2
    fail: str = ""  # "transient" | "permanent" | "value" | "exit" | "hang": what slice 2 does after one batch
    delay: float = 0.0
    progress: str = ""  # a file prefix: each slice writes how many batches it has yielded


class PidConnector(Connector):
    """Yields `batches` batches of `rows` rows naming the process and the query's sub-range."""

    type_name = "pidtest"
    config_model = PidConfig
    capabilities = Capabilities(paramstyle="qmark")

    async def check(self, query=None):
        pass

    async def probe(self, query, source=None):
        return ProbeResult(0)

    async def fetch(self, query, batch_rows, source=None):
        for i in range(self.config.batches):
            if i and query.window.start.hour >= 12 and self.config.fail:
                fail = self.config.fail
                if fail == "transient":
                    raise TransientError("reset by peer", code="08006")
                if fail == "permanent":
                    raise PermanentError("no such table", code="42P01")
                if fail == "value":
                    raise ValueError("a bug in the connector")
                if fail == "exit":
                    os._exit(9)
                if fail == "hang":
                    await asyncio.sleep(3600)
            await asyncio.sleep(self.config.delay)
            if self.config.progress:
                Path(f"{self.config.progress}.{query.window.start.hour}").write_text(str(i + 1))
            yield pa.record_batch({"pid": [os.getpid()] * self.config.rows,
                                   "start": [query.window.start] * self.config.rows,
                                   "batch": [i] * self.config.rows})


def pid_tasks(k: int, **config) -> list[SliceTask]:
    queries = day_queries("SELECT {start}, {end}", DayWindow.of(D), Capabilities(paramstyle="qmark"), slices=k)
    return [SliceTask(i, k, "pidtest", (__name__, "PidConnector"), "pid", PidConfig(**config), q, 100,
                      SourceInfo("orders")) for i, q in enumerate(queries)]


async def collect(tasks, **kw) -> pa.Table:
    return pa.Table.from_batches([b async for b in stream_slices(tasks, **kw)])


async def test_each_slice_runs_in_a_process_of_its_own_and_all_batches_arrive():
    table = await collect(pid_tasks(4, rows=5, batches=3))
    assert table.num_rows == 4 * 5 * 3
    pids = set(table.column("pid").to_pylist())
    assert len(pids) == 4 and os.getpid() not in pids
    starts = sorted(set(table.column("start").to_pylist()))
    assert starts == [dt.datetime(2026, 11, 20, h) for h in (0, 6, 12, 18)]


@pytest.mark.parametrize("fail, cls, text, code", [
    ("transient", TransientError, "[08006] reset by peer", "08006"),
    ("permanent", PermanentError, "[42P01] no such table", "42P01"),
    ("value", ValueError, "a bug in the connector", None),
    ("exit", TransientError, "slice 2 of 2: its worker process ended (exit code 9) before sending all its rows", None),
])
async def test_a_worker_error_comes_back_as_its_class_with_message_and_code(fail, cls, text, code):
    with pytest.raises(cls) as err:
        await collect(pid_tasks(2, fail=fail))
    assert type(err.value) is cls and str(err.value) == text
    if code:
        assert err.value.code == code


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


async def test_an_abandoned_or_failed_stream_stops_its_workers():
    stream = stream_slices(pid_tasks(2, fail="hang", batches=2), grace=5)
    pids: dict[int, int] = {}  # slice start hour -> worker pid
    while 12 not in pids:
        batch = await anext(stream)
        pids[batch.column("start")[0].as_py().hour] = batch.column("pid")[0].as_py()
    assert alive(pids[12]), "the second slice hangs after its first batch"
    await stream.aclose()
    assert not any(alive(p) for p in pids.values())

    # cancelled while waiting for rows
    seen: list[int] = []

    async def consume():
        async for batch in stream_slices(pid_tasks(2, fail="hang", batches=2), grace=5):
            seen.append(batch.column("pid")[0].as_py())

    task = asyncio.create_task(consume())
    while len(set(seen)) < 2:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen and not any(alive(p) for p in set(seen))


async def test_workers_wait_for_a_slow_reader_so_memory_stays_bounded(tmp_path):
    """Nobody reads for a while: the workers are held back by the pipe (backpressure), instead
    of running ahead and piling the day up in memory."""
    progress = tmp_path / "progress"
    stream = stream_slices(pid_tasks(2, rows=20_000, batches=200, progress=str(progress)), depth=1)
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            await asyncio.sleep(1.5)
            break
    produced = sum(int(p.read_text()) for p in tmp_path.glob("progress.*"))
    await stream.aclose()
    # each worker: one batch in the pipe, one being sent, SEND_AHEAD queued, one being made;
    # the parent: `depth` merged, one per reader
    assert produced <= got + 2 * 4 + 1 + 2, produced


# -- configuration ----------------------------------------------------------------------------------------

def config_errors(tmp_path, **keys) -> str:
    cfg = write_config(tmp_path)
    query = keys.pop("query", None)
    if query is not None:
        cfg.write_text(cfg.read_text().replace(
            'query = "SELECT ts, user_id, event, value, props FROM events_raw WHERE ts >= {start} AND ts < {end}"',
            f"query = {json.dumps(query)}"))
    with_source_keys(cfg, **keys)
    plugins = load_plugins()
    try:
        config = load_config(cfg, plugins.registry)
    except ConfigErrors as exc:
        return str(exc)
    assert config.sources["orders"].slices == keys.get("slices", 1)
    return ""


def test_config_checks_slices_and_slice_column(tmp_path):
    name = str(tmp_path / "daemon.toml")
    assert config_errors(tmp_path, slices=0) == f"{name}: sources.orders.slices: must be at least 1"
    assert "sources.orders.slices: must be at most 64" in config_errors(tmp_path, slices=65)
    day_only = "SELECT ts, user_id, event, value, props FROM events_raw WHERE CAST(ts AS DATE) = {day}"
    assert config_errors(tmp_path, slices=2, query=day_only) == (
        f"{name}: sources.orders.slices: with slices > 1 the query must bound the day with both {{start}} and "
        "{end} (each slice gets a sub-range of them), or set slice_column to an integer column to slice by "
        "MOD(column, slices)")
    assert config_errors(tmp_path, slices=2, query=day_only, slice_column="n") == ""
    assert config_errors(tmp_path, slices=3) == ""
    assert config_errors(tmp_path, slices=4, query="SELECT ts, user_id, event, value, props FROM events_raw") == ""
    assert "sources.orders.slice_column: must not be empty" in config_errors(tmp_path, slices=2, slice_column=" ")
    assert "sources.orders.slices: expected an integer, got '2'" in config_errors(tmp_path, slices="2")


def test_the_configuration_table_of_the_readme_names_the_new_keys():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `[sources.NAME]` |"))
    assert "`slices`" in row and "`slice_column`" in row
