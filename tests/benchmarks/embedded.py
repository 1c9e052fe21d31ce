"""The embedded path on its own, without PostgreSQL: DuckDB warehouse -> `ingestd load` -> DuckDB
sink, against the sink ceiling, in one run.

    .venv/bin/python tests/benchmarks/embedded.py --rows 500000 --repeat 3

Writes the benchmark day of tests/benchmarks/run.py (the same generator, run in DuckDB) into a
DuckDB warehouse file, then, interleaved `--repeat` times: the sink ceiling
(`tests/benchmarks/measure.py sink`: the day mapped first, then only the sink's replace of the
mapped batches held in memory is timed; the map stage's own rate comes with it) and `ingestd
load` of the day from that file (the CLI process, rate over its run's `duration_ms`). Reports
the best try of each and their ratio (the figure of BENCHMARKS.md "embedded path"). With
`--profile`, one more load under py-spy (all threads), summarised as in run.py. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.benchmarks.run import (  # noqa: E402
    DAY,
    MAPPING,
    PG_SQL,
    DayBounds,
    duckdb_connection,
    load_config,
    load_day,
    measure,
    profile_load,
    say,
)

GENERATE = """
CREATE TABLE events AS
SELECT CAST($day AS TIMESTAMP) + to_microseconds(CAST(i * 86400000000 // $n AS BIGINT)) AS ts,
       'user_' || ((i * 7919) % 250000) AS unit_id,
       (['page_view', 'click', 'purchase', 'signup', 'add_to_cart', 'search', 'share', 'logout'])[1 + i % 8]
         AS event_name,
       CASE WHEN i % 5 = 0 THEN NULL ELSE CAST((i * 31) % 1000 AS VARCHAR) END AS value,
       '{"platform": "' || (['ios', 'android', 'web'])[1 + i % 3] || '", "app_version": "1.' || (i % 20)
         || '", "country": "' || (['US', 'DE', 'BR', 'IN', 'JP'])[1 + i % 5] || '"}' AS metadata
FROM range(0, $n) AS t(i)
"""


def make_warehouse(path: Path, rows: int) -> None:
    import duckdb
    with duckdb.connect(str(path)) as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(GENERATE, {"day": DAY, "n": rows})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--batch-rows", type=int, default=50_000, help="[daemon] batch_rows (default 50,000)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="one more load under py-spy, summarised")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    n = args.rows
    base = Path(tempfile.mkdtemp(prefix="ingestd-embedded-"))
    try:
        warehouse = base / "warehouse.duckdb"
        make_warehouse(warehouse, n)
        w = DayBounds(DAY)
        sinks, loads = [], []
        for r in range(args.repeat):
            say(f"sink ceiling (try {r + 1})")
            snk = measure("sink", warehouse=str(warehouse), duckdb_sql=PG_SQL.format(start="?", end="?"),
                          day=DAY.isoformat(), mapping=MAPPING, source="bench", batch_rows=args.batch_rows,
                          sink_path=str(base / f"sink-ceiling-{r}.duckdb"), start=w.start.isoformat(),
                          end=w.end.isoformat())
            assert snk["rows"] == n, snk
            sinks.append(snk)
            say(f"embedded: ingestd load of {n} rows (try {r + 1})")
            loads.append(load_day(load_config(base / f"embedded-{r}", duckdb_connection(warehouse),
                                              batch_rows=args.batch_rows), DAY, n))
        snk = min(sinks, key=lambda x: x["seconds"])
        emb = max(loads, key=lambda x: x["rows_per_s"])
        result: dict = {
            "rows": n, "batch_rows": args.batch_rows, "cores": len(os.sched_getaffinity(0)),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "sink_rows_per_s": round(n / snk["seconds"]),
            "map_rows_per_s": round(n / min(x["map_seconds"] for x in sinks)),
            "embedded_rows_per_s": round(emb["rows_per_s"]),
            "ratio_to_sink_ceiling": round(emb["rows_per_s"] * snk["seconds"] / n, 3),
            "embedded_cpu_s": round(emb["cpu_s"], 2), "embedded_peak_rss_mb": round(emb["maxrss_mb"], 1),
            "sink_rows_per_s_tries": [round(n / x["seconds"]) for x in sinks],
            "map_rows_per_s_tries": [round(n / x["map_seconds"]) for x in sinks],
            "embedded_rows_per_s_tries": [round(x["rows_per_s"]) for x in loads],
        }
        if args.profile:
            say("profile: the embedded load under py-spy")
            result["profile"] = profile_load(base / "embedded-0", DAY)
    finally:
        if args.keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    t0 = time.monotonic()
    code = main()
    say(f"done in {time.monotonic() - t0:.0f}s")
    sys.exit(code)
