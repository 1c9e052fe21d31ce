"""The installed plugin through the real daemon: `ingestd run --once --now ...` loads Parquet
events and JSON Lines metrics from day folders into a sink, then a re-check window reloads the
days whose files changed and leaves the others alone. The harness reads the sink back through
the Sink contract, so these tests hold for any sink; they use ingestd's DuckDB sink, which every
ingestd installation has."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pytest
from lake import read_rows, write_rows

D = dt.date(2026, 11, 20)
DAYS = [D - dt.timedelta(days=2), D - dt.timedelta(days=1), D]

EVENTS = pa.schema([("ts", pa.timestamp("us")), ("user_id", pa.string()), ("event", pa.string()),
                    ("value", pa.string()), ("props", pa.string())])

CONFIG = """
[connections.events_lake]
type = "files"
root = "lake/events"                       # dt=YYYY-MM-DD/*.parquet, the default pattern

[connections.metrics_lake]
type = "files"
root = "lake/metrics"
pattern = "{root}/{day:%Y/%m/%d}/*.jsonl"
fingerprint = "content"

[sources.app_events]
connection = "events_lake"
kind = "events"
query = "SELECT * FROM day_files"          # no placeholder: ingestd filters on mapping.timestamp
schedule = ["0 6 * * *"]
lag_days = 1

[sources.app_events.recheck]
schedule = ["0 18 * * *"]
lookback_days = 3
detect = "checksum"

[sources.app_events.mapping]
timestamp = "ts"
event_name = "event"
event_value = "value"
ids = { user_id = "user_id" }
metadata_json = "props"

[sources.daily_metrics]
connection = "metrics_lake"
kind = "metrics"
query = "SELECT CAST(ds AS DATE) AS ds, user_id, metric, value FROM day_files WHERE CAST(ds AS DATE) = {day}"
schedule = ["0 6 * * *"]
lag_days = 1

[sources.daily_metrics.recheck]
schedule = ["0 18 * * *"]
lookback_days = 3
detect = "checksum"

[sources.daily_metrics.mapping]
date = "ds"
ids = { user_id = "user_id" }
metric_name = "metric"
metric_value = "value"
"""


@pytest.fixture
def ingestd_sink():
    """The body of the harness's [sinks.main]: where the daemon loads to."""
    return 'type = "duckdb"\npath = "analytics.duckdb"'


def row_of(h, source: str, day: dt.date, unit_id: str, kind: str = "events") -> dict:
    """The one row of `unit_id` that the sink holds for a source and day."""
    found = [r for r in h.scan(source, day, kind).to_pylist() if r["unit_id"] == unit_id]
    assert len(found) == 1, f"{source} {day}: {len(found)} rows of {unit_id}"
    return found[0]


def events(day: dt.date, n: int, start: int = 0) -> list[dict]:
    base = dt.datetime(day.year, day.month, day.day)
    return [{"ts": base + dt.timedelta(seconds=37 * i), "user_id": f"u{start + i}", "event": "purchase",
             "value": str(i), "props": json.dumps({"country": "NL", "i": i})} for i in range(n)]


def metrics(day: dt.date, n: int) -> list[dict]:
    return [{"ds": day.isoformat(), "user_id": f"u{i}", "metric": "revenue", "value": float(i)} for i in range(n)]


def counts(h, source: str, kind: str) -> list[tuple[int, int | None]]:
    return [(h.rows(source, day, kind), h.generation(source, day, kind)) for day in DAYS]


def test_the_daemon_loads_and_reloads_day_folders(ingestd_daemon):
    h = ingestd_daemon
    lake = h.folder / "lake"
    for i, day in enumerate(DAYS):
        write_rows(lake / "events" / f"dt={day}" / "part-0.parquet", events(day, 100 + i), "parquet", EVENTS)
        write_rows(lake / "events" / f"dt={day}" / "part-1.parquet", events(day, 50, start=1000), "parquet", EVENTS)
        write_rows(lake / "metrics" / f"{day:%Y/%m/%d}" / "m.jsonl", metrics(day, 20 + i), "jsonl")
    h.write_config(CONFIG)

    info = h.plugin("files")
    assert (info["name"], info["distribution"], info["api"], info["connectors"], info["error"]) == \
        ("files", "ingestd-files", [2, 2], ["files"], None)
    checked = h.run("check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ok     app_events" in checked.stdout and "ok     daily_metrics" in checked.stdout

    first = h.run("run", "--once", "--now", "2026-11-21T06:30:00Z")
    assert first.returncode == 0, first.stdout + first.stderr
    assert counts(h, "app_events", "events") == [(150, 1), (151, 1), (152, 1)]
    assert counts(h, "daily_metrics", "metrics") == [(20, 1), (21, 1), (22, 1)]
    u7 = row_of(h, "app_events", D, "u7")
    assert json.loads(u7["metadata"]) == {"country": "NL", "i": 7} and u7["event_value"] == "7"

    # late data on D; a file of D-1 replaced with one changed value (same row count); a metric of
    # D-1 rewritten in place (same count, same size): the re-check reloads exactly those days
    write_rows(lake / "events" / f"dt={D}" / "part-2.parquet", events(D, 25, start=5000), "parquet", EVENTS)
    day1 = lake / "events" / f"dt={DAYS[1]}" / "part-0.parquet"
    changed = read_rows(day1, "parquet")
    changed[3]["value"] = "changed"
    write_rows(day1, changed, "parquet", EVENTS)
    m1 = lake / "metrics" / f"{DAYS[1]:%Y/%m/%d}" / "m.jsonl"
    m1.write_text(m1.read_text().replace('"value": 5.0', '"value": 9.0'))

    second = h.run("run", "--once", "--now", "2026-11-21T18:30:00Z")
    assert second.returncode == 0, second.stdout + second.stderr
    assert counts(h, "app_events", "events") == [(150, 1), (151, 2), (177, 2)]
    assert counts(h, "daily_metrics", "metrics") == [(20, 1), (21, 2), (22, 1)]
    assert row_of(h, "app_events", DAYS[1], "u3")["event_value"] == "changed"
    assert row_of(h, "daily_metrics", DAYS[1], "u5", "metrics")["metric_value"] == 9.0


def test_a_missing_root_fails_the_load_and_says_why(ingestd_daemon):
    h = ingestd_daemon
    h.write_config(CONFIG)
    out = h.run("load", "app_events", "--day", D.isoformat())
    assert out.returncode == 1
    assert "app_events 2026-11-20: failed" in out.stdout and "lake/events does not exist" in out.stdout
    checked = h.run("check")
    assert checked.returncode == 1 and "FAILED app_events" in checked.stdout


def test_disabling_the_plugin_makes_its_type_a_config_error(ingestd_daemon):
    h = ingestd_daemon
    h.write_config(CONFIG)
    env = {"INGESTD_DISABLE_PLUGINS": "files"}
    assert h.plugin("files", env=env)["error"] == "disabled by INGESTD_DISABLE_PLUGINS"
    out = h.run("check", env=env)
    assert out.returncode == 2
    assert "connections.events_lake.type: unknown connector type 'files'" in out.stderr
