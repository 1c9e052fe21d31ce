"""Shared test helpers: config files, a small DuckDB warehouse, CLI subprocesses, plugin
distributions made on the fly (found through entry points exactly like installed ones)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parent.parent


class Warehouse:
    """A DuckDB file with `events_raw(ts, user_id, event, value)` and
    `metrics_daily(ds, user_id, metric, value, num, den)` that tests fill day by day."""

    def __init__(self, path: Path):
        self.path = path
        with duckdb.connect(str(path)) as con:
            con.execute("CREATE TABLE IF NOT EXISTS events_raw (ts TIMESTAMP, user_id VARCHAR, event VARCHAR,"
                        " value VARCHAR, props VARCHAR)")
            con.execute("CREATE TABLE IF NOT EXISTS metrics_daily (ds DATE, user_id VARCHAR, metric VARCHAR,"
                        " value DOUBLE, num DOUBLE, den DOUBLE)")

    def add_events(self, day: dt.date, n: int, *, event: str = "click", start_id: int = 0,
                   hour_offset: int = 0) -> None:
        base = dt.datetime(day.year, day.month, day.day)
        with duckdb.connect(str(self.path)) as con:
            con.execute(
                "INSERT INTO events_raw SELECT ?::TIMESTAMP + to_microseconds((i * 86399000000 // ?)::BIGINT)"
                " + to_hours(?), 'u' || (i + ?), ?, CAST(i AS VARCHAR), '{\"k\": 1}' FROM range(?) t(i)",
                [base, max(n, 1), hour_offset, start_id, event, n])

    def execute(self, sql: str, params=None):
        with duckdb.connect(str(self.path)) as con:
            return con.execute(sql, params or []).fetchall()

    def count(self, day: dt.date) -> int:
        return self.execute("SELECT count(*) FROM events_raw WHERE ts >= ? AND ts < ?",
                            [day, day + dt.timedelta(days=1)])[0][0]


def write_config(folder: Path, *, schedule: str = '["0 6 * * *"]', recheck: str = '["0 18 * * *"]',
                 threshold: float = 1.0, detect: str = "count", lookback: int = 3, timezone: str = "UTC",
                 extra_daemon: str = "", extra: str = "", connection_type: str = "duckdb",
                 warehouse: str = "warehouse.duckdb", sink: str = 'type = "duckdb"\npath = "analytics.duckdb"',
                 max_reject_pct: float = 1.0, bus: str = "enabled = false") -> Path:
    text = f"""
[daemon]
state_path = "state.db"
batch_rows = 1000
retry_attempts = 3
retry_base_seconds = 0.05
retry_max_seconds = 0.2
{extra_daemon}

[bus]
{bus}

[sinks.main]
{sink}

[connections.wh]
type = "{connection_type}"
path = "{warehouse}"

[sources.orders]
connection = "wh"
kind = "events"
query = "SELECT ts, user_id, event, value, props FROM events_raw WHERE ts >= {{start}} AND ts < {{end}}"
schedule = {schedule}
timezone = "{timezone}"
lag_days = 1
max_reject_pct = {max_reject_pct}

[sources.orders.recheck]
schedule = {recheck}
lookback_days = {lookback}
threshold_pct = {threshold}
detect = "{detect}"

[sources.orders.mapping]
timestamp = "ts"
event_name = "event"
event_value = "value"
ids = {{ user_id = "user_id" }}
metadata_json = "props"
{extra}
"""
    path = folder / "daemon.toml"
    path.write_text(textwrap.dedent(text))
    return path


def cli_env(extra_path: list[Path] | None = None, **env: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("INGESTD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    paths = [str(p) for p in (extra_path or [])] + [str(ROOT)]
    out["PYTHONPATH"] = os.pathsep.join(paths + ([out["PYTHONPATH"]] if out.get("PYTHONPATH") else []))
    out.update(env)
    return out


def ingestd(*args: str, config: Path | None = None, env: dict | None = None, timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ingestd"] + (["-c", str(config)] if config else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or cli_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ingestd {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def spawn_ingestd(*args: str, config: Path, env: dict | None = None, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ingestd", "-c", str(config), *args]
    return subprocess.Popen(cmd, env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def plugin_dist(folder: Path, name: str, module_source: str, *, entry_name: str | None = None,
                version: str = "0.1.0") -> Path:
    """Lay out an importable module plus a `.dist-info` declaring it under the `ingestd`
    entry-point group; put the returned folder on PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(module_source))
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[ingestd]\n{entry_name or name} = {name}\n")
    return folder


def sink_rows(path: Path, source: str, day: dt.date, table: str = "events") -> int:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(f"SELECT count(*) FROM {table} WHERE source = ? AND day = ?", [source, day]).fetchone()[0]


SLOW_PLUGIN = '''
"""Test plugin: the DuckDB connector, slowed down per batch (INGESTD_TEST_SLOW_S seconds),
so a test can kill or disturb a load while it is running. With INGESTD_TEST_PROBE_MARK set,
each probe first writes that file, then waits INGESTD_TEST_PROBE_S seconds."""
import asyncio, os
from pathlib import Path
from ingestd import hookimpl
from ingestd.plugins.duckdb.connector import DuckDBConnector

INGESTD_API = (2, 2)


class SlowDuck(DuckDBConnector):
    type_name = "slowduck"

    async def probe(self, query, source=None):
        if os.environ.get("INGESTD_TEST_PROBE_MARK"):
            Path(os.environ["INGESTD_TEST_PROBE_MARK"]).write_text(query.window.day.isoformat())
            await asyncio.sleep(float(os.environ.get("INGESTD_TEST_PROBE_S", "0")))
        return await super().probe(query, source)

    async def fetch(self, query, batch_rows, source=None):
        delay = float(os.environ.get("INGESTD_TEST_SLOW_S", "0.2"))
        async for batch in super().fetch(query, batch_rows, source):
            await asyncio.sleep(delay)
            yield batch


@hookimpl
def ingestd_register(registry):
    registry.add_connector(SlowDuck)
'''


def slow_plugin(folder: Path) -> Path:
    return plugin_dist(folder / "plugins-extra", "slowduck_plugin", SLOW_PLUGIN)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def state_query(state_db: Path, sql: str, params=()):
    import sqlite3
    if not state_db.exists():
        return []
    con = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


FAULT_PLUGIN = '''
"""Test doubles for faults that a local DuckDB cannot produce on demand:
- connector `flakyduck`: the DuckDB connector whose fetch drops "the connection" after the
  first batch while the file INGESTD_TEST_DROPS holds a number > 0 (decremented per drop);
- sink `fullduck`: the DuckDB sink whose write runs out of space after two batches while the
  file INGESTD_TEST_DISK_FULL exists."""
import errno, os
from pathlib import Path
from ingestd import TransientError, hookimpl
from ingestd.plugins.duckdb.connector import DuckDBConnector
from ingestd.plugins.duckdb_sink.sink import DuckDBSink

INGESTD_API = (2, 2)


def _take_drop():
    marker = Path(os.environ["INGESTD_TEST_DROPS"])
    left = int(marker.read_text() or 0) if marker.exists() else 0
    if left > 0:
        marker.write_text(str(left - 1))
        return True
    return False


class FlakyDuck(DuckDBConnector):
    type_name = "flakyduck"

    async def fetch(self, query, batch_rows, source=None):
        first = True
        async for batch in super().fetch(query, batch_rows, source):
            yield batch
            if first and _take_drop():
                raise TransientError("connection reset by peer (simulated drop)")
            first = False


class FullDuck(DuckDBSink):
    type_name = "fullduck"

    async def replace(self, target, batches):
        async def limited():
            n = 0
            async for b in batches:
                n += 1
                if n > 2 and Path(os.environ["INGESTD_TEST_DISK_FULL"]).exists():
                    raise OSError(errno.ENOSPC, "No space left on device (simulated)")
                yield b
        return await super().replace(target, limited())


@hookimpl
def ingestd_register(registry):
    registry.add_connector(FlakyDuck)
    registry.add_sink(FullDuck)
'''


def fault_plugin(folder: Path) -> Path:
    return plugin_dist(folder / "plugins-faults", "faults_plugin", FAULT_PLUGIN)
