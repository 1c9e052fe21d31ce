"""The kernel end to end on real DuckDB files: scheduled loads, late days, re-checks,
checksum mode, time zones, metering, through the `ingestd` CLI as a user runs it."""

import datetime as dt
import json

import duckdb

from tests.support import ingestd, sink_rows, state_query, write_config

D = dt.date(2026, 11, 20)


def at(day: dt.date, hh: int, mm: int = 5) -> str:
    return dt.datetime(day.year, day.month, day.day, hh, mm, tzinfo=dt.UTC).isoformat()


def partition(tmp_path, day, source="orders"):
    rows = state_query(tmp_path / "state.db",
                       "SELECT status, generation, rows FROM partitions WHERE source = ? AND day = ?",
                       (source, day.isoformat()))
    return rows[0] if rows else None


def test_late_day_is_empty_at_the_first_window_and_loaded_at_the_next(tmp_path, warehouse):
    cfg = write_config(tmp_path, schedule='["0 * * * *"]', lookback=1)
    out = ingestd("run", "--once", "--now", at(D + dt.timedelta(days=1), 6), config=cfg, check=True)
    assert partition(tmp_path, D)[0] == "empty", out.stdout
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 0
    warehouse.add_events(D, 500)
    ingestd("run", "--once", "--now", at(D + dt.timedelta(days=1), 7), config=cfg, check=True)
    assert partition(tmp_path, D) == ("succeeded", 1, 500)
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 500
    runs = state_query(tmp_path / "state.db", "SELECT trigger, status FROM runs WHERE day = ? ORDER BY started_at",
                       (D.isoformat(),))
    assert runs == [("scheduled", "empty"), ("scheduled", "succeeded")]


def test_missed_days_are_caught_up_oldest_first(tmp_path, warehouse):
    for i in range(4):
        warehouse.add_events(D - dt.timedelta(days=i), 100 + i)
    cfg = write_config(tmp_path, lookback=4)
    ingestd("run", "--once", "--now", at(D + dt.timedelta(days=1), 6), config=cfg, check=True)
    runs = state_query(tmp_path / "state.db", "SELECT day, status FROM runs ORDER BY started_at")
    assert runs == [((D - dt.timedelta(days=i)).isoformat(), "succeeded") for i in (3, 2, 1, 0)]
    for i in range(4):
        assert sink_rows(tmp_path / "analytics.duckdb", "orders", D - dt.timedelta(days=i)) == 100 + i


def test_recheck_reloads_a_day_grown_2pct_and_not_one_grown_half_a_pct(tmp_path, warehouse):
    warehouse.add_events(D, 1000)
    cfg = write_config(tmp_path, lookback=1, threshold=1.0)
    nxt = D + dt.timedelta(days=1)
    ingestd("run", "--once", "--now", at(nxt, 6), config=cfg, check=True)
    assert partition(tmp_path, D) == ("succeeded", 1, 1000)

    warehouse.add_events(D, 20, start_id=5000)  # +2.0%
    ingestd("run", "--once", "--now", at(nxt, 18), config=cfg, check=True)
    assert partition(tmp_path, D) == ("succeeded", 2, 1020)
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 1020

    warehouse.add_events(D, 5, start_id=6000)  # +0.49%
    ingestd("run", "--once", "--now", at(nxt + dt.timedelta(days=1), 18, 10), config=cfg, check=True)
    assert partition(tmp_path, D)[1] == 2
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 1020
    checks = state_query(tmp_path / "state.db", "SELECT trigger, status FROM runs WHERE day = ? ORDER BY started_at",
                         (D.isoformat(),))
    assert checks == [("scheduled", "succeeded"), ("recheck", "succeeded")]


def _changed_value_recheck(tmp_path, warehouse, detect):
    warehouse.add_events(D, 300)
    cfg = write_config(tmp_path, lookback=1, detect=detect)
    nxt = D + dt.timedelta(days=1)
    ingestd("run", "--once", "--now", at(nxt, 6), config=cfg, check=True)
    warehouse.execute("UPDATE events_raw SET value = 'changed' WHERE user_id = 'u7'")
    ingestd("run", "--once", "--now", at(nxt, 18), config=cfg, check=True)
    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        value = con.execute("SELECT event_value FROM events WHERE unit_id = 'u7'").fetchone()[0]
    return partition(tmp_path, D), value


def test_checksum_mode_reloads_a_changed_value_at_equal_count(tmp_path, warehouse):
    part, value = _changed_value_recheck(tmp_path, warehouse, "checksum")
    assert part == ("succeeded", 2, 300)
    assert value == "changed"


def test_count_mode_does_not_see_a_changed_value_at_equal_count(tmp_path, warehouse):
    part, value = _changed_value_recheck(tmp_path, warehouse, "count")
    assert part == ("succeeded", 1, 300)
    assert value == "7"


def test_day_boundaries_follow_the_source_time_zone_on_the_fall_back_day(tmp_path, warehouse):
    """2026-11-01 in Los Angeles has 25 hours: 07:00 UTC Nov 1 to 08:00 UTC Nov 2."""
    day = dt.date(2026, 11, 1)
    warehouse.execute("INSERT INTO events_raw VALUES "
                      "('2026-11-01 06:59:59', 'before', 'e', '1', NULL),"   # Oct 31, 23:59:59 PDT
                      "('2026-11-01 07:00:00', 'first', 'e', '1', NULL),"    # Nov 1, 00:00 PDT
                      "('2026-11-02 07:30:00', 'last', 'e', '1', NULL),"     # Nov 1, 23:30 PST
                      "('2026-11-02 08:00:00', 'after', 'e', '1', NULL)")    # Nov 2, 00:00 PST
    cfg = write_config(tmp_path, timezone="America/Los_Angeles", schedule='["30 1 * * *"]', lookback=1)
    ingestd("run", "--once", "--now", "2026-11-02T10:00:00+00:00", config=cfg, check=True)
    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        units = sorted(r[0] for r in con.execute("SELECT unit_id FROM events WHERE day = ?", [day]).fetchall())
    assert units == ["first", "last"]


def test_rejected_rows_are_counted_sampled_and_fail_the_load_only_past_the_limit(tmp_path, warehouse):
    warehouse.add_events(D, 995)
    warehouse.execute("INSERT INTO events_raw SELECT ts, NULL, event, value, props FROM events_raw LIMIT 5")
    cfg = write_config(tmp_path, max_reject_pct=1.0)
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg)
    assert out.returncode == 0, out.stderr
    run = state_query(tmp_path / "state.db",
                      "SELECT run_id, rows_fetched, rows_written, rows_rejected, rejects FROM runs")[0]
    assert run[1:4] == (1000, 995, 5)
    assert json.loads(run[4]) == {"missing_unit_id": 5}
    samples = state_query(tmp_path / "state.db", "SELECT reason, row FROM rejects WHERE run_id = ?", (run[0],))
    assert len(samples) == 5 and samples[0][0] == "missing_unit_id" and json.loads(samples[0][1])["user_id"] is None

    cfg = write_config(tmp_path, max_reject_pct=0.4)
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg)
    assert out.returncode == 1
    assert "5 of 1000 rows rejected" in out.stdout and "max_reject_pct" in out.stdout
    assert partition(tmp_path, D)[:2] == ("failed", 1)
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 995


def test_usage_meters_reloads_and_backfills_again(tmp_path, warehouse):
    warehouse.add_events(D, 100)
    warehouse.add_events(D - dt.timedelta(days=1), 50)
    cfg = write_config(tmp_path, lookback=1)
    ingestd("run", "--once", "--now", at(D + dt.timedelta(days=1), 6), config=cfg, check=True)
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, check=True)
    ingestd("backfill", "orders", "--from", (D - dt.timedelta(days=1)).isoformat(), "--to", D.isoformat(),
            config=cfg, check=True)
    out = ingestd("usage", "--json", config=cfg, check=True)
    usage = {(r["day"], r["trigger"]): r["rows"] for r in json.loads(out.stdout)}
    assert usage == {(D.isoformat(), "scheduled"): 100, (D.isoformat(), "manual"): 100,
                     (D.isoformat(), "backfill"): 100, ((D - dt.timedelta(days=1)).isoformat(), "backfill"): 50}
    assert partition(tmp_path, D) == ("succeeded", 3, 100)
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 100


def test_status_shows_days_and_next_windows(tmp_path, warehouse):
    warehouse.add_events(D, 10)
    cfg = write_config(tmp_path, lookback=1)
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, check=True)
    out = ingestd("status", "orders", "--json", "--days", "100000", config=cfg, check=True)
    report = json.loads(out.stdout)["sources"][0]
    assert report["days"][0]["day"] == D.isoformat()
    first = report["days"][0]
    assert (first["status"], first["rows"], first["generation"]) == ("succeeded", 10, 1)
    assert report["next_load"] and report["next_recheck"]
    text = ingestd("status", config=cfg, check=True).stdout
    assert "next load window" in text and D.isoformat() in text


def test_a_second_writer_is_refused_with_the_holder(tmp_path, warehouse):
    import fcntl
    import os
    cfg = write_config(tmp_path)
    lock = tmp_path / "state.db.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg)
    finally:
        os.close(fd)
    assert out.returncode == 1
    assert "in use by another ingestd process (pid 4242)" in out.stderr


def test_a_window_in_the_spring_forward_gap_runs_that_day_shifted_by_the_gap(tmp_path, warehouse):
    """02:30 does not exist in Los Angeles on 2026-03-08; the window runs at 03:30 PDT (10:30 UTC)."""
    for day in (dt.date(2026, 3, 6), dt.date(2026, 3, 7)):
        warehouse.add_events(day, 30)
    cfg = write_config(tmp_path, timezone="America/Los_Angeles", schedule='["30 2 * * *"]', lookback=1)
    ingestd("run", "--once", "--now", "2026-03-08T10:29:00Z", config=cfg, check=True)
    assert partition(tmp_path, dt.date(2026, 3, 6))[:2] == ("succeeded", 1)
    assert partition(tmp_path, dt.date(2026, 3, 7)) is None
    ingestd("run", "--once", "--now", "2026-03-08T10:30:00Z", config=cfg, check=True)
    assert partition(tmp_path, dt.date(2026, 3, 7))[:2] == ("succeeded", 1)


def test_a_daily_window_on_the_fall_back_day_runs_once(tmp_path, warehouse):
    """01:30 happens twice in Los Angeles on 2026-11-01; the window runs at the first (08:30 UTC)."""
    warehouse.add_events(dt.date(2026, 10, 31), 30)
    cfg = write_config(tmp_path, timezone="America/Los_Angeles", schedule='["30 1 * * *"]', recheck="[]", lookback=1)
    ingestd("run", "--once", "--now", "2026-11-01T08:30:00Z", config=cfg, check=True)
    ingestd("run", "--once", "--now", "2026-11-01T09:31:00Z", config=cfg, check=True)  # the second 01:30
    runs = state_query(tmp_path / "state.db", "SELECT day, status FROM runs")
    assert runs == [("2026-10-31", "succeeded")]
