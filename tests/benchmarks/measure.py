"""The ceilings, each measured in a process of its own (so its peak RSS is its own and nothing
else shares its interpreter lock). Called by run.py:

    python -m tests.benchmarks.measure PART '{"json": "arguments"}'   # prints one JSON object

Parts:
- wire: psycopg binary `COPY (query) TO STDOUT`, straight to PostgreSQL, bytes discarded.
- driver: redshift-connector through the proxy, the way the Redshift connector reads a day
  (a transaction, `DECLARE ... CURSOR FOR <query>` with bound parameters, `FETCH FORWARD n`
  until drained), rows discarded.
- sink: the day read from the DuckDB warehouse copy and mapped to the events schema first
  (timed apart, as the map figure), then the DuckDB sink's `replace` of those batches, held in
  memory, into a new file.
- connectorx: connectorx through the proxy as the connector's connectorx engine reads a day
  (`protocol="cursor"`, `return_type="arrow_stream"`, batches of batch_rows, the day values as
  literals), batches discarded, in this process (no child, no conversion).
- dlt: the peer. dlt's `sql_table(backend="pyarrow")` (SQLAlchemy + psycopg2 through the proxy,
  chunks of batch_rows, the day's range as the query's WHERE) run by a dlt pipeline into a new
  DuckDB file: extract, normalize and load, timed whole.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import resource
import sys
import time
from pathlib import Path


def _maxrss_mb() -> float:
    """This process's peak RSS (VmHWM: of its own memory, unlike ru_maxrss, which starts at the
    peak of the process that started it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def wire(a: dict) -> dict:
    import psycopg
    start, end = dt.datetime.fromisoformat(a["start"]), dt.datetime.fromisoformat(a["end"])
    nbytes = 0
    with psycopg.connect(a["dsn"], autocommit=True) as con:
        cur = con.cursor()
        t0 = time.perf_counter()
        with cur.copy(f"COPY ({a['sql']}) TO STDOUT (FORMAT BINARY)", (start, end)) as copy:
            for chunk in copy:
                nbytes += len(chunk)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": nbytes, "maxrss_mb": _maxrss_mb()}


def driver(a: dict) -> dict:
    import redshift_connector
    start, end = dt.datetime.fromisoformat(a["start"]), dt.datetime.fromisoformat(a["end"])
    con = redshift_connector.connect(host=a["host"], port=a["port"], database=a["database"], user=a["user"],
                                     password=a["password"], ssl=False, application_name="ingestd-bench-driver")
    try:
        con.autocommit = True
        cur = con.cursor()
        cur.execute("SET timezone TO 'UTC'")
        con.autocommit = False
        cur = con.cursor()
        cur.paramstyle = "qmark"
        rows = 0
        t0 = time.perf_counter()
        cur.execute(f"DECLARE bench_cursor CURSOR FOR\n{a['qmark_sql']}\n", [start, end])
        fetch = f"FETCH FORWARD {int(a['fetch_size'])} FROM bench_cursor"
        while True:
            cur.execute(fetch)
            got = cur.fetchall()
            rows += len(got)
            if len(got) < a["fetch_size"]:
                break
        seconds = time.perf_counter() - t0
        cur.execute("CLOSE bench_cursor")
        con.rollback()
    finally:
        con.close()
    return {"seconds": seconds, "rows": rows, "maxrss_mb": _maxrss_mb()}


def sink(a: dict) -> dict:
    import duckdb
    import pyarrow as pa

    from ingestd import Target
    from ingestd.core.query import DayWindow
    from ingestd.core.schema import Mapping, RowMapper
    from ingestd.plugins.duckdb_sink.sink import DuckDBSink, DuckDBSinkConfig

    day = dt.date.fromisoformat(a["day"])
    window = DayWindow.of(day)
    with duckdb.connect(a["warehouse"], read_only=True) as con:
        reader = con.sql(a["duckdb_sql"], params=[window.start, window.end]).to_arrow_reader(a["batch_rows"])
        raw = list(reader)
    mapping = Mapping(**a["mapping"])
    mapper = RowMapper("events", mapping, window, source=a["source"], generation=1,
                       ingested_at=dt.datetime.now(dt.UTC))
    t0 = time.perf_counter()
    mapped = [mapper.map(b).rows for b in raw]
    map_seconds = time.perf_counter() - t0
    mapper.close()
    del raw
    rows = sum(b.num_rows for b in mapped)

    async def replace() -> float:
        s = DuckDBSink(DuckDBSinkConfig(Path(a["sink_path"])), name="bench")
        await s.open()

        async def batches():
            for b in mapped:
                yield b

        t = time.perf_counter()
        written = await s.replace(Target("events", a["source"], day, 1), batches())
        seconds = time.perf_counter() - t
        await s.close()
        assert written == rows, (written, rows)
        return seconds

    seconds = asyncio.run(replace())
    return {"seconds": seconds, "rows": rows, "map_seconds": map_seconds, "maxrss_mb": _maxrss_mb(),
            "arrow_mb": sum(b.nbytes for b in mapped) / 2**20, "pyarrow": pa.__version__}


def connectorx(a: dict) -> dict:
    import connectorx as cx
    t0 = time.perf_counter()
    reader = cx.read_sql(a["url"], a["sql"], protocol="cursor", return_type="arrow_stream",
                         batch_size=int(a["batch_rows"]), pre_execution_query=["SET timezone TO 'UTC'"])
    rows = 0
    for batch in reader:
        rows += batch.num_rows
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": rows, "maxrss_mb": _maxrss_mb(), "version": cx.__version__}


def dlt_peer(a: dict) -> dict:
    import dlt
    import sqlalchemy as sa
    from dlt.sources.sql_database import sql_table
    start, end = dt.datetime.fromisoformat(a["start"]), dt.datetime.fromisoformat(a["end"])

    def day_only(query, table):
        return query.where(table.c.ts >= start).where(table.c.ts < end)

    engine = sa.create_engine(a["url"])
    resource = sql_table(credentials=engine, table="events", backend="pyarrow", chunk_size=int(a["batch_rows"]),
                         query_adapter_callback=day_only, reflection_level="full")
    pipeline = dlt.pipeline(pipeline_name="bench_peer", pipelines_dir=a["folder"], dataset_name="bench",
                            destination=dlt.destinations.duckdb(a["duckdb_path"]))
    t0 = time.perf_counter()
    pipeline.run(resource)
    seconds = time.perf_counter() - t0
    import duckdb
    with duckdb.connect(a["duckdb_path"], read_only=True) as con:
        rows = con.execute("SELECT count(*) FROM bench.events").fetchone()[0]
    return {"seconds": seconds, "rows": rows, "maxrss_mb": _maxrss_mb(), "version": dlt.__version__}


PARTS = {"wire": wire, "driver": driver, "sink": sink, "connectorx": connectorx, "dlt": dlt_peer}

if __name__ == "__main__":
    print(json.dumps(PARTS[sys.argv[1]](json.loads(sys.argv[2]))))
