"""The map stage on its own: rows/s of `RowMapper` per part of the mapping, against a baseline.

    .venv/bin/python tests/benchmarks/mapping.py                 # 1,000,000 rows, 50,000 a batch
    .venv/bin/python tests/benchmarks/mapping.py --rows 2000000 --profile out.prof

Generates a stream of Statsig-like event batches in memory (a timestamp, a unit id, a stable id
and a company id that are sometimes null or empty, an event name, a nullable value, a small
metadata JSON object, one plain metadata column) and maps it through `RowMapper` with mappings
that switch on one part at a time:

- `ids`: one id column -> the id columns of the data (coalesce, id_type, the `ids` JSON object);
- `metadata`: no metadata -> the metadata JSON column unpacked plus a folded column;
- `timestamps`: a timestamp column -> the same instants as epoch milliseconds with `auto` units;
- `whole`: all of it at once;
- `minimal`: one id, a timestamp, an event name, nothing else (what every mapping pays).

The baseline, in the same run, is `pa.Table.cast` of the same batches to an all-text copy plus
a copy of the result (`pa.concat_arrays`): the cost of touching every value once in Arrow. Each
figure is the best of `--repeat` tries; ratios between figures of one run are what to compare.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ingestd.core.schema as current  # noqa: E402
from ingestd.core.query import DayWindow  # noqa: E402

DAY = dt.date(2026, 3, 10)
EVENTS = ["page_view", "click", "purchase", "signup", "add_to_cart", "search", "share", "logout"]


def make_batches(rows: int, batch_rows: int, *, epoch_ms: bool) -> list[pa.RecordBatch]:
    """Deterministic data of the benchmark day's shape (tests/benchmarks/run.py GENERATE), with
    more id columns: stable_id is null in 1 row of 7, company_id empty in 1 of 11."""
    start = int(dt.datetime(DAY.year, DAY.month, DAY.day, tzinfo=dt.UTC).timestamp() * 1_000_000)
    out = []
    for lo in range(0, rows, batch_rows):
        i = pa.array(range(lo, min(rows, lo + batch_rows)), pa.int64())
        n = len(i)
        us = pc.add(pc.divide(pc.multiply(i, 86_400_000_000), rows), start)
        if epoch_ms:
            ts: pa.Array = pc.divide(us, 1000)
        else:
            ts = us.cast(pa.timestamp("us"))
        ii = i.to_pylist()
        cols = {
            "ts": ts,
            "unit_id": pa.array([f"user_{(k * 7919) % 250000}" for k in ii]),
            "stable_id": pa.array([None if k % 7 == 0 else f"stable-{k % 99991:06d}" for k in ii]),
            "company_id": pa.array(["" if k % 11 == 0 else f"co{k % 313}" for k in ii]),
            "event_name": pa.array([EVENTS[k % 8] for k in ii]),
            "value": pa.array([None if k % 5 == 0 else str((k * 31) % 1000) for k in ii]),
            "metadata": pa.array([
                f'{{"platform": "{("ios", "android", "web")[k % 3]}", "app_version": "1.{k % 20}", '
                f'"country": "{("US", "DE", "BR", "IN", "JP")[k % 5]}"}}' for k in ii]),
            "page": pa.array([f"/p/{k % 50}" for k in ii]),
        }
        assert all(len(c) == n for c in cols.values())
        out.append(pa.RecordBatch.from_pydict(cols))
    return out


PARTS = {
    "minimal": dict(ids={"user_id": "unit_id"}, timestamp="ts", event_name="event_name"),
    "ids": dict(ids={"user_id": "unit_id", "stable_id": "stable_id", "company_id": "company_id"},
                timestamp="ts", event_name="event_name"),
    "metadata": dict(ids={"user_id": "unit_id"}, timestamp="ts", event_name="event_name",
                     metadata_json="metadata", metadata=["page"]),
    "timestamps": dict(ids={"user_id": "unit_id"}, timestamp="ts", event_name="event_name",
                       timestamp_unit="auto"),
    "whole": dict(ids={"user_id": "unit_id", "stable_id": "stable_id", "company_id": "company_id"},
                  timestamp="ts", event_name="event_name", event_value="value", metadata_json="metadata",
                  metadata=["page"], timestamp_unit="auto"),
    "benchmark_day": dict(ids={"user_id": "unit_id"}, timestamp="ts", event_name="event_name", event_value="value",
                          metadata_json="metadata"),
}
EPOCH = {"timestamps", "whole"}


def baseline(batches: list[pa.RecordBatch]) -> None:
    text = pa.schema([pa.field(f.name, pa.string()) for f in batches[0].schema])
    for b in batches:
        t = pa.Table.from_batches([b]).cast(text)
        pa.record_batch([pa.concat_arrays(c.chunks) for c in t.columns], schema=text)


def schema_at(ref: str) -> ModuleType:
    """kernel/core/schema.py as it is at git `ref`, imported as ingestd.core._schema_at_ref."""
    text = subprocess.run(["git", "show", f"{ref}:kernel/core/schema.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="ingestd-schema-")) / "schema.py"
    path.write_text(text)
    name = "ingestd.core._schema_at_ref"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def map_all(part: str, batches: list[pa.RecordBatch], schema: ModuleType = current) -> int:
    m = schema.Mapping(**PARTS[part])
    m.check("events")
    mapper = schema.RowMapper("events", m, DayWindow.of(DAY), source="bench", generation=1,
                              ingested_at=dt.datetime.now(dt.UTC))
    rows = 0
    try:
        for b in batches:
            out = mapper.map(b)
            rows += out.rows.num_rows
            assert not out.rejects, (part, out.rejects)
    finally:
        mapper.close()
    return rows


def best(fn, tries: int) -> float:
    times = []
    for _ in range(tries):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch-rows", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--part", action="append", choices=list(PARTS), help="only these parts (default: all)")
    ap.add_argument("--profile", type=Path, help="write a cProfile of the `whole` mapping here")
    ap.add_argument("--against", metavar="REF", help="also time the mapper of git REF, interleaved (e.g. main)")
    args = ap.parse_args()
    n = args.rows
    data = {False: make_batches(n, args.batch_rows, epoch_ms=False), True: make_batches(n, args.batch_rows,
                                                                                          epoch_ms=True)}
    base_s = best(lambda: baseline(data[False]), args.repeat)
    result: dict = {"rows": n, "batch_rows": args.batch_rows, "pyarrow": pa.__version__,
                    "baseline_rows_per_s": round(n / base_s), "parts": {}}
    ref = schema_at(args.against) if args.against else None
    if args.against:
        result["against"] = args.against
    for part in args.part or list(PARTS):
        batches = data[part in EPOCH]
        assert map_all(part, batches) == n
        if ref is None:
            s = best(lambda p=part, b=batches: map_all(p, b), args.repeat)
            result["parts"][part] = {"rows_per_s": round(n / s), "ratio_to_baseline": round(base_s / s, 3)}
            continue
        tries: dict[str, list[float]] = {"now": [], "ref": []}
        for _ in range(args.repeat):
            for key, module in (("ref", ref), ("now", current)):
                tries[key].append(best(lambda p=part, b=batches, m=module: map_all(p, b, m), 1))
        s, r = min(tries["now"]), min(tries["ref"])
        result["parts"][part] = {"rows_per_s": round(n / s), "ratio_to_baseline": round(base_s / s, 3),
                                 f"rows_per_s_at_{args.against}": round(n / r), "speedup": round(r / s, 2)}
    if args.profile:
        cProfile.runctx("map_all('whole', data[True])", globals(), {"map_all": map_all, "data": data},
                        str(args.profile))
    import duckdb
    result["duckdb"] = duckdb.__version__
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
