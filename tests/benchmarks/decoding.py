"""Decoding alone: redshift-connector's own row decoding against the Redshift connector's
(plugins/redshift/fast_rows.py: wire-value decoders and its DataRow handler), each with and without the
conversion to Arrow, on one stream through the test proxy. Prints one JSON object (best of 3).

    .venv/bin/python tests/benchmarks/decoding.py [ROWS]     # default 1,000,000
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redshift_connector  # noqa: E402

from ingestd.plugins.redshift import connector as R  # noqa: E402
from ingestd.plugins.redshift import fast_rows as F  # noqa: E402
from tests.benchmarks import run as B  # noqa: E402
from tests.postgres import start_postgres  # noqa: E402


def connector_decoding(con) -> frozenset[int]:
    F.use_fast_data_rows(con)
    return F.use_raw_values(con)


def fetch(port: int, n: int, *, convert: bool, ours: bool, fetch_size: int = 10_000) -> int:
    w = B.DayBounds(B.DAY)
    con = redshift_connector.connect(host="127.0.0.1", port=port, database=B.DB, user=B.USER,
                                     password=B.PASSWORD, ssl=False)
    try:
        raw = connector_decoding(con) if ours else frozenset()
        con.autocommit = True
        con.cursor().execute("SET timezone TO 'UTC'")
        con.autocommit = False
        cur = con.cursor()
        cur.paramstyle = "qmark"
        t0 = time.perf_counter()
        cur.execute(f"DECLARE c CURSOR FOR {B.PG_SQL.format(start='?', end='?')}", [w.start, w.end])
        rows, columns = 0, None
        while True:
            cur.execute(f"FETCH FORWARD {fetch_size} FROM c")
            got = cur.fetchall()
            rows += len(got)
            columns = columns or R._columns(cur, raw)
            if convert and got:
                R.rows_to_batch(columns, got)
            if len(got) < fetch_size:
                break
        seconds = time.perf_counter() - t0
        con.rollback()
    finally:
        con.close()
    assert rows == n, (rows, n)
    return round(n / seconds)


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    pg = start_postgres({"shared_buffers": "512MB", "work_mem": "64MB"})
    try:
        B.make_data(pg, n)
        proxy = subprocess.Popen([B.PY, "-m", "tests.benchmarks.proxy_server", pg.host, str(pg.port)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=B.env(), cwd=ROOT, text=True)
        port = int(proxy.stdout.readline())
        variants = {"driver": (False, False), "driver_and_arrow": (True, False),
                    "connector": (False, True), "connector_and_arrow": (True, True)}
        tries: dict[str, list[int]] = {k: [] for k in variants}
        for _ in range(3):  # interleaved, best of each
            for name, (convert, ours) in variants.items():
                tries[name].append(fetch(port, n, convert=convert, ours=ours))
        best = {k: max(v) for k, v in tries.items()}
        print(json.dumps({"rows": n, "rows_per_s": best,
                          "ratio_to_driver": {k: round(v / best["driver"], 3) for k, v in best.items()},
                          "tries": tries}, indent=1))
        proxy.stdin.close()
        proxy.wait(10)
    finally:
        pg.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
