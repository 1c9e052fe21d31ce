"""The sink mirrors the warehouse (issue 14), end to end through the `ingestd` CLI on DuckDB
warehouse files the tests write: ready signals that mean what they say, deleted days emptied or
held, re-checks on by default, metering of first loads and reloads, a truthful status, epoch and
DATE timestamps, blank ids, and `backfill --missing`. Each test asserts the sink's rows, the
state store and the events (JSON log lines)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import duckdb
import pytest

from tests.support import (
    cli_env,
    ingestd,
    plugin_dist,
    sink_rows,
    spawn_ingestd,
    state_query,
    wait_for,
    write_config,
)

D = dt.date(2026, 11, 20)
NEXT = D + dt.timedelta(days=1)


ORDERS_QUERY = 'query = "SELECT ts, user_id, event, value, props FROM events_raw WHERE ts >= {start} AND ts < {end}"'


def at(day: dt.date, hh: int, mm: int = 5) -> str:
    return dt.datetime(day.year, day.month, day.day, hh, mm, tzinfo=dt.UTC).isoformat()


def events_of(out: subprocess.CompletedProcess, kind: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in (out.stdout + out.stderr).splitlines() if line.startswith("{")]
    return [e for e in lines if kind is None or e.get("event") == kind]


def partition(tmp_path: Path, day: dt.date = D, source: str = "orders") -> dict | None:
    rows = state_query(tmp_path / "state.db", "SELECT status, generation, rows, held_rows, ready_at FROM partitions "
                                              "WHERE source = ? AND day = ?", (source, day.isoformat()))
    return dict(zip(("status", "generation", "rows", "held_rows", "ready_at"), rows[0], strict=True)) if rows else None


def day_status(cfg: Path, day: dt.date = D, env: dict | None = None) -> dict:
    out = ingestd("status", "orders", "--json", "--days", "100000", config=cfg, env=env, check=True)
    report = json.loads(out.stdout)
    return next(d for d in report["sources"][0]["days"] if d["day"] == day.isoformat())


# -- ready_query: its first value decides -----------------------------------------------------

@pytest.mark.parametrize("ready_query, fill, loads", [
    ("SELECT count(*) > 0 FROM markers WHERE day = {day}", None, False),          # false
    ("SELECT count(*) FROM markers WHERE day = {day}", None, False),              # 0
    ("SELECT max(n) FROM markers WHERE day = {day}", None, False),                # NULL
    ("SELECT n FROM markers WHERE day = {day}", None, False),                     # no row
    ("SELECT n FROM markers WHERE day = {day}", 0, False),                        # a row holding 0
    ("SELECT count(*) > 0 FROM markers WHERE day = {day}", 1, True),              # true
    ("SELECT n FROM markers WHERE day = {day}", 3, True),                         # a number > 0
    ("SELECT 'yes' FROM markers WHERE day = {day}", 1, True),                     # boolean text
])
def test_ready_query_first_value_decides(tmp_path, warehouse, ready_query, fill, loads):
    warehouse.add_events(D, 100)
    warehouse.execute("CREATE TABLE markers (day DATE, n INTEGER)")
    if fill is not None:
        warehouse.execute("INSERT INTO markers VALUES (?, ?)", [D, fill])
    cfg = write_config(tmp_path, lookback=1)
    text = cfg.read_text().replace("max_reject_pct = 1.0", f'max_reject_pct = 1.0\nready_query = "{ready_query}"')
    cfg.write_text(text)
    out = ingestd("run", "--once", "--now", at(NEXT, 6), config=cfg, check=True)
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == (100 if loads else 0)
    if loads:
        assert partition(tmp_path)["status"] == "succeeded"
        assert [e["rows"] for e in events_of(out, "load.succeeded")] == [100]
    else:
        assert partition(tmp_path)["status"] == "empty"
        empty = events_of(out, "load.empty")
        assert empty and empty[0]["reason"] == "ready_query says the day is not ready"
        assert empty[0]["source_rows"] == 100
        assert not events_of(out, "load.succeeded")


def test_a_ready_query_answering_text_that_is_no_boolean_fails_the_load_saying_why(tmp_path, warehouse):
    warehouse.add_events(D, 10)
    cfg = write_config(tmp_path, lookback=1)
    cfg.write_text(cfg.read_text().replace("max_reject_pct = 1.0", 'max_reject_pct = 1.0\n'
                                           'ready_query = "SELECT \'maybe\' WHERE {day} IS NOT NULL"'))
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg)
    assert out.returncode == 1
    assert "ready_query's first value is 'maybe' (str): it must be a boolean, a number" in out.stdout
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 0


def test_a_ready_signal_loads_despite_the_ready_query_and_windows_leave_the_day_alone(tmp_path, warehouse):
    warehouse.add_events(D, 100)
    warehouse.execute("CREATE TABLE markers (day DATE)")
    cfg = write_config(tmp_path, lookback=2, schedule='["0 * * * *"]', recheck="[]")
    cfg.write_text(cfg.read_text().replace("max_reject_pct = 1.0", 'max_reject_pct = 1.0\n'
                                           'ready_query = "SELECT count(*) > 0 FROM markers WHERE day = {day}"'))
    ingestd("run", "--once", "--now", at(NEXT, 6), config=cfg, check=True)
    assert partition(tmp_path)["status"] == "empty"
    out = ingestd("ready", "orders", "--day", D.isoformat(), config=cfg)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "marked ready; succeeded: generation 1, 100 rows" in out.stdout
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 100
    assert partition(tmp_path)["ready_at"]
    assert [e["trigger"] for e in events_of(out, "load.succeeded")] == ["ready"]
    # an empty ready day is not retried by load windows either (the user said it is complete)
    empty_day = D - dt.timedelta(days=1)
    ingestd("ready", "orders", "--day", empty_day.isoformat(), config=cfg, check=True)
    assert partition(tmp_path, empty_day)["status"] == "empty" and partition(tmp_path, empty_day)["ready_at"]
    out = ingestd("run", "--once", "--now", at(NEXT, 7), config=cfg, check=True)
    assert not events_of(out, "load.started") and not events_of(out, "load.empty")
    runs = state_query(tmp_path / "state.db", "SELECT trigger, status FROM runs WHERE day = ? ORDER BY started_at",
                       (D.isoformat(),))
    assert runs == [("scheduled", "empty"), ("ready", "succeeded")]


def test_a_ready_signal_for_a_future_or_too_old_day_is_refused(tmp_path, warehouse):
    cfg = write_config(tmp_path, extra_daemon="max_backfill_days = 30")
    today = dt.datetime.now(dt.UTC).date()
    for day, words in ((today + dt.timedelta(days=2), "is in the future"),
                       (today - dt.timedelta(days=40), "older than max_backfill_days (30")):
        out = ingestd("ready", "orders", "--day", day.isoformat(), config=cfg)
        assert out.returncode == 2 and words in out.stderr, out.stderr
    assert not state_query(tmp_path / "state.db", "SELECT 1 FROM runs")


# -- deleted days, with and without the hold ------------------------------------------------

def test_a_day_deleted_in_the_warehouse_is_emptied_at_the_next_recheck(tmp_path, warehouse):
    warehouse.add_events(D, 500)
    cfg = write_config(tmp_path, lookback=1)
    ingestd("run", "--once", "--now", at(NEXT, 6), config=cfg, check=True)
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 500
    warehouse.execute("DELETE FROM events_raw")
    out = ingestd("run", "--once", "--now", at(NEXT, 18), config=cfg, check=True)
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 0
    assert partition(tmp_path) | {"ready_at": None} == {"status": "emptied", "generation": 2, "rows": 0,
                                                          "held_rows": None, "ready_at": None}
    done = events_of(out, "load.succeeded")
    assert [(e["rows"], e["previous_rows"], e["generation"]) for e in done] == [(0, 500, 2)]
    assert day_status(cfg)["state"] == "emptied"


def test_a_large_drop_is_held_until_the_user_confirms_it(tmp_path, warehouse):
    warehouse.add_events(D, 1000)
    cfg = write_config(tmp_path, lookback=2)
    cfg.write_text(cfg.read_text().replace("max_reject_pct = 1.0", "max_reject_pct = 1.0\nhold_drop_pct = 50"))
    ingestd("run", "--once", "--now", at(NEXT, 6), config=cfg, check=True)
    warehouse.execute("DELETE FROM events_raw")
    out = ingestd("run", "--once", "--now", at(NEXT, 18), config=cfg, check=True)
    held = events_of(out, "check.held")
    assert [(e["loaded_rows"], e["rows"], e["drop_pct"]) for e in held] == [(1000, 0, 100.0)]
    assert held[0]["confirm"] == f"ingestd load orders --day {D}"
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 1000, "nothing replaced while held"
    assert partition(tmp_path)["status"] == "held" and partition(tmp_path)["generation"] == 1
    status = day_status(cfg)
    assert status["state"] == "held" and status["held"] == {"loaded_rows": 1000, "rows": 0}
    assert "serving gen 1, 1,000 rows" in status["summary"] and "confirm with `ingestd load" in status["summary"]
    again = ingestd("run", "--once", "--now", at(NEXT + dt.timedelta(days=1), 18), config=cfg, check=True)
    assert not events_of(again, "check.held") and not events_of(again, "check.changed"), \
        "a hold is announced once per new count"
    assert partition(tmp_path)["status"] == "held"

    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, check=True)
    assert "emptied: generation 2, 0 rows" in out.stdout
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 0
    assert partition(tmp_path)["status"] == "emptied"


def test_a_held_day_whose_rows_came_back_is_released(tmp_path, warehouse):
    warehouse.add_events(D, 1000)
    cfg = write_config(tmp_path, lookback=2)
    cfg.write_text(cfg.read_text().replace("max_reject_pct = 1.0", "max_reject_pct = 1.0\nhold_drop_pct = 10"))
    ingestd("run", "--once", "--now", at(NEXT, 6), config=cfg, check=True)
    warehouse.execute("CREATE TABLE backup AS SELECT * FROM events_raw")
    warehouse.execute("DELETE FROM events_raw WHERE CAST(value AS INTEGER) >= 500")  # an upstream outage
    ingestd("run", "--once", "--now", at(NEXT, 18), config=cfg, check=True)
    assert partition(tmp_path)["status"] == "held" and partition(tmp_path)["held_rows"] == 500
    warehouse.execute("DELETE FROM events_raw")
    warehouse.execute("INSERT INTO events_raw SELECT * FROM backup")
    out = ingestd("run", "--once", "--now", at(NEXT + dt.timedelta(days=1), 18), config=cfg, check=True)
    assert [e["day"] for e in events_of(out, "check.unchanged")] == [D.isoformat()]
    assert not events_of(out, "load.started")
    assert partition(tmp_path) | {"ready_at": None} == {"status": "succeeded", "generation": 1, "rows": 1000,
                                                          "held_rows": None, "ready_at": None}


# -- re-checks on by default ----------------------------------------------------------------

def default_recheck_config(tmp_path: Path) -> Path:
    cfg = write_config(tmp_path, lookback=1)
    text = cfg.read_text()
    start = text.index("[sources.orders.recheck]")
    end = text.index("[sources.orders.mapping]")
    cfg.write_text(text[:start] + text[end:])
    assert "recheck" not in cfg.read_text()
    return cfg


def test_rechecks_are_on_by_default_and_reload_past_one_percent(tmp_path, warehouse):
    warehouse.add_events(D, 1000)
    cfg = default_recheck_config(tmp_path)
    ingestd("run", "--once", "--now", at(NEXT, 6), config=cfg, check=True)
    assert partition(tmp_path)["generation"] == 1
    warehouse.add_events(D, 9, start_id=5000)  # +0.9%: not reloaded
    out = ingestd("run", "--once", "--now", at(NEXT, 12), config=cfg, check=True)
    assert events_of(out, "check.unchanged") and partition(tmp_path)["generation"] == 1
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 1000
    warehouse.add_events(D, 2, start_id=6000)  # 1011: +1.1% of the loaded 1000
    out = ingestd("run", "--once", "--now", at(NEXT, 18), config=cfg, check=True)
    assert [e["rows"] for e in events_of(out, "check.changed")] == [1011]
    assert partition(tmp_path)["generation"] == 2 and sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 1011
    shown = json.loads(ingestd("status", "orders", "--json", config=cfg, check=True).stdout)
    assert shown["sources"][0]["next_recheck"] is not None


def test_an_empty_recheck_schedule_turns_rechecks_off(tmp_path, warehouse):
    warehouse.add_events(D, 1000)
    cfg = write_config(tmp_path, lookback=1, recheck="[]")
    ingestd("run", "--once", "--now", at(NEXT, 6), config=cfg, check=True)
    warehouse.add_events(D, 100, start_id=5000)
    out = ingestd("run", "--once", "--now", at(NEXT, 18), config=cfg, check=True)
    assert not events_of(out, "check.changed") and not events_of(out, "check.unchanged")
    assert partition(tmp_path)["generation"] == 1


# -- metering -------------------------------------------------------------------------------

def test_usage_tells_first_loads_from_reloads_and_groups_by_the_month_loads_ran(tmp_path, warehouse):
    cfg = write_config(tmp_path, lookback=1, schedule='["0 6 * * *"]', recheck='["0 12 * * *"]')
    ingestd("run", "--once", "--now", at(NEXT, 6), config=cfg, check=True)  # not landed: empty
    warehouse.add_events(D, 100)
    ingestd("run", "--once", "--now", at(NEXT, 12), config=cfg, check=True)  # first load, at a re-check window
    ingestd("backfill", "orders", "--from", D.isoformat(), "--to", D.isoformat(), config=cfg, check=True)
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, check=True)
    rows = json.loads(ingestd("usage", "--json", config=cfg, check=True).stdout)
    assert [(r["trigger"], r["load"], r["rows"], r["loads"]) for r in rows] == [
        ("backfill", "reload", 100, 1), ("manual", "reload", 100, 1), ("recheck", "first", 100, 1)]
    month = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    by_month = json.loads(ingestd("usage", "--by", "month", "--json", config=cfg, check=True).stdout)
    assert {(r["month"], r["trigger"], r["load"]) for r in by_month} == {
        (month, "backfill", "reload"), (month, "manual", "reload"), (month, "recheck", "first")}
    assert sum(r["rows"] for r in by_month) == 300, "reloads and backfills count again"
    today = dt.datetime.now(dt.UTC).date()
    before = json.loads(ingestd("usage", "--ran-to", (today - dt.timedelta(days=1)).isoformat(), "--json",
                                config=cfg, check=True).stdout)
    assert before == []
    text = ingestd("usage", "--by", "month", config=cfg, check=True).stdout
    assert "first" in text and "reload" in text and month in text
    bad = ingestd("usage", "--from", "2026-11-20", "--to", "2026-11-01", config=cfg)
    assert bad.returncode == 2 and "is after" in bad.stderr


# -- status tells the truth -----------------------------------------------------------------

GATED = '''
"""Test connector: the DuckDB connector whose fetch, after its first batch, waits until the file
INGESTD_TEST_GATE exists, and fails when INGESTD_TEST_FAIL exists. Lets a test look at a load in
progress and make a reload fail."""
import asyncio, os
from pathlib import Path
from ingestd import PermanentError, hookimpl
from ingestd.plugins.duckdb.connector import DuckDBConnector

INGESTD_API = (2, 2)


class GatedDuck(DuckDBConnector):
    type_name = "gatedduck"

    async def fetch(self, query, batch_rows, source=None):
        first = True
        async for batch in super().fetch(query, batch_rows, source):
            if Path(os.environ["INGESTD_TEST_FAIL"]).exists():
                raise PermanentError("the warehouse refused the query (simulated)")
            yield batch
            while first and not Path(os.environ["INGESTD_TEST_GATE"]).exists():
                await asyncio.sleep(0.05)
            first = False


@hookimpl
def ingestd_register(registry):
    registry.add_connector(GatedDuck)
'''


def test_status_shows_a_load_in_progress_and_what_is_served_after_a_failed_reload(tmp_path, warehouse):
    warehouse.add_events(D, 5000)
    gate, fail = tmp_path / "gate", tmp_path / "fail"
    env = cli_env([plugin_dist(tmp_path / "extra", "gated_plugin", GATED)], INGESTD_TEST_GATE=str(gate),
                  INGESTD_TEST_FAIL=str(fail))
    cfg = write_config(tmp_path, lookback=1, connection_type="gatedduck")
    gate.write_text("open")
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env, check=True)
    gate.unlink()
    warehouse.add_events(D, 100, start_id=9000)
    proc = spawn_ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env)
    try:
        def loading():
            out = ingestd("status", "orders", "--json", "--days", "100000", config=cfg, env=env)
            report = json.loads(out.stdout)["sources"][0] if out.returncode == 0 else None
            return report if report and report["loading"] and report["loading"][0]["rows_so_far"] else None
        report = wait_for(loading, what="the reload to show as loading")
        day = next(d for d in report["days"] if d["day"] == D.isoformat())
        assert day["state"] == "loading"
        assert day["loading"]["generation"] == 2 and day["loading"]["rows_so_far"] >= 1000
        assert day["serving"]["generation"] == 1 and day["serving"]["rows"] == 5000
        assert day["summary"].startswith("loading gen 2 (") and "serving gen 1, 5,000 rows" in day["summary"]
        text = ingestd("status", "orders", config=cfg, env=env, check=True).stdout
        assert "loading gen 2" in text and "serving gen 1" in text
    finally:
        gate.write_text("open")
        proc.wait(60)
    served = day_status(cfg, env=env)
    assert served["serving"] == {"generation": 2, "rows": 5100, "loaded_at": served["loaded_at"]}

    fail.write_text("yes")
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env)
    assert out.returncode == 1
    day = day_status(cfg, env=env)
    assert day["state"] == "failed" and day["serving"]["generation"] == 2 and day["serving"]["rows"] == 5100
    assert "serving gen 2, 5,100 rows; last attempt failed: the warehouse refused the query" in day["summary"]
    assert day["last_run"]["status"] == "failed" and day["last_run"]["trigger"] == "manual"
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 5100


def test_a_reload_failing_its_reject_check_shows_failed_with_its_reason(tmp_path, warehouse):
    warehouse.add_events(D, 100)
    cfg = write_config(tmp_path, lookback=1)
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, check=True)
    warehouse.execute("UPDATE events_raw SET event = NULL WHERE CAST(value AS INTEGER) < 50")
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg)
    assert out.returncode == 1
    day = day_status(cfg)
    assert day["state"] == "failed" and day["serving"]["rows"] == 100
    assert "50 of 100 rows rejected" in day["summary"] and "missing_event_name" in day["summary"]


def test_last_loaded_day_does_not_depend_on_days_and_days_must_not_be_negative(tmp_path, warehouse):
    warehouse.add_events(D, 10)
    cfg = write_config(tmp_path, lookback=1)
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, check=True)
    report = json.loads(ingestd("status", "--json", "--days", "1", config=cfg, check=True).stdout)
    assert report["sources"][0]["last_loaded_day"] == D.isoformat() and report["sources"][0]["days"] == []
    assert f"last loaded day {D}" in ingestd("status", "--days", "0", config=cfg, check=True).stdout
    bad = ingestd("status", "--days", "-3", config=cfg)
    assert bad.returncode == 2 and "must not be negative" in bad.stderr


# -- timestamps and ids ----------------------------------------------------------------------

def epoch_warehouse(path: Path, unit: str) -> None:
    scale = {"s": 1, "ms": 1000, "us": 1_000_000}[unit]
    base = int(dt.datetime(2026, 11, 20, tzinfo=dt.UTC).timestamp())
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE ev (t BIGINT, user_id VARCHAR, event VARCHAR)")
        rows = [((base + i * 600) * scale, f"u{i}", "click") for i in range(144)]  # the day, every 10 minutes
        rows += [((base - 1) * scale, "before", "click"), ((base + 86_400) * scale, "after", "click")]
        con.executemany("INSERT INTO ev VALUES (?, ?, ?)", rows)


@pytest.mark.parametrize("unit", ["s", "ms", "us"])
@pytest.mark.parametrize("placeholders", [True, False])
def test_integer_epoch_timestamps_in_each_unit(tmp_path, unit, placeholders):
    epoch_warehouse(tmp_path / "warehouse.duckdb", unit)
    cfg = write_config(tmp_path, lookback=1)
    text = cfg.read_text()
    scale = {"s": 1, "ms": 1000, "us": 1_000_000}[unit]
    query = "SELECT t, user_id, event FROM ev" + (
        f" WHERE t >= epoch({{start}}::TIMESTAMPTZ) * {scale} AND t < epoch({{end}}::TIMESTAMPTZ) * {scale}"
        if placeholders else "")
    text = text.replace(ORDERS_QUERY, f'query = "{query}"')
    text = text.replace('timestamp = "ts"', f'timestamp = "t"\ntimestamp_unit = "{unit}"')
    text = text.replace('event_value = "value"\n', "").replace('metadata_json = "props"\n', "")
    cfg.write_text(text)
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "generation 1, 144 rows" in out.stdout
    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        first, last = con.execute("SELECT min(timestamp), max(timestamp) FROM events").fetchone()
    assert first == dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
    assert last == dt.datetime(2026, 11, 20, 23, 50, tzinfo=dt.UTC)


def test_an_epoch_in_the_wrong_unit_is_a_bad_timestamp_not_outside_the_day(tmp_path):
    epoch_warehouse(tmp_path / "warehouse.duckdb", "us")
    cfg = write_config(tmp_path, lookback=1, max_reject_pct=100)
    text = cfg.read_text().replace(
        ORDERS_QUERY,
        'query = "SELECT t, user_id, event FROM ev WHERE {day} IS NOT NULL"')
    text = text.replace('timestamp = "ts"', 'timestamp = "t"\ntimestamp_unit = "ms"')  # the column holds us
    cfg.write_text(text.replace('event_value = "value"\n', "").replace('metadata_json = "props"\n', ""))
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, check=True)
    rejects = state_query(tmp_path / "state.db", "SELECT reason, count(*) FROM rejects GROUP BY reason")
    assert rejects == [("bad_timestamp", 20)]  # 20 samples kept; every row counted below
    counts = json.loads(state_query(tmp_path / "state.db", "SELECT rejects FROM runs")[0][0])
    assert counts == {"bad_timestamp": 146}


def test_a_date_timestamp_is_the_start_of_that_local_day(tmp_path):
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as con:
        con.execute("CREATE TABLE ev AS SELECT DATE '2026-11-20' AS d, 'u' || i AS user_id, 'signup' AS event "
                    "FROM range(30) t(i)")
        con.execute("INSERT INTO ev SELECT DATE '2026-11-21', 'late', 'signup'")
    cfg = write_config(tmp_path, lookback=1, timezone="America/Los_Angeles")
    text = cfg.read_text().replace(
        ORDERS_QUERY,
        'query = "SELECT d, user_id, event FROM ev WHERE d = {day}"')
    text = text.replace('timestamp = "ts"', 'timestamp = "d"')
    cfg.write_text(text.replace('event_value = "value"\n', "").replace('metadata_json = "props"\n', ""))
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, check=True)
    assert "generation 1, 30 rows" in out.stdout
    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        stamps = {r[0] for r in con.execute("SELECT timestamp FROM events").fetchall()}
    assert stamps == {dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC)}  # midnight in Los Angeles (PST)


def test_an_empty_or_blank_id_counts_as_missing(tmp_path):
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as con:
        con.execute("CREATE TABLE ev (ts TIMESTAMP, user_id VARCHAR, device_id VARCHAR, event VARCHAR)")
        con.executemany("INSERT INTO ev VALUES (?, ?, ?, 'click')", [
            (dt.datetime(2026, 11, 20, 1), "", "dev-1"),      # empty user id: the device id wins
            (dt.datetime(2026, 11, 20, 2), "   ", "dev-2"),   # blank too
            (dt.datetime(2026, 11, 20, 3), "u3", "dev-3"),
            (dt.datetime(2026, 11, 20, 4), "", ""),           # no id at all: rejected
        ])
    cfg = write_config(tmp_path, lookback=1, max_reject_pct=50)
    text = cfg.read_text().replace(
        ORDERS_QUERY,
        'query = "SELECT ts, user_id, device_id, event FROM ev WHERE ts >= {start} AND ts < {end}"')
    text = text.replace('ids = { user_id = "user_id" }', 'ids = { user_id = "user_id", device_id = "device_id" }')
    cfg.write_text(text.replace('event_value = "value"\n', "").replace('metadata_json = "props"\n', ""))
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, check=True)
    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT unit_id, id_type, ids FROM events ORDER BY timestamp").fetchall()
    assert [(u, t, json.loads(i)) for u, t, i in rows] == [
        ("dev-1", "device_id", {"device_id": "dev-1"}),
        ("dev-2", "device_id", {"device_id": "dev-2"}),
        ("u3", "user_id", {"user_id": "u3", "device_id": "dev-3"})]
    assert state_query(tmp_path / "state.db", "SELECT reason FROM rejects") == [("missing_unit_id",)]


# -- backfill --missing ------------------------------------------------------------------------

def test_backfill_missing_loads_only_days_never_loaded_failed_or_emptied(tmp_path, warehouse):
    days = [D - dt.timedelta(days=i) for i in range(4)]  # loaded, emptied, failed, never loaded
    for day in days:
        warehouse.add_events(day, 50)
    cfg = write_config(tmp_path, lookback=1)
    ingestd("load", "orders", "--day", days[0].isoformat(), config=cfg, check=True)
    ingestd("load", "orders", "--day", days[1].isoformat(), config=cfg, check=True)
    warehouse.execute("DELETE FROM events_raw WHERE ts >= ? AND ts < ?", [days[1], days[0]])
    ingestd("load", "orders", "--day", days[1].isoformat(), config=cfg, check=True)  # emptied
    warehouse.execute("UPDATE events_raw SET event = NULL WHERE ts >= ? AND ts < ?", [days[2], days[1]])
    assert ingestd("load", "orders", "--day", days[2].isoformat(), config=cfg).returncode == 1  # failed
    warehouse.execute("UPDATE events_raw SET event = 'click'")
    warehouse.add_events(days[1], 7)
    out = ingestd("backfill", "orders", "--from", days[3].isoformat(), "--to", days[0].isoformat(), "--missing",
                  config=cfg, check=True)
    assert "1 source-days skipped as loaded already" in out.stdout
    loaded = state_query(tmp_path / "state.db", "SELECT day FROM runs WHERE trigger = 'backfill' ORDER BY day")
    assert loaded == [(days[3].isoformat(),), (days[2].isoformat(),), (days[1].isoformat(),)]
    assert [sink_rows(tmp_path / "analytics.duckdb", "orders", d) for d in days] == [50, 7, 50, 50]
    accepted = events_of(out, "backfill.accepted")
    assert accepted and accepted[0]["days"] == 3 and accepted[0]["skipped"] == 1
