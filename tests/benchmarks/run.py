"""ingestd's benchmarks: one command that sets up what it needs and prints one JSON object.

    .venv/bin/python tests/benchmarks/run.py                 # N = 2,000,000 rows (a few minutes)
    .venv/bin/python tests/benchmarks/run.py --rows 200000   # a quick run

It starts its own PostgreSQL (tests/postgres.py) and the Redshift test proxy
(tests/pg_proxy.py, in a process of its own: tests/benchmarks/proxy_server.py), generates one
day of N Statsig-like events server-side with generate_series (and a day of N/10), copies the
day into a DuckDB file (the embedded warehouse), and measures in the same run:

- ceilings: wire (psycopg binary COPY), driver (redshift-connector server-side cursor),
  connectorx (arrow_stream through the proxy, discarded), sink (the DuckDB sink's replace of the
  mapped day held in memory), and the map stage on its own;
- the peer: dlt's `sql_table(backend="pyarrow")` -> DuckDB, the same day through the proxy;
- end to end: `ingestd load` of the day through the Redshift connector into the DuckDB sink,
  with each fetch engine (connectorx, opt-in; the driver, the default), against dlt and against
  min(wire, sink);
- memory: peak RSS of the connectorx engine's load at N and N/10, summed over the process tree
  (the connectorx engine reads in a child process), sampled every 0.1 s;
- embedded path: `ingestd load` of the day from the DuckDB connector, against the sink ceiling;
- slices: `ingestd load` with slices = 1, 2 on the connectorx engine (connectorx's own partitioned
  read) and slices = 2 on the driver engine (worker processes), and the core count;
- re-check cost: 50 sources x 30 loaded days unchanged (on the DuckDB connector, to keep the
  run short): one re-check window's wall time, against the first load of the same partitions,
  and the rows it fetched;
- schedule scale: an idle `ingestd run` daemon with 1,000 sources whose windows are years away:
  CPU seconds and RSS over 60 s, from /proc.

Rates are rows per second of the load itself (`duration_ms` of its run: probe, fetch, map,
write, state), and ratios are taken between figures of this run only, so they hold on a busy
machine where the absolute figures do not. Progress goes to stderr; the JSON to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.postgres import start_postgres  # noqa: E402

PY = sys.executable
DAY = dt.date(2026, 3, 10)
SMALL_DAY = DAY - dt.timedelta(days=1)
DB, USER, PASSWORD = "bench", "bench", "bench-password"
COLUMNS = "ts, unit_id, event_name, value, metadata"
PG_SQL = f"SELECT {COLUMNS} FROM events WHERE ts >= {{start}} AND ts < {{end}}"
MAPPING = {"timestamp": "ts", "event_name": "event_name", "event_value": "value", "ids": {"user_id": "unit_id"},
           "metadata_json": "metadata"}
MAPPING_TOML = ('timestamp = "ts"\nevent_name = "event_name"\nevent_value = "value"\n'
                'ids = { user_id = "unit_id" }\nmetadata_json = "metadata"\n')
RECHECK_SOURCES, RECHECK_DAYS, RECHECK_ROWS_PER_DAY = 50, 30, 100
SCHEDULE_SOURCES = 1000
CHUNKS = 8
"""fetch_chunks of the connectorx engine's bounded-memory load (an opt-in)."""


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("INGESTD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([out["PYTHONPATH"]] if out.get("PYTHONPATH") else []))
    out["INGESTD_BENCH_PASSWORD"] = PASSWORD
    return out


# -- the data ---------------------------------------------------------------------------------------

GENERATE = """
INSERT INTO events
SELECT %(day)s::timestamp + (i * (86400.0 / %(n)s)) * interval '1 second',
       'user_' || ((i::bigint * 7919) %% 250000),
       (ARRAY['page_view', 'click', 'purchase', 'signup', 'add_to_cart', 'search', 'share', 'logout'])[1 + i %% 8],
       CASE WHEN i %% 5 = 0 THEN NULL ELSE ((i * 31) %% 1000)::text END,
       '{"platform": "' || (ARRAY['ios', 'android', 'web'])[1 + i %% 3] || '", "app_version": "1.'
         || (i %% 20) || '", "country": "' || (ARRAY['US', 'DE', 'BR', 'IN', 'JP'])[1 + i %% 5] || '"}'
FROM generate_series(0, %(n)s - 1) AS i
"""


def make_data(pg, rows: int) -> None:
    pg.create_user(USER, PASSWORD)
    pg.create_database(DB, owner=USER)
    with pg.connect(user=USER, password=PASSWORD, dbname=DB) as con:
        con.execute("CREATE TABLE events (ts timestamp NOT NULL, unit_id varchar(64), event_name varchar(128), "
                    "value varchar(128), metadata varchar(1024))")
        t = time.monotonic()
        con.execute(GENERATE, {"day": DAY, "n": rows})
        con.execute(GENERATE, {"day": SMALL_DAY, "n": max(1, rows // 10)})
        con.execute("CREATE INDEX events_ts ON events (ts)")  # what a Redshift sort key gives a range
        con.execute("VACUUM ANALYZE events")
        say(f"generated {rows} + {rows // 10} rows in PostgreSQL in {time.monotonic() - t:.1f}s")


def copy_to_duckdb(pg, path: Path, folder: Path) -> int:
    """The same day in a DuckDB file (the embedded path's warehouse and the sink ceiling's input)."""
    import duckdb
    csv = folder / "day.csv"
    with pg.connect(user=USER, password=PASSWORD, dbname=DB) as con, open(csv, "wb") as f:
        w = DayBounds(DAY)
        with con.cursor().copy(f"COPY ({PG_SQL.format(start='%s', end='%s')}) TO STDOUT (FORMAT CSV)",
                               (w.start, w.end)) as copy:
            for chunk in copy:
                f.write(chunk)
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE events AS SELECT * FROM read_csv(?, header = false, columns = {'ts': 'TIMESTAMP', "
                    "'unit_id': 'VARCHAR', 'event_name': 'VARCHAR', 'value': 'VARCHAR', 'metadata': 'VARCHAR'})",
                    [str(csv)])
        n = con.execute("SELECT count(*) FROM events").fetchone()[0]
    csv.unlink()
    return n


class DayBounds:
    def __init__(self, day: dt.date):
        self.start = dt.datetime(day.year, day.month, day.day)
        self.end = self.start + dt.timedelta(days=1)


# -- running things ----------------------------------------------------------------------------------

def measure(part: str, **args) -> dict:
    out = subprocess.run([PY, "-m", "tests.benchmarks.measure", part, json.dumps(args, default=str)],
                         capture_output=True, text=True, env=env(), cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"measure {part} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class TreeRSS(threading.Thread):
    """Samples the summed RSS of a process and its descendants (slice workers, the forkserver)."""

    def __init__(self, pid: int, interval: float = 0.1, skip_root: bool = False):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self.skip_root = pid, interval, 0, skip_root
        self.done = threading.Event()

    def run(self) -> None:
        import psutil
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.done.is_set():
            total = 0
            try:
                for p in ([] if self.skip_root else [root]) + root.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            except psutil.Error:
                break
            self.peak = max(self.peak, total)
            self.done.wait(self.interval)


def ingestd(folder: Path, *args: str, tree: bool = False, check: bool = True) -> dict:
    """Run `ingestd -c folder/daemon.toml ARGS` to its end: wall time, own peak RSS (ru_maxrss,
    from wait4), and with `tree` the sampled peak RSS of its process tree."""
    log = open(folder / "ingestd.log", "ab")
    usage = folder / "usage.json"
    t0 = time.perf_counter()
    proc = subprocess.Popen([PY, "-m", "tests.benchmarks.peak", str(usage),
                             PY, "-m", "ingestd.cli.main", "-c", str(folder / "daemon.toml"), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=folder)
    sampler = TreeRSS(proc.pid, skip_root=True) if tree else None
    if sampler:
        sampler.start()
    proc.wait()
    wall = time.perf_counter() - t0
    log.close()
    if sampler:
        sampler.done.set()
        sampler.join()
    if check and proc.returncode != 0:
        raise RuntimeError(f"ingestd {' '.join(args)} exited {proc.returncode}:\n"
                           f"{(folder / 'ingestd.log').read_text()[-4000:]}")
    used = json.loads(usage.read_text())
    out = {"wall_s": wall, "maxrss_mb": used["maxrss_kb"] / 1024, "cpu_s": used["cpu_s"]}
    if sampler:
        out["tree_peak_rss_mb"] = sampler.peak / 2**20
    return out


def profile_load(folder: Path, day: dt.date) -> dict:
    """The end-to-end load again under py-spy (sampling every thread, and separately only the
    thread holding the GIL), summarised: each thread's share of the samples, and the functions
    where the samples fall."""
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    out: dict = {"tool": "py-spy record --threads --rate 50 (--gil: only the thread holding the GIL)"}
    for mode, extra in (("all_threads", []), ("gil", ["--gil"])):
        for f in ("state.db", "analytics.duckdb", "analytics.duckdb.wal"):
            (folder / f).unlink(missing_ok=True)
        raw = folder / f"profile-{mode}.txt"
        subprocess.run([spy, "record", "--threads", "--rate", "50", *extra, "--format", "raw", "-o", str(raw), "--",
                        PY, "-m", "ingestd.cli.main", "-c", str(folder / "daemon.toml"), "load", "bench", "--day",
                        day.isoformat()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=folder,
                       check=True)
        out[mode] = summarise_profile(raw)
    return out


PROFILE_PARTS = [  # (what, a string that puts a sample there when a frame of its stack contains it)
    ("Arrow conversion of the driver's rows (plugins/redshift/connector.py rows_to_batch)", "rows_to_batch"),
    ("driver: receiving and decoding rows (redshift_connector)", "redshift_connector/"),
    ("map stage (kernel/schema.py RowMapper, DuckDB)", "RowMapper.map"),
    ("sink (plugins/duckdb_sink/sink.py, DuckDB)", "duckdb_sink/"),
    ("slice streams (kernel/slices.py)", "slices.py"),
    ("state store (aiosqlite)", "aiosqlite"),
    ("start-up: imports", "_find_and_load"),
    ("event loop waiting (selectors)", "selectors.py"),
]


def summarise_profile(raw: Path, top: int = 10) -> dict:
    import collections
    import re
    threads: collections.Counter = collections.Counter()
    parts: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        name = re.sub(r"^thread \(\d+\):? ?", "", frames[0]).strip() or "main"
        threads[re.sub(r"_\d+$", "", name)] += n  # pool threads: asyncio_0, asyncio_1 -> asyncio
        parts[next((what for what, key in PROFILE_PARTS if key in stack), "other")] += n
        leaves[re.sub(r" \((?:.*/)?([^/:]+):\d+\)", r" (\1)", frames[-1])] += n
        total += n
    pct = lambda c: {k: round(100 * v / total, 1) for k, v in c.most_common(top)}  # noqa: E731
    return {"samples": total, "threads_pct": pct(threads), "parts_pct": pct(parts), "top_functions_pct": pct(leaves)}


def state(folder: Path, sql: str, params=()) -> list[tuple]:
    con = sqlite3.connect(f"file:{folder / 'state.db'}?mode=ro", uri=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def redshift_connection(proxy_port: int, fetch_size: int, engine: str = "connectorx", chunks: int = 1) -> str:
    return textwrap.dedent(f"""
        [connections.wh]
        type = "redshift"
        host = "127.0.0.1"
        port = {proxy_port}
        database = "{DB}"
        user = "{USER}"
        password_env = "INGESTD_BENCH_PASSWORD"
        ssl = false
        fetch_size = {fetch_size}
        fetch_engine = "{engine}"
        fetch_chunks = {chunks}
        application_name = "ingestd-bench"
        """)


def duckdb_connection(path: Path) -> str:
    return f'\n[connections.wh]\ntype = "duckdb"\npath = "{path}"\n'


def load_config(folder: Path, connection: str, *, slices: int = 1, batch_rows: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = textwrap.dedent(f"""
        [daemon]
        state_path = "state.db"
        batch_rows = {batch_rows}
        retry_attempts = 1
        log_level = "info"

        [sinks.main]
        type = "duckdb"
        path = "analytics.duckdb"
        """) + connection + textwrap.dedent(f"""
        [sources.bench]
        connection = "wh"
        kind = "events"
        query = "{PG_SQL}"
        schedule = ["0 6 * * *"]
        max_reject_pct = 0.0
        slices = {slices}

        [sources.bench.mapping]
        """) + MAPPING_TOML
    (folder / "daemon.toml").write_text(text)
    return folder


def write_sources_config(folder: Path, warehouse: Path, n: int, *, daemon: str, schedule: str, recheck: str) -> None:
    """daemon.toml with `n` identical event sources s0000… on the DuckDB warehouse file."""
    text = f'[daemon]\nstate_path = "state.db"\n{daemon}\n\n[sinks.main]\ntype = "duckdb"\npath = "analytics.duckdb"\n'
    text += duckdb_connection(warehouse)
    for i in range(n):
        text += (f'\n[sources.s{i:04d}]\nconnection = "wh"\nkind = "events"\nquery = "{PG_SQL}"\n'
                 f'schedule = {schedule}\n\n[sources.s{i:04d}.recheck]\n{recheck}\n\n'
                 f'[sources.s{i:04d}.mapping]\n') + MAPPING_TOML
    (folder / "daemon.toml").write_text(text)


def load_day(folder: Path, day: dt.date, expect: int, *, tree: bool = False) -> dict:
    res = ingestd(folder, "load", "bench", "--day", day.isoformat(), tree=tree)
    [(status, fetched, written, ms)] = state(folder, "SELECT status, rows_fetched, rows_written, duration_ms FROM runs "
                                                     "WHERE day = ? ORDER BY started_at DESC LIMIT 1",
                                             (day.isoformat(),))
    if (status, fetched, written) != ("succeeded", expect, expect):
        raise RuntimeError(f"load of {day} in {folder}: {status}, fetched {fetched}, written {written}, "
                           f"expected {expect}")
    res.update(rows=written, load_s=ms / 1000, rows_per_s=written / (ms / 1000))
    return res


# -- the parts -------------------------------------------------------------------------------------------

def recheck_cost(base: Path, batch_rows: int) -> dict:
    """50 sources x 30 loaded days on the DuckDB connector; then one re-check window with nothing
    changed. Its cost is the `run --once` that does it minus an identical `run --once` that has
    nothing due (process start, config, state, the load window's pass over loaded days)."""
    import duckdb
    folder = base / "recheck"
    folder.mkdir()
    wh = folder / "warehouse.duckdb"
    first = DAY - dt.timedelta(days=RECHECK_DAYS - 1)
    with duckdb.connect(str(wh)) as con:
        con.execute(f"CREATE TABLE events AS SELECT ?::TIMESTAMP + to_microseconds(i * (86400000000 // "
                    f"{RECHECK_ROWS_PER_DAY})) AS ts, 'user_' || (i % 1000) AS unit_id, 'click' AS event_name, "
                    f"CAST(i AS VARCHAR) AS value, '{{\"k\": 1}}' AS metadata "
                    f"FROM range({RECHECK_DAYS * RECHECK_ROWS_PER_DAY}) t(i)", [dt.datetime.combine(first, dt.time())])

    def config(recheck: str) -> None:
        write_sources_config(folder, wh, RECHECK_SOURCES, daemon=f"batch_rows = {batch_rows}\nmax_concurrent_loads = 4",
                             schedule='["0 6 * * *"]',
                             recheck=f"schedule = {recheck}\nlookback_days = {RECHECK_DAYS}")

    at = lambda hh, mm: f"{DAY + dt.timedelta(days=1)}T{hh:02d}:{mm:02d}:00+00:00"  # noqa: E731
    config("[]")
    say(f"re-check: loading {RECHECK_SOURCES} sources x {RECHECK_DAYS} days")
    # The first load of every partition, as a backfill (loads overlap, four at a time); then a
    # load window, which finds every day loaded, marks the windows seen and loads nothing.
    loaded = ingestd(folder, "backfill", "--all", "--from", first.isoformat(), "--to", DAY.isoformat())
    ingestd(folder, "run", "--once", "--now", at(6, 5))
    partitions = state(folder, "SELECT count(*), sum(rows) FROM partitions WHERE status = 'succeeded'")[0]
    assert partitions == (RECHECK_SOURCES * RECHECK_DAYS,
                          RECHECK_SOURCES * RECHECK_DAYS * RECHECK_ROWS_PER_DAY), partitions
    runs_before = state(folder, "SELECT count(*), coalesce(sum(rows_fetched), 0) FROM runs")[0]
    config('["0 18 * * *"]')
    say("re-check: one re-check window, nothing changed")
    checked = ingestd(folder, "run", "--once", "--now", at(18, 5))
    runs_after = state(folder, "SELECT count(*), coalesce(sum(rows_fetched), 0) FROM runs")[0]
    probed = state(folder, "SELECT count(*) FROM partitions WHERE checked_at >= ?",
                   ((dt.datetime.now(dt.UTC) - dt.timedelta(seconds=checked["wall_s"] + 1)).isoformat(),))[0][0]
    idle = ingestd(folder, "run", "--once", "--now", at(18, 10))  # the same command, nothing due
    window = max(0.0, checked["wall_s"] - idle["wall_s"])
    first_load = max(1e-9, loaded["wall_s"] - idle["wall_s"])
    return {
        "connector": "duckdb",
        "sources": RECHECK_SOURCES, "days": RECHECK_DAYS, "rows_per_day": RECHECK_ROWS_PER_DAY,
        "partitions_probed": probed,
        "window_s": round(window, 3),
        "per_partition_ms": round(window * 1000 / (RECHECK_SOURCES * RECHECK_DAYS), 2),
        "run_once_with_recheck_s": round(checked["wall_s"], 3),
        "run_once_nothing_due_s": round(idle["wall_s"], 3),
        "rows_fetched": runs_after[1] - runs_before[1],
        "runs_started": runs_after[0] - runs_before[0],
        "first_load_of_the_same_partitions_s": round(loaded["wall_s"], 3),
        "ratio_to_first_load": round(window / first_load, 4),
    }


def schedule_scale(base: Path, idle_seconds: float) -> dict:
    """An `ingestd run` daemon with 1,000 sources whose windows are years away (29 February),
    so that it only waits: CPU seconds and RSS over `idle_seconds`, from /proc."""
    import duckdb
    out = {"sources": SCHEDULE_SOURCES, "idle_s": idle_seconds}
    for n in (1, SCHEDULE_SOURCES):
        folder = base / f"idle{n}"
        folder.mkdir()
        wh = folder / "warehouse.duckdb"
        with duckdb.connect(str(wh)) as con:
            con.execute("CREATE TABLE events (ts TIMESTAMP, unit_id VARCHAR, event_name VARCHAR, value VARCHAR, "
                        "metadata VARCHAR)")
        write_sources_config(folder, wh, n, daemon='log_level = "info"', schedule='["0 0 29 2 *"]',
                             recheck='schedule = ["0 12 29 2 *"]')
        log = open(folder / "daemon.log", "wb")
        t0 = time.monotonic()
        proc = subprocess.Popen([PY, "-m", "ingestd.cli.main", "-c", str(folder / "daemon.toml"), "run"], stdout=log,
                                stderr=subprocess.STDOUT, env=env(), cwd=folder)
        try:
            while b"daemon.started" not in (folder / "daemon.log").read_bytes():
                if proc.poll() is not None or time.monotonic() - t0 > 300:
                    raise RuntimeError(f"the daemon did not start:\n{(folder / 'daemon.log').read_text()[-3000:]}")
                time.sleep(0.2)
            started = time.monotonic() - t0
            _settle(proc.pid)
            if n == 1:
                out["rss_mb_1_source"] = round(_status(proc.pid)["VmRSS"] / 1024, 1)
                continue
            cpu0, t1 = _cpu_s(proc.pid), time.monotonic()
            time.sleep(idle_seconds)
            cpu1, t2 = _cpu_s(proc.pid), time.monotonic()
            status = _status(proc.pid)
            out.update(startup_s=round(started, 2), cpu_s=round(cpu1 - cpu0, 3),
                       cpu_pct_of_one_core=round((cpu1 - cpu0) * 100 / (t2 - t1), 3),
                       rss_mb=round(status["VmRSS"] / 1024, 1), peak_rss_mb=round(status["VmHWM"] / 1024, 1),
                       threads=status["Threads"])
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    out["rss_mb_per_source"] = round((out["rss_mb"] - out["rss_mb_1_source"]) / (SCHEDULE_SOURCES - 1), 4)
    return out


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _status(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def _settle(pid: int, quiet_pct: float = 5.0, most: float = 120.0) -> None:
    """Wait until start-up work is over: a whole second with under quiet_pct % of a core."""
    deadline = time.monotonic() + most
    while time.monotonic() < deadline:
        c0 = _cpu_s(pid)
        time.sleep(1.0)
        if (_cpu_s(pid) - c0) * 100 < quiet_pct:
            return


def machine() -> dict:
    import duckdb
    import psycopg
    import pyarrow
    import redshift_connector
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    from importlib.metadata import version
    return {
        "cpu": model, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(mem / 2**20, 1), "os": platform.platform(), "python": platform.python_version(),
        "ingestd": version("ingestd"), "duckdb": duckdb.__version__, "pyarrow": pyarrow.__version__,
        "redshift_connector": redshift_connector.__version__, "psycopg": psycopg.__version__,
        "connectorx": version("connectorx"), "dlt": version("dlt"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- main ---------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="N, rows of the benchmark day (default 2,000,000)")
    ap.add_argument("--fetch-size", type=int, default=10_000,
                    help="rows per FETCH for the driver ceiling and the Redshift connection (default 10,000)")
    ap.add_argument("--batch-rows", type=int, default=50_000, help="[daemon] batch_rows (default 50,000)")
    ap.add_argument("--idle-seconds", type=float, default=60.0, help="schedule scale: idle time measured (default 60)")
    ap.add_argument("--skip", action="append", default=[], choices=["recheck", "schedule", "slices", "embedded"],
                    help="leave a part out (for a quick look while developing)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the end-to-end load with py-spy (twice: all threads, GIL holder)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="tries of the driver and sink ceilings, the end-to-end load, the embedded load and each "
                         "slices load, interleaved; the best of each is reported (default 2)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (printed on stderr)")
    args = ap.parse_args()
    n, small = args.rows, max(1, args.rows // 10)
    base = Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
    say(f"working folder {base}")
    result: dict = {"rows": n, "day": DAY.isoformat(), "machine": machine(),
                    "settings": {"fetch_size": args.fetch_size, "batch_rows": args.batch_rows}}
    pg = proxy = None
    try:
        pg = start_postgres({"shared_buffers": "512MB", "work_mem": "64MB", "max_connections": "60"})
        result["machine"]["postgresql"] = pg.execute("SHOW server_version")[0][0]
        make_data(pg, n)
        proxy = subprocess.Popen([PY, "-m", "tests.benchmarks.proxy_server", pg.host, str(pg.port)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env(), cwd=ROOT, text=True)
        proxy_port = int(proxy.stdout.readline())
        warehouse = base / "warehouse.duckdb"
        copied = copy_to_duckdb(pg, warehouse, base)
        assert copied == n, (copied, n)
        w = DayBounds(DAY)
        common = {"start": w.start.isoformat(), "end": w.end.isoformat()}

        say("wire ceiling: psycopg binary COPY")
        wire = measure("wire", dsn=pg.dsn(USER, PASSWORD, DB), sql=PG_SQL.format(start="%s", end="%s"), **common)
        rs = redshift_connection(proxy_port, args.fetch_size)
        rs_driver = redshift_connection(proxy_port, args.fetch_size, "driver")
        rs_chunked = redshift_connection(proxy_port, args.fetch_size, "connectorx", CHUNKS)
        chunked_loads: list[dict] = []
        chunked_smalls: list[dict] = []
        proxy_url = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{proxy_port}/{DB}"
        literal_sql = PG_SQL.format(start=f"TIMESTAMP '{w.start.isoformat(sep=' ')}'",
                                    end=f"TIMESTAMP '{w.end.isoformat(sep=' ')}'")
        drivers, sinks, loads, smalls, cxs, dlts, driver_loads = [], [], [], [], [], [], []
        for r in range(args.repeat):  # interleaved, best of each: the least disturbed try
            say(f"driver ceiling: redshift-connector server-side cursor (try {r + 1})")
            drv = measure("driver", host="127.0.0.1", port=proxy_port, database=DB, user=USER, password=PASSWORD,
                          qmark_sql=PG_SQL.format(start="?", end="?"), fetch_size=args.fetch_size, **common)
            assert drv["rows"] == n, drv
            drivers.append(drv)
            say(f"sink ceiling: DuckDB sink replace of the mapped day in memory (try {r + 1})")
            snk = measure("sink", warehouse=str(warehouse), duckdb_sql=PG_SQL.format(start="?", end="?"),
                          day=DAY.isoformat(), mapping=MAPPING, source="bench", batch_rows=args.batch_rows,
                          sink_path=str(base / f"sink-ceiling-{r}.duckdb"))
            assert snk["rows"] == n, snk
            sinks.append(snk)
            say(f"connectorx ceiling: arrow_stream through the proxy, discarded (try {r + 1})")
            rx = measure("connectorx", url=proxy_url + "?sslmode=disable", sql=literal_sql,
                         batch_rows=args.batch_rows)
            assert rx["rows"] == n, rx
            cxs.append(rx)
            say(f"peer: dlt sql_table(backend='pyarrow') -> DuckDB (try {r + 1})")
            peer_dir = base / f"dlt-{r}"
            peer_dir.mkdir()
            peer = measure("dlt", url=proxy_url.replace("postgresql://", "postgresql+psycopg2://"),
                           batch_rows=args.batch_rows, folder=str(peer_dir), duckdb_path=str(peer_dir / "dlt.duckdb"),
                           **common)
            assert peer["rows"] == n, peer
            dlts.append(peer)
            say(f"end to end: ingestd load of {n} rows, Redshift connector (connectorx) -> DuckDB sink (try {r + 1})")
            loads.append(load_day(load_config(base / f"e2e-{r}", rs, batch_rows=args.batch_rows), DAY, n, tree=True))
            say(f"end to end: ingestd load of {n} rows, Redshift connector (driver) -> DuckDB sink (try {r + 1})")
            driver_loads.append(load_day(load_config(base / f"e2e-driver-{r}", rs_driver, batch_rows=args.batch_rows),
                                         DAY, n, tree=True))
            say(f"memory: ingestd load of {small} rows (try {r + 1})")
            smalls.append(load_day(load_config(base / f"e2e-small-{r}", rs, batch_rows=args.batch_rows),
                                   SMALL_DAY, small, tree=True))
            say(f"end to end: ingestd load of {n} and {small} rows, fetch_chunks = {CHUNKS} (try {r + 1})")
            chunked_loads.append(load_day(load_config(base / f"e2e-chunked-{r}", rs_chunked,
                                                      batch_rows=args.batch_rows), DAY, n, tree=True))
            chunked_smalls.append(load_day(load_config(base / f"e2e-chunked-small-{r}", rs_chunked,
                                                       batch_rows=args.batch_rows), SMALL_DAY, small, tree=True))
        drv = min(drivers, key=lambda x: x["seconds"])
        snk = min(sinks, key=lambda x: x["seconds"])
        e2e = max(loads, key=lambda x: x["rows_per_s"])
        e2e_driver = max(driver_loads, key=lambda x: x["rows_per_s"])
        rx = min(cxs, key=lambda x: x["seconds"])
        peer = min(dlts, key=lambda x: x["seconds"])
        ceilings = {
            "wire_rows_per_s": round(n / wire["seconds"]),
            "wire_mb_per_s": round(wire["bytes"] / 2**20 / wire["seconds"], 1),
            "driver_rows_per_s": round(n / drv["seconds"]), "driver_peak_rss_mb": round(drv["maxrss_mb"], 1),
            "sink_rows_per_s": round(n / snk["seconds"]),
            "connectorx_rows_per_s": round(n / rx["seconds"]), "connectorx_peak_rss_mb": round(rx["maxrss_mb"], 1),
            "connectorx_rows_per_s_tries": [round(n / x["seconds"]) for x in cxs],
            "map_rows_per_s": round(n / min(x["map_seconds"] for x in sinks)),
            "mapped_day_arrow_mb": round(snk["arrow_mb"], 1),
            "driver_rows_per_s_tries": [round(n / x["seconds"]) for x in drivers],
            "sink_rows_per_s_tries": [round(n / x["seconds"]) for x in sinks],
        }
        ceilings["driver_to_wire"] = round(ceilings["driver_rows_per_s"] / ceilings["wire_rows_per_s"], 3)
        result["ceilings"] = ceilings
        peer_rate = n / peer["seconds"]
        result["peer"] = {"tool": f"dlt {peer['version']} sql_table(backend='pyarrow') -> DuckDB",
                          "rows_per_s": round(peer_rate), "seconds": round(peer["seconds"], 2),
                          "peak_rss_mb": round(peer["maxrss_mb"], 1),
                          "rows_per_s_tries": [round(n / x["seconds"]) for x in dlts]}
        lower = min(ceilings["wire_rows_per_s"], ceilings["sink_rows_per_s"])

        def e2e_figures(best: dict, tries: list[dict]) -> dict:
            return {
                "rows_per_s": round(best["rows_per_s"]), "load_s": round(best["load_s"], 2),
                "command_wall_s": round(best["wall_s"], 2),
                "command_rows_per_s": round(n / best["wall_s"]),
                "ratio_to_dlt": round(best["rows_per_s"] / peer_rate, 3),
                "command_ratio_to_dlt": round(n / best["wall_s"] / peer_rate, 3),
                "ratio_to_min_wire_sink": round(best["rows_per_s"] / lower, 3),
                "ratio_to_connectorx_ceiling": round(best["rows_per_s"] / ceilings["connectorx_rows_per_s"], 3),
                "ratio_to_driver_ceiling": round(best["rows_per_s"] / ceilings["driver_rows_per_s"], 3),
                "rows_per_s_tries": [round(x["rows_per_s"]) for x in tries],
                "command_cpu_s": round(best["cpu_s"], 2),
                "tree_peak_rss_mb": round(max(x["tree_peak_rss_mb"] for x in tries), 1),
            }

        result["end_to_end"] = {"min_wire_sink": "wire" if ceilings["wire_rows_per_s"] <= ceilings["sink_rows_per_s"]
                                else "sink",
                                "connectorx": e2e_figures(e2e, loads), "driver": e2e_figures(e2e_driver, driver_loads),
                                f"connectorx_fetch_chunks_{CHUNKS}": e2e_figures(
                                    max(chunked_loads, key=lambda x: x["rows_per_s"]), chunked_loads)}
        peak_n = max(x["tree_peak_rss_mb"] for x in loads)
        peak_small = max(x["tree_peak_rss_mb"] for x in smalls)
        result["memory"] = {
            "engine": "connectorx", "measured": "sum of the RSS of the ingestd process and its children, every 0.1 s",
            "peak_rss_mb_at_n": round(peak_n, 1), "peak_rss_mb_at_n_div_10": round(peak_small, 1),
            "growth_mb_for_10x_rows": round(peak_n - peak_small, 1),
            "ratio_n_to_n_div_10": round(peak_n / peak_small, 3),
            "peak_rss_mb_tries_at_n": [round(x["tree_peak_rss_mb"], 1) for x in loads],
            "peak_rss_mb_tries_at_n_div_10": [round(x["tree_peak_rss_mb"], 1) for x in smalls],
            "main_process_maxrss_mb_at_n": round(max(x["maxrss_mb"] for x in loads), 1),
        }
        cpeak_n = max(x["tree_peak_rss_mb"] for x in chunked_loads)
        cpeak_small = max(x["tree_peak_rss_mb"] for x in chunked_smalls)
        result["memory"][f"fetch_chunks_{CHUNKS}"] = {
            "peak_rss_mb_at_n": round(cpeak_n, 1), "peak_rss_mb_at_n_div_10": round(cpeak_small, 1),
            "growth_mb_for_10x_rows": round(cpeak_n - cpeak_small, 1),
            "main_process_maxrss_mb_at_n": round(max(x["maxrss_mb"] for x in chunked_loads), 1),
        }

        if args.profile:
            say("profile: the end-to-end load under py-spy")
            result["end_to_end"]["profile"] = profile_load(base / "e2e-0", DAY)

        if "embedded" not in args.skip:
            embs = []
            for r in range(args.repeat):
                say(f"embedded path: ingestd load of {n} rows, DuckDB connector -> DuckDB sink (try {r + 1})")
                embs.append(load_day(load_config(base / f"embedded-{r}", duckdb_connection(warehouse),
                                                 batch_rows=args.batch_rows), DAY, n))
            emb = max(embs, key=lambda x: x["rows_per_s"])
            result["embedded"] = {"rows_per_s": round(emb["rows_per_s"]), "load_s": round(emb["load_s"], 2),
                                  "ratio_to_sink_ceiling": round(emb["rows_per_s"] / ceilings["sink_rows_per_s"], 3),
                                  "ratio_to_map_stage": round(emb["rows_per_s"] / ceilings["map_rows_per_s"], 3),
                                  "peak_rss_mb": round(emb["maxrss_mb"], 1),
                                  "rows_per_s_tries": [round(x["rows_per_s"]) for x in embs]}

        if "slices" not in args.skip:
            sl: dict = {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))}
            runs_of: dict[str, list] = {"connectorx_k1": [], "connectorx_k2": [], "driver_k2": []}
            for r in range(args.repeat):
                for name, conn, k in (("connectorx_k1", rs, 1), ("connectorx_k2", rs, 2), ("driver_k2", rs_driver, 2)):
                    say(f"slices: ingestd load of {n} rows, {name} (try {r + 1})")
                    runs_of[name].append(load_day(load_config(base / f"slices-{name}-{r}", conn, slices=k,
                                                              batch_rows=args.batch_rows), DAY, n, tree=True))
            for name, runs in runs_of.items():
                best = max(runs, key=lambda x: x["rows_per_s"])
                sl[name] = {"rows_per_s": round(best["rows_per_s"]), "load_s": round(best["load_s"], 2),
                            "ratio_to_dlt": round(best["rows_per_s"] / peer_rate, 3),
                            "tree_peak_rss_mb": round(max(x["tree_peak_rss_mb"] for x in runs), 1),
                            "rows_per_s_tries": [round(x["rows_per_s"]) for x in runs]}
            sl["connectorx_speedup_k2"] = round(sl["connectorx_k2"]["rows_per_s"] / sl["connectorx_k1"]["rows_per_s"],
                                                3)
            result["slices"] = sl

        if "recheck" not in args.skip:
            result["recheck"] = recheck_cost(base, args.batch_rows)
        if "schedule" not in args.skip:
            say(f"schedule scale: {SCHEDULE_SOURCES} sources, idle for {args.idle_seconds:.0f}s")
            result["schedule"] = schedule_scale(base, args.idle_seconds)
        result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result["targets"] = targets(result)
    finally:
        if proxy is not None:
            with contextlib.suppress(Exception):
                proxy.stdin.close()
            with contextlib.suppress(Exception):
                proxy.wait(10)
        if pg is not None:
            pg.cleanup()
        if args.keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


def targets(r: dict) -> dict:
    """The issue's targets, met or not."""
    default = r["end_to_end"]["connectorx"]
    out = {"connectorx_engine_at_least_2x_dlt": default["ratio_to_dlt"] >= 2.0,
           "connectorx_engine_at_least_0.5_of_min_wire_sink": default["ratio_to_min_wire_sink"] >= 0.5,
           "peak_rss_at_most_300_mb": r["memory"]["peak_rss_mb_at_n"] <= 300,
           "rss_growth_under_50_mb_for_10x_rows": r["memory"]["growth_mb_for_10x_rows"] < 50}
    if "recheck" in r:
        out["unchanged_recheck_fetches_zero_rows"] = (r["recheck"]["rows_fetched"] == 0
                                                      and r["recheck"]["runs_started"] == 0)
    if "embedded" in r:
        out["embedded_at_least_0.85_of_sink_ceiling"] = r["embedded"]["ratio_to_sink_ceiling"] >= 0.85
    if "schedule" in r:
        out["idle_cpu_under_1pct_of_a_core_with_1000_sources"] = r["schedule"]["cpu_pct_of_one_core"] < 1.0
    return out


if __name__ == "__main__":
    sys.exit(main())
