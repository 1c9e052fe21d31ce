"""The demo warehouse: a DuckDB file with Statsig-like raw events and pre-computed metrics.

Every day's rows are a pure function of the date (hash-seeded DuckDB SQL, no random state), so
landing a day again, or in another file, gives the same rows. A tiny share of rows is bad on
purpose (no unit id at all, a broken `props` JSON) so the reject path shows in the demo without
failing a load.

Tables:

    events_raw     ts TIMESTAMP (UTC), user_id VARCHAR (NULL for anonymous traffic),
                   device_id VARCHAR (NULL sometimes), event VARCHAR, value VARCHAR,
                   country VARCHAR, platform VARCHAR, props VARCHAR (a JSON object)
    metrics_daily  ds DATE, user_id VARCHAR, metric VARCHAR, value DOUBLE,
                   num DOUBLE, den DOUBLE   (value rows: revenue, sessions;
                                             ratio rows: checkout_conversion, minutes_per_session)
    ingestd_demo_days  day DATE, events BIGINT, metrics BIGINT, landed_at TIMESTAMPTZ
                   which days were landed; its presence marks the file as a demo warehouse
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import duckdb

MARKER = "ingestd_demo_days"

SCHEMA = f"""
CREATE TABLE events_raw (
    ts TIMESTAMP, user_id VARCHAR, device_id VARCHAR, event VARCHAR, value VARCHAR,
    country VARCHAR, platform VARCHAR, props VARCHAR);
CREATE TABLE metrics_daily (
    ds DATE, user_id VARCHAR, metric VARCHAR, value DOUBLE, num DOUBLE, den DOUBLE);
CREATE TABLE {MARKER} (day DATE PRIMARY KEY, events BIGINT, metrics BIGINT, landed_at TIMESTAMPTZ);
"""

# kind (0..9999, per row): < 1000 logged in without a device id, >= 8500 anonymous (device id
# only). With 1000 rows or more, exactly one row in 500 has no id at all and one in 1000 a
# broken props JSON: both are rejected, 0.3% in all, under the default max_reject_pct of 1%.
EVENTS = """
INSERT INTO events_raw
WITH r AS (
    SELECT i,
           CAST(hash($seed, i, 'kind') % 10000 AS BIGINT) AS kind,
           CAST(hash($seed, i, 'event') % 100 AS BIGINT) AS ev,
           CAST(hash($seed, i, 'value') % 1000000 AS BIGINT) AS hv,
           CAST(hash($seed, i, 'where') % 1000000 AS BIGINT) AS hw,
           CAST(hash($seed, i, 'session') % 1000000 AS BIGINT) AS hs,
           CAST(hash($seed, i, 'ts') % 1000000000 AS DOUBLE) / 1e9 AS rt,
           CAST(hash($seed, i, 'user') % 1000000 AS DOUBLE) / 1e6 AS ru
    FROM range($n) t(i)
), u AS (
    SELECT *, CAST(floor(ru * ru * $pool) AS BIGINT) AS user_no,
           $n >= 1000 AND i % 500 = $seed % 500 AS no_ids,
           $n >= 1000 AND i % 1000 = ($seed + 7) % 1000 AS bad_props
    FROM r
), e AS (
    SELECT *, CASE WHEN ev < 40 THEN 'page_view' WHEN ev < 62 THEN 'click' WHEN ev < 74 THEN 'search'
                   WHEN ev < 86 THEN 'add_to_cart' WHEN ev < 92 THEN 'purchase' WHEN ev < 96 THEN 'sign_up'
                   ELSE 'app_open' END AS event
    FROM u
)
SELECT
    CAST($day AS TIMESTAMP) + to_microseconds(CAST(rt * 86400000000 AS BIGINT)) AS ts,
    CASE WHEN no_ids OR kind >= 8500 THEN NULL ELSE 'user_' || user_no END AS user_id,
    CASE WHEN no_ids THEN NULL
         WHEN kind >= 8500 THEN 'dev_' || substr(md5('anon' || (hs % (2 * $pool))), 1, 12)
         WHEN kind < 1000 THEN NULL
         ELSE 'dev_' || substr(md5('dev' || user_no), 1, 12) END AS device_id,
    event,
    CASE event
        WHEN 'page_view' THEN ['/', '/products', '/products/42', '/cart', '/checkout', '/account'][1 + hv % 6]
        WHEN 'search' THEN ['shoes', 'jacket', 'socks', 'hat', 'bag', 'gloves'][1 + hv % 6]
        WHEN 'add_to_cart' THEN 'sku_' || (hv % 500)
        WHEN 'purchase' THEN printf('%.2f', 5 + (hv % 19500) / 100.0)
    END AS value,
    ['US', 'US', 'US', 'GB', 'DE', 'IN', 'BR', 'JP', 'FR', 'CA'][1 + hw % 10] AS country,
    ['ios', 'android', 'web'][1 + (hw // 10) % 3] AS platform,
    CASE WHEN bad_props THEN '{"session_id": "s-' || hs
         ELSE CAST(json_object(
            'session_id', 's-' || substr(md5('s' || $seed || '-' || hs), 1, 10),
            'app_version', ['3.1.0', '3.2.0', '3.2.1'][1 + (hw // 30) % 3],
            'experiment', 'checkout_v2',
            'variant', CASE WHEN user_no % 2 = 0 THEN 'control' ELSE 'test' END) AS VARCHAR)
    END AS props
FROM e
ORDER BY ts
"""

# One row per user and metric. With 250 users or more, one user a day comes without a user id
# (rejected: 0.4% or less).
METRICS = """
INSERT INTO metrics_daily
WITH users AS (
    SELECT j, (CAST($seed AS BIGINT) * 7919 + j) % $pool AS user_no,
           CAST(hash($seed, j, 'sessions') % 8 AS BIGINT) + 1 AS sessions,
           CAST(hash($seed, j, 'money') % 1000000 AS BIGINT) AS hm,
           CAST(hash($seed, j, 'funnel') % 1000 AS BIGINT) AS hf
    FROM range($users) t(j)
), m AS (
    SELECT * FROM users,
        (VALUES ('revenue'), ('sessions'), ('checkout_conversion'), ('minutes_per_session')) v(metric)
)
SELECT
    CAST($day AS DATE) AS ds,
    CASE WHEN $users >= 250 AND j = $seed % $users THEN NULL ELSE 'user_' || user_no END AS user_id,
    metric,
    CASE metric
        WHEN 'revenue' THEN CASE WHEN hm % 10 < 7 THEN 0.0 ELSE round((hm % 20000) / 100.0, 2) END
        WHEN 'sessions' THEN CAST(sessions AS DOUBLE)
    END AS value,
    CASE metric
        WHEN 'checkout_conversion' THEN CAST(hf % 4 AS DOUBLE)
        WHEN 'minutes_per_session' THEN CAST(sessions * (1 + hm % 25) AS DOUBLE)
    END AS num,
    CASE metric
        WHEN 'checkout_conversion' THEN CAST(hf % 4 + 1 + (hf // 4) % 6 AS DOUBLE)
        WHEN 'minutes_per_session' THEN CAST(sessions AS DOUBLE)
    END AS den
FROM m
ORDER BY user_no, metric
"""


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def event_rows(day: dt.date, rows_per_day: int) -> int:
    """Event rows of a demo day: about `rows_per_day`, fewer at weekends, a little noise."""
    noise = int.from_bytes(hashlib.sha256(day.isoformat().encode()).digest()[:4], "big") / 2**32
    weekend = 0.8 if day.weekday() >= 5 else 1.0
    return max(1, round(rows_per_day * weekend * (0.9 + 0.2 * noise)))


def land_day(con: duckdb.DuckDBPyConnection, day: dt.date, rows_per_day: int) -> tuple[int, int]:
    """Insert one demo day's events and metrics (the caller owns the transaction)."""
    seed = day.toordinal()
    pool = max(1, rows_per_day // 5)
    n = event_rows(day, rows_per_day)
    users = max(1, rows_per_day // 20)
    con.execute(EVENTS, {"seed": seed, "n": n, "pool": pool, "day": day})
    con.execute(METRICS, {"seed": seed, "users": users, "pool": pool, "day": day})
    metrics = users * 4
    con.execute(f"INSERT INTO {MARKER} VALUES (?, ?, ?, now())", [day, n, metrics])
    return n, metrics


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()
    return {r[0] for r in rows}


def ensure_demo_warehouse(path: str | Path, *, today: dt.date | None = None, days: int = 21,
                          rows_per_day: int = 5000) -> list[dt.date]:
    """Create the demo warehouse at `path` if it is missing (with `days` days of history ending
    yesterday), then land every completed day since the first one that was never landed.
    Returns the days landed by this call. A file that exists without the demo marker table
    but with other tables is not a demo warehouse and is left untouched.

    Each day is its own transaction (creation is one), so a crash leaves whole days only.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    today = today or utc_today()
    landed: list[dt.date] = []
    with duckdb.connect(str(path)) as con:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("SET enable_progress_bar = false")
        tables = _tables(con)
        if MARKER not in tables:
            if tables:
                return []
            con.execute("BEGIN TRANSACTION")
            con.execute(SCHEMA)
            for back in range(days, 0, -1):
                day = today - dt.timedelta(days=back)
                land_day(con, day, rows_per_day)
                landed.append(day)
            con.execute("COMMIT")
            return landed
        first = con.execute(f"SELECT min(day) FROM {MARKER}").fetchone()[0]
        if first is None:
            return []
        done = {r[0] for r in con.execute(f"SELECT day FROM {MARKER}").fetchall()}
        day = first
        while day < today:
            if day not in done:
                con.execute("BEGIN TRANSACTION")
                land_day(con, day, rows_per_day)
                con.execute("COMMIT")
                landed.append(day)
            day += dt.timedelta(days=1)
    return landed
