"""The daemon's commands with `[daemon] state_url`: the state in PostgreSQL (a throw-away cluster
from tests/postgres.py), the password from an environment variable, end to end through the CLI."""

from __future__ import annotations

import datetime as dt
import json

from tests.postgres import postgres_cluster  # noqa: F401  (a fixture)
from tests.support import cli_env, ingestd, sink_rows, write_config

D = dt.date(2026, 3, 1)
USER, PASSWORD = "ingestd_cli", "cli-state-password-31"


def test_load_status_and_run_once_keep_their_state_in_postgres(tmp_path, warehouse, postgres_cluster):  # noqa: F811
    postgres_cluster.create_user(USER, PASSWORD)
    postgres_cluster.create_database("cli_state", owner=USER)
    warehouse.add_events(D, 120)
    warehouse.add_events(D + dt.timedelta(days=1), 80)
    url = f"postgresql://{USER}@{postgres_cluster.host}:{postgres_cluster.port}/cli_state"
    cfg = write_config(tmp_path, lookback=1, extra_daemon=f'state_url = "{url}"\nstate_password_env = "STATE_PW"\n'
                                                          'state_schema = "ingest"\nreplica_id = "cli-1"')
    env = cli_env(STATE_PW=PASSWORD)

    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 120

    def pg(sql: str) -> list[tuple]:
        return postgres_cluster.execute(sql, dbname="cli_state")

    assert pg("SELECT status, generation, rows FROM ingest.partitions") == [("succeeded", 1, 120)]
    # a CLI command is a replica of its own beside the daemon of the same config (`<replica_id>.cli-<pid>`)
    [(trigger, status, replica)] = pg("SELECT trigger, status, replica FROM ingest.runs")
    assert (trigger, status) == ("manual", "succeeded") and replica.startswith("cli-1.cli-")
    assert pg("SELECT replica FROM ingest.replicas") == [(replica,)]
    assert not (tmp_path / "state.db").exists(), "no SQLite state beside a PostgreSQL one"
    assert pg("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'ingestd cli-1%'") == [(0,)], \
        "the command closed its connections"

    out = ingestd("run", "--once", "--now", f"{D + dt.timedelta(days=2)}T06:05:00+00:00", config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(pg("SELECT day, generation, rows FROM ingest.partitions")) == [
        (D.isoformat(), 1, 120), ((D + dt.timedelta(days=1)).isoformat(), 1, 80)]
    assert pg("SELECT kind FROM ingest.windows WHERE last_at <> '' ORDER BY kind") == [("load",), ("recheck",)]

    out = ingestd("status", "--json", config=cfg, env=env)
    assert out.returncode == 0, out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    report = json.loads(out.stdout)
    orders = report["sources"][0]
    assert (orders["source"], orders["last_status"], orders["last_loaded_day"]) == (
        "orders", "succeeded", (D + dt.timedelta(days=1)).isoformat())

    assert report["replicas"] == [], "a CLI command is not a replica the status lists"
    out = ingestd("status", config=cfg, env=env)
    assert out.returncode == 0 and "replicas alive: none" in out.stdout, out.stdout + out.stderr

    out = ingestd("status", config=cfg, env=cli_env(STATE_PW="wrong-password-123"))
    assert out.returncode != 0
    assert "password authentication failed" in out.stderr and "wrong-password-123" not in out.stdout + out.stderr


def test_a_load_of_a_day_another_replica_holds_says_busy_and_changes_nothing(tmp_path, warehouse,
                                                                             postgres_cluster):  # noqa: F811
    """A CLI `load` beside a replica that holds the day's lease (a live lease row of replica
    `other`, written here as that replica would): the answer is `busy`, exit 1, no traceback, and
    neither a run nor a generation is recorded; once the lease has lapsed, the load goes ahead."""
    postgres_cluster.create_user("ingestd_busy", PASSWORD)
    postgres_cluster.create_database("cli_busy", owner="ingestd_busy")
    warehouse.add_events(D, 50)
    url = f"postgresql://ingestd_busy@{postgres_cluster.host}:{postgres_cluster.port}/cli_busy"
    cfg = write_config(tmp_path, lookback=1, extra_daemon=f'state_url = "{url}"\nstate_password_env = "STATE_PW"')
    env = cli_env(STATE_PW=PASSWORD)
    other_day = (D - dt.timedelta(days=1)).isoformat()
    assert ingestd("load", "orders", "--day", other_day, config=cfg, env=env).returncode == 0  # makes the schema

    def pg(sql: str) -> list[tuple]:
        return postgres_cluster.execute(sql, dbname="cli_busy")

    pg(f"INSERT INTO ingestd.leases (source, day, replica, token, expires_at) VALUES "
       f"('orders', '{D.isoformat()}', 'other', 7, now() + interval '10 minutes')")
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"orders {D}: busy: another replica is loading this day" in out.stdout
    assert "Traceback" not in out.stderr
    assert pg(f"SELECT count(*) FROM ingestd.runs WHERE day = '{D.isoformat()}'") == [(0,)]
    assert pg(f"SELECT count(*) FROM ingestd.partitions WHERE day = '{D.isoformat()}'") == [(0,)]

    pg("UPDATE ingestd.leases SET expires_at = now() - interval '1 second'")
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert pg(f"SELECT status, generation FROM ingestd.partitions WHERE day = '{D.isoformat()}'") == [("succeeded", 8)]
