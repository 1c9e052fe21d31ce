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

    out = ingestd("status", config=cfg, env=cli_env(STATE_PW="wrong-password-123"))
    assert out.returncode != 0
    assert "password authentication failed" in out.stderr and "wrong-password-123" not in out.stdout + out.stderr
