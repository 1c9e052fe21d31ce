"""Throughput of 1, 2 and 3 replicas on latency-bound sources, in one run; prints one JSON object.

    .venv/bin/python tests/benchmarks/replicas.py                  # 30 sources x 3 days, 0.25 s per batch
    .venv/bin/python tests/benchmarks/replicas.py --sources 12 --slow 0.1

It starts its own PostgreSQL (tests/postgres.py: the shared state store and the PostgreSQL
sink) and mosquitto (tests/broker.py), fills a DuckDB warehouse, and for each case starts the
replicas on a fresh database and times the catch-up (every day of every source loaded) from the
first start to the last committed day. The warehouse answers slowly on purpose: the test
connector `slowduck` sleeps `--slow` seconds per batch of `batch_rows` rows, as a warehouse's
query latency and network would, so the work is latency-bound rather than CPU-bound.

Cases: `replicas_1`, `replicas_2`, `replicas_3` (each with `max_concurrent_loads` = 2), and
`one_replica_as_wide`: one replica with `max_concurrent_loads` = 6, the same number of
concurrent loads as three replicas. Speed-ups are ratios to `replicas_1` of the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.broker import Mosquitto  # noqa: E402
from tests.postgres import start_postgres  # noqa: E402
from tests.test_replicas import (  # noqa: E402
    PASSWORD,
    Replica,
    all_loaded,
    env_for,
    fill_warehouse,
    newest_due_day,
    replica_config,
    runs,
    source_names,
)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_case(folder: Path, pg, broker: Mosquitto, *, replicas: int, width: int, sources: list[str],
             days: list[dt.date], slow: float, db: str) -> dict:
    pg.create_database(db, owner="ingestd")
    env = env_for(folder, INGESTD_TEST_SLOW_S=str(slow))
    started = time.monotonic()
    procs = [Replica(replica_config(folder / db / f"r{i}", f"r{i}", port=pg.port, db=db, broker_port=broker.port,
                                    sources=sources, connection_type="slowduck", max_concurrent_loads=width,
                                    recheck="[]", lookback=len(days), batch_rows=1000,
                                    warehouse=folder / "warehouse.duckdb"), f"r{i}", env)
             for i in range(1, replicas + 1)]
    keys = [(s, d) for s in sources for d in days]
    try:
        while not all_loaded(pg, db, keys):
            if time.monotonic() - started > 1800:
                raise TimeoutError(f"{db}: not loaded after 30 minutes")
            time.sleep(0.2)
        done = runs(pg, db)
    finally:
        for p in procs:
            p.stop()
    loads = [r for r in done if r["status"] == "succeeded"]
    first = min(r["started_at"] for r in loads)
    last = max(r["finished_at"] for r in loads)
    seconds = (last - first).total_seconds()
    return {"replicas": replicas, "max_concurrent_loads": width, "days": len(loads), "seconds": round(seconds, 2),
            "days_per_s": round(len(loads) / seconds, 3),
            "days_by_replica": dict(sorted(Counter(r["replica"] for r in loads).items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=30)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--rows", type=int, default=5000, help="rows per day (batches of 1000)")
    parser.add_argument("--slow", type=float, default=0.25, help="seconds the warehouse takes per batch")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ingestd-replicas-bench-"))
    sources = source_names(args.sources)
    newest = newest_due_day()
    days = [newest - dt.timedelta(days=i) for i in range(args.days)]
    note(f"filling the warehouse: {len(sources)} sources x {len(days)} days x {args.rows} rows")
    fill_warehouse(folder / "warehouse.duckdb", sources, days, rows=args.rows)
    pg = start_postgres({"max_connections": "100"})
    pg.create_user("ingestd", PASSWORD)
    broker_dir = folder / "broker"
    broker_dir.mkdir()
    broker = Mosquitto(broker_dir).start()
    out: dict = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                             "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]},
                 "workload": {"sources": len(sources), "days": len(days), "rows_per_day": args.rows,
                              "batch_rows": 1000, "slow_s_per_batch": args.slow}}
    try:
        cases = [("replicas_1", 1, 2), ("replicas_2", 2, 2), ("replicas_3", 3, 2), ("one_replica_as_wide", 1, 6)]
        for name, n, width in cases:
            note(f"{name}: {n} replica(s), max_concurrent_loads = {width}")
            out[name] = run_case(folder, pg, broker, replicas=n, width=width, sources=sources, days=days,
                                 slow=args.slow, db=name)
            note(f"  {out[name]}")
        base = out["replicas_1"]["days_per_s"]
        out["speedup"] = {name: round(out[name]["days_per_s"] / base, 2) for name, _, _ in cases}
    finally:
        broker.stop()
        pg.cleanup()
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
