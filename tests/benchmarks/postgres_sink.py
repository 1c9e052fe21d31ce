"""The PostgreSQL sink's replace throughput against a plain ADBC Arrow ingest of the same batches
into an empty table, in one run on a throw-away cluster (tests/postgres.py: fsync off). Prints
one JSON object: rows/s of each (best of `--repeat`), the sink's ratio to the plain ingest, and
the process's peak RSS before and after (the sink holds one chunk of `chunk_rows`, not the day).

    .venv/bin/python tests/benchmarks/postgres_sink.py [--rows 1000000] [--repeat 3]

- `adbc_plain`: `adbc_ingest` (binary COPY) of the batches into an empty table, one transaction:
  the driver's ceiling, as issue 19 measured it.
- `sink_first`: `PostgresSink.replace` of a day never loaded (the staging table, then the swap
  into an empty partition).
- `sink_replace`: the same day replaced again (the swap also deletes the previous generation's
  rows, as every reload does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import adbc_driver_postgresql.dbapi as adbc_pg  # noqa: E402
import pyarrow as pa  # noqa: E402

from ingestd import Secret, Target  # noqa: E402
from ingestd.plugins.postgres_sink.config import PostgresSinkConfig  # noqa: E402
from ingestd.plugins.postgres_sink.sink import PostgresSink  # noqa: E402
from ingestd.testing.sink_suite import DAY, kit_batch  # noqa: E402
from tests.postgres import start_postgres  # noqa: E402

USER, PASSWORD, DB = "bench", "bench-password-1", "bench"
BATCH_ROWS = 50_000


def batches(rows: int, generation: int) -> list[pa.RecordBatch]:
    """`rows` canonical event rows as 50,000-row batches (one batch made, sliced and repeated:
    the cost measured is the sink's, not making rows)."""
    one = kit_batch("events", "bench", DAY, generation, BATCH_ROWS)
    return [one.slice(0, min(BATCH_ROWS, rows - off)) for off in range(0, rows, BATCH_ROWS)]


async def stream(items: list[pa.RecordBatch]):
    for batch in items:
        await asyncio.sleep(0)
        yield batch


def plain_ingest(uri: str, items: list[pa.RecordBatch], n: int) -> float:
    con = adbc_pg.connect(uri)
    try:
        cur = con.cursor()
        cur.execute("DROP TABLE IF EXISTS plain_ingest")
        cur.execute("CREATE TABLE plain_ingest (LIKE analytics.events_data)")
        con.commit()
        t0 = time.perf_counter()
        for off in range(0, len(items), 2):  # chunks of 100,000 rows, as the sink's default chunk_rows
            cur.adbc_ingest("plain_ingest", pa.Table.from_batches(items[off:off + 2]), mode="append")
        con.commit()
        seconds = time.perf_counter() - t0
        cur.execute("SELECT count(*) FROM plain_ingest")
        assert cur.fetchall()[0][0] == n
        cur.execute("DROP TABLE plain_ingest")
        con.commit()
        return seconds
    finally:
        con.close()


async def sink_replace(sink: PostgresSink, source: str, generation: int, items: list[pa.RecordBatch]) -> float:
    t0 = time.perf_counter()
    written = await sink.replace(Target("events", source, DAY, generation), stream(items))
    seconds = time.perf_counter() - t0
    assert written == sum(b.num_rows for b in items)
    return seconds


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = args.rows
    items = batches(n, 1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cluster = start_postgres()
    try:
        cluster.create_user(USER, PASSWORD)
        cluster.create_database(DB, owner=USER)
        config = PostgresSinkConfig(url=f"postgresql://{USER}@127.0.0.1:{cluster.port}/{DB}", password=Secret(PASSWORD))
        config.validate()
        sink = PostgresSink(config, name="bench")
        await sink.open()
        best: dict[str, float] = {}
        try:
            for i in range(args.repeat):
                times = {
                    "adbc_plain": await asyncio.to_thread(plain_ingest, config.adbc_uri(), items, n),
                    "sink_first": await sink_replace(sink, f"bench{i}", 1, items),
                    "sink_replace": await sink_replace(sink, f"bench{i}", 2, items),
                }
                for key, seconds in times.items():
                    best[key] = min(best.get(key, seconds), seconds)
        finally:
            await sink.close()
    finally:
        cluster.cleanup()
    rate = {key: round(n / seconds) for key, seconds in best.items()}
    print(json.dumps({
        "rows": n, "repeat": args.repeat, "kind": "events", "batch_rows": BATCH_ROWS,
        "chunk_rows": PostgresSinkConfig.chunk_rows,
        "rows_per_second": rate,
        "seconds": {key: round(s, 3) for key, s in best.items()},
        # the input is slices of one 50,000-row batch: memory beyond that is the sink's (and the
        # plain ingest's) own; a sink that collected the day would add about 250 MB per million rows
        "peak_rss_mb": {"before": round(rss_before), "after": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                     / 1024)},
        "ratio_to_adbc_plain": {key: round(rate[key] / rate["adbc_plain"], 3)
                                for key in ("sink_first", "sink_replace")},
    }, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
