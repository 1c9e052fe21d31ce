"""Fault suite: kills at random moments, a dropped warehouse connection, a full disk, and a
locked or corrupt state database. Seeded (INGESTD_FAULT_SEED), so a failure can be replayed.
The broker outage during a backfill is in test_bus.py (test_a_broker_outage_during_a_backfill_loses_no_event)."""

import datetime as dt
import os
import random
import signal
import subprocess
import time

import duckdb

from tests.support import (
    cli_env,
    fault_plugin,
    ingestd,
    sink_rows,
    slow_plugin,
    spawn_ingestd,
    state_query,
    write_config,
)

D = dt.date(2026, 11, 20)
SEED = int(os.environ.get("INGESTD_FAULT_SEED", "20261128"))


def test_kill_9_at_random_moments_never_loses_or_doubles_a_row(tmp_path, warehouse):
    rng = random.Random(SEED)
    days = [D - dt.timedelta(days=i) for i in range(5, -1, -1)]
    expected = {}
    for i, day in enumerate(days):
        warehouse.add_events(day, 3000 + 7 * i, start_id=i * 100_000)
        expected[day] = 3000 + 7 * i
    cfg = write_config(tmp_path, connection_type="slowduck", lookback=6, schedule='["0 * * * *"]',
                       sink='type = "duckdb"\npath = "analytics.duckdb"\nchunk_rows = 500',
                       extra_daemon="max_concurrent_loads = 2")
    env = cli_env([slow_plugin(tmp_path)], INGESTD_TEST_SLOW_S="0.05")
    now = (D + dt.timedelta(days=1)).isoformat() + "T06:05:00+00:00"
    commands = [("run", "--once", "--now", now),
                ("backfill", "orders", "--from", days[0].isoformat(), "--to", days[-1].isoformat()),
                ("load", "orders", "--day", days[2].isoformat())]
    kills = 0
    for i in range(30):
        args = rng.choice(commands)
        if i % 7 == 3:  # a day grows between kills, so reloads write different generations
            day = rng.choice(days)
            warehouse.add_events(day, 11, start_id=900_000 + i * 100)
            expected[day] += 11
        proc = spawn_ingestd(*args, config=cfg, env=env)
        time.sleep(rng.uniform(0.05, 1.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 15, f"seed {SEED}: only {kills} kills landed during work"
    env["INGESTD_TEST_SLOW_S"] = "0"
    ingestd(*commands[1], config=cfg, env=env, check=True)  # finish: resume or run the backfill
    ingestd("backfill", "orders", "--from", days[0].isoformat(), "--to", days[-1].isoformat(),
            "--request-id", "final", config=cfg, env=env, check=True)

    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        for day in days:
            rows, units, gens = con.execute(
                "SELECT count(*), count(DISTINCT unit_id), count(DISTINCT generation) FROM events WHERE day = ?",
                [day]).fetchone()
            assert (rows, units, gens) == (expected[day], expected[day], 1), f"seed {SEED}, {day}"
            visible = con.execute("SELECT generation, rows FROM partitions WHERE source = 'orders' AND day = ?",
                                  [day]).fetchone()
            state = state_query(tmp_path / "state.db", "SELECT generation, rows, status FROM partitions WHERE day = ?",
                                (day.isoformat(),))[0]
            assert (visible[0], expected[day], "succeeded") == state, \
                f"seed {SEED}, {day}: sink {visible}, state {state}"
    assert state_query(tmp_path / "state.db", "SELECT count(*) FROM runs WHERE status = 'running'") == [(0,)]


def test_a_connection_dropped_mid_fetch_is_retried_with_backoff_then_succeeds(tmp_path, warehouse):
    warehouse.add_events(D, 5000)
    drops = tmp_path / "drops"
    drops.write_text("2")
    cfg = write_config(tmp_path, connection_type="flakyduck")
    env = cli_env([fault_plugin(tmp_path)], INGESTD_TEST_DROPS=str(drops),
                  INGESTD_TEST_DISK_FULL=str(tmp_path / "nope"))
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert drops.read_text() == "0"
    retries = [ln for ln in out.stderr.splitlines() if "load.retry" in ln]
    assert len(retries) == 2 and "simulated drop" in retries[0]
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 5000
    assert state_query(tmp_path / "state.db", "SELECT status, rows_written FROM runs") == [("succeeded", 5000)]


def test_a_connection_that_keeps_dropping_fails_the_run_with_the_reason(tmp_path, warehouse):
    warehouse.add_events(D, 5000)
    drops = tmp_path / "drops"
    drops.write_text("99")
    cfg = write_config(tmp_path, connection_type="flakyduck")
    env = cli_env([fault_plugin(tmp_path)], INGESTD_TEST_DROPS=str(drops),
                  INGESTD_TEST_DISK_FULL=str(tmp_path / "nope"))
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env)
    assert out.returncode == 1
    assert state_query(tmp_path / "state.db", "SELECT status, reason FROM runs") == [
        ("failed", "connection reset by peer (simulated drop)")]


def test_a_full_disk_mid_write_fails_the_run_keeps_the_old_generation_and_the_next_window_retries(tmp_path, warehouse):
    warehouse.add_events(D, 4000)
    full = tmp_path / "disk-full"
    cfg = write_config(tmp_path, sink='type = "fullduck"\npath = "analytics.duckdb"\nchunk_rows = 1000',
                       schedule='["0 * * * *"]', lookback=1)
    env = cli_env([fault_plugin(tmp_path)], INGESTD_TEST_DROPS=str(tmp_path / "none"), INGESTD_TEST_DISK_FULL=str(full))
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env, check=True)
    warehouse.add_events(D, 500, start_id=50_000)

    full.write_text("")
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env)
    assert out.returncode == 1
    run = state_query(tmp_path / "state.db", "SELECT status, reason FROM runs ORDER BY started_at")[-1]
    assert run[0] == "failed" and "No space left on device" in run[1]
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 4000
    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM events_data WHERE day = ?", [D]).fetchone()[0] == 4000

    full.unlink()
    out = ingestd("run", "--once", "--now", f"{(D + dt.timedelta(days=1)).isoformat()}T06:05:00+00:00",
                  config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 4500
    assert state_query(tmp_path / "state.db", "SELECT trigger, status FROM runs ORDER BY started_at")[-1] == (
        "scheduled", "succeeded")


def test_a_corrupt_state_database_is_a_clear_error_and_is_not_reset(tmp_path, warehouse):
    cfg = write_config(tmp_path)
    state = tmp_path / "state.db"
    garbage = b"this is not a sqlite database" * 100
    state.write_bytes(garbage)
    out = ingestd("run", "--once", config=cfg)
    assert out.returncode == 1
    assert "state database" in out.stderr and "not reset" in out.stderr and str(state) in out.stderr
    assert state.read_bytes() == garbage


def test_a_state_database_locked_by_another_process_is_a_clear_error(tmp_path, warehouse):
    cfg = write_config(tmp_path)
    ingestd("status", config=cfg)  # nothing yet
    ingestd("run", "--once", "--now", "2026-11-21T06:05:00+00:00", config=cfg, check=True)
    holder = subprocess.Popen(
        ["python3", "-c", "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None);"
         " c.execute('PRAGMA locking_mode = EXCLUSIVE'); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True);"
         " time.sleep(60)", str(tmp_path / "state.db")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = ingestd("run", "--once", config=cfg, timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 1
    assert "state database" in out.stderr and "locked" in out.stderr
    assert state_query(tmp_path / "state.db", "SELECT count(*) FROM runs")[0][0] >= 1
