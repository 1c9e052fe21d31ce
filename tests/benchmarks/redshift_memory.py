"""Peak memory of a Redshift fetch when the day grows tenfold: it must stay flat.

Starts a throw-away PostgreSQL cluster (tests/postgres.py) and the Redshift protocol proxy
(tests/pg_proxy.py), fills one day with N event rows and another with 10 x N, then fetches each
day through the `redshift` connector (the real redshift-connector driver, server-side cursor) in
a fresh subprocess, and prints JSON with each subprocess's peak RSS. The proxy and the database
stay in this process and the server, so the figures are the connector's own.

    .venv/bin/python tests/benchmarks/redshift_memory.py               # 200k and 2M rows
    .venv/bin/python tests/benchmarks/redshift_memory.py --rows 50000  # a quicker look
    .venv/bin/python tests/benchmarks/redshift_memory.py --plain       # also plain execute + fetchmany

`--plain` adds, for contrast, the same days read with a plain `cursor.execute` + `fetchmany`,
which redshift-connector serves from a copy of the whole result in memory.
Not collected by pytest (tests/benchmarks is excluded).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DAY_SMALL = dt.date(2026, 3, 10)
DAY_LARGE = dt.date(2026, 3, 11)
USER, PASSWORD, TABLE = "bench", "bench-password", "events_raw"
QUERY = f"SELECT ts, user_id, event, value, props FROM {TABLE} WHERE ts >= {{start}} AND ts < {{end}}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- the measured side (a subprocess per day) --------------------------------------------------------

def child(args) -> None:
    from ingestd import Secret
    from ingestd.core.query import DayWindow, render
    from ingestd.plugins.redshift.connector import RedshiftConfig, RedshiftConnector

    config = RedshiftConfig(database="postgres", host="127.0.0.1", port=args.port, user=USER,
                            password=Secret(PASSWORD), ssl=False, fetch_size=args.fetch_size)
    connector = RedshiftConnector(config, name="bench")
    day = dt.date.fromisoformat(args.day)
    query = render(QUERY, DayWindow.of(day), connector.capabilities.paramstyle)

    async def run() -> dict:
        await connector.check(query)  # the driver's imports and a first session, before the baseline
        baseline = peak_rss_mb()
        started = time.monotonic()
        rows = batches = 0
        if args.mode == "cursor":
            async for batch in connector.fetch(query, args.batch_rows):
                rows += batch.num_rows
                batches += 1
        else:
            rows, batches = await asyncio.to_thread(plain_fetch, config, query, args.batch_rows)
        seconds = time.monotonic() - started
        return {"mode": args.mode, "day": args.day, "rows": rows, "batches": batches, "seconds": round(seconds, 2),
                "rows_per_s": int(rows / seconds) if seconds else None, "baseline_rss_mb": round(baseline, 1),
                "peak_rss_mb": round(peak_rss_mb(), 1), "fetch_growth_mb": round(peak_rss_mb() - baseline, 1)}

    print(json.dumps(asyncio.run(run())))


def plain_fetch(config, query, batch_rows: int) -> tuple[int, int]:
    import redshift_connector
    con = redshift_connector.connect(host=config.host, port=config.port, user=USER, password=PASSWORD,
                                     database=config.database, ssl=False)
    try:
        cursor = con.cursor()
        cursor.paramstyle = "qmark"
        cursor.execute(query.sql, query.params)
        rows = batches = 0
        while chunk := cursor.fetchmany(batch_rows):
            rows += len(chunk)
            batches += 1
        return rows, batches
    finally:
        con.close()


# -- the driving side ---------------------------------------------------------------------------------

def fill(cluster, day: dt.date, n: int) -> None:
    cluster.execute(
        f"INSERT INTO {TABLE} SELECT %s::timestamp + (i * 86399.0 / %s) * interval '1 second', "
        "'user-' || (i %% 50000), (ARRAY['click', 'view', 'purchase', 'signup'])[1 + i %% 4], (i %% 1000)::text, "
        "'{\"country\": \"NL\", \"platform\": \"ios\", \"session\": ' || i || '}' FROM generate_series(0, %s - 1) i",
        [day, n, n])


def measure(port: int, day: dt.date, args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--port", str(port), "--day", day.isoformat(), "--mode", mode,
           "--batch-rows", str(args.batch_rows), "--fetch-size", str(args.fetch_size)]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"measuring {mode} {day} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="rows of the small day (the large one has 10x)")
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--batch-rows", type=int, default=50_000, help="the daemon's default batch_rows")
    p.add_argument("--fetch-size", type=int, default=1000, help="the connector's default fetch_size")
    p.add_argument("--plain", action="store_true", help="also measure plain execute + fetchmany")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--day", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="cursor", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    from tests.pg_proxy import RedshiftProxy
    from tests.postgres import start_postgres

    cluster = start_postgres({"work_mem": "64MB"})
    try:
        cluster.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        cluster.execute(f"CREATE TABLE {TABLE} (ts TIMESTAMP, user_id VARCHAR(64), event VARCHAR(64), "
                        "value VARCHAR(64), props VARCHAR(256))")
        cluster.execute(f"GRANT SELECT ON {TABLE} TO {USER}")
        sizes = {DAY_SMALL: args.rows, DAY_LARGE: args.rows * args.factor}
        started = time.monotonic()
        for day, n in sizes.items():
            fill(cluster, day, n)
        cluster.execute(f"ANALYZE {TABLE}")
        filled = time.monotonic() - started
        with RedshiftProxy("127.0.0.1", cluster.port) as proxy:
            results = [measure(proxy.port, day, args, "cursor") for day in sizes]
            if args.plain:
                results += [measure(proxy.port, day, args, "plain") for day in sizes]
    finally:
        cluster.cleanup()
    small, large = results[0], results[1]
    report = {
        "rows": [args.rows, args.rows * args.factor],
        "batch_rows": args.batch_rows,
        "fetch_size": args.fetch_size,
        "fill_seconds": round(filled, 1),
        "results": results,
        "peak_rss_mb": {"small_day": small["peak_rss_mb"], "large_day": large["peak_rss_mb"]},
        "fetch_growth_mb": {"small_day": small["fetch_growth_mb"], "large_day": large["fetch_growth_mb"]},
        "peak_ratio_large_to_small": round(large["peak_rss_mb"] / small["peak_rss_mb"], 2),
        "flat": large["peak_rss_mb"] <= small["peak_rss_mb"] * 1.25,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
