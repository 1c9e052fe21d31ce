"""A SIGHUP while a load runs: the load works on the job (source, connector, sink) it started
with and finishes whole, with its run row and event; loads that start after the reload use the
new config. Against a real `ingestd run` process, a slowed DuckDB connector and DuckDB sinks."""

from __future__ import annotations

import datetime as dt
import json
import signal
import textwrap
from pathlib import Path

import pytest

from tests.support import Warehouse, cli_env, sink_rows, slow_plugin, spawn_ingestd, state_query, wait_for

TODAY = dt.datetime.now(dt.UTC).date()
OLDER, NEWER = TODAY - dt.timedelta(days=2), TODAY - dt.timedelta(days=1)


def config(*, name: str = "orders", sink: str = "main", connection: str = "wh", with_source: bool = True) -> str:
    source = f"""
        [sources.{name}]
        connection = "{connection}"
        sink = "{sink}"
        kind = "events"
        query = "SELECT ts, user_id, event, value FROM events_raw WHERE ts >= {{start}} AND ts < {{end}}"
        schedule = ["0 0 * * *"]
        lag_days = 1

        [sources.{name}.recheck]
        schedule = []
        lookback_days = 2

        [sources.{name}.mapping]
        timestamp = "ts"
        event_name = "event"
        ids = {{ user_id = "user_id" }}
    """ if with_source else ""
    return textwrap.dedent("""
        [daemon]
        state_path = "state.db"
        batch_rows = 1000
        retry_attempts = 2
        retry_base_seconds = 0.05

        [sinks.main]
        type = "duckdb"
        path = "main.duckdb"

        [sinks.other]
        type = "duckdb"
        path = "other.duckdb"

        [connections.wh]
        type = "slowduck"
        path = "warehouse.duckdb"

        [connections.wh2]
        type = "slowduck"
        path = "warehouse2.duckdb"
    """) + textwrap.dedent(source)


@pytest.fixture(params=["probe", "fetch"])
def daemon(tmp_path, request):
    """Start `ingestd run` on `config()`; the catch-up loads OLDER (10,000 rows, 10 slowed
    batches, after a slowed probe), then NEWER. Yields (process, config path) once OLDER's load
    is in its probe (before its run row exists), or in its fetch, as the test is parametrized."""
    first, second = Warehouse(tmp_path / "warehouse.duckdb"), Warehouse(tmp_path / "warehouse2.duckdb")
    first.add_events(OLDER, 10_000)
    first.add_events(NEWER, 300)
    second.add_events(NEWER, 7)
    cfg = tmp_path / "daemon.toml"
    cfg.write_text(config())
    mark = tmp_path / "probing"
    env = cli_env([slow_plugin(tmp_path)], INGESTD_TEST_SLOW_S="0.3", INGESTD_TEST_PROBE_MARK=str(mark),
                  INGESTD_TEST_PROBE_S="1.5")
    proc = spawn_ingestd("run", config=cfg, env=env)
    try:
        if request.param == "probe":
            wait_for(lambda: mark.exists() and mark.read_text() == OLDER.isoformat(), what="the older day's probe")
        else:
            wait_for(lambda: still_running(tmp_path), what="the load of the older day to run")
        yield proc, cfg
    finally:
        if proc.poll() is None:
            proc.kill()


def reload(proc, cfg: Path, text: str) -> None:
    cfg.write_text(text)
    proc.send_signal(signal.SIGHUP)


def stop(proc) -> list[dict]:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    return [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]


def runs(tmp_path: Path) -> list[tuple]:
    return state_query(tmp_path / "state.db", "SELECT source, day, status, generation, rows_written FROM runs "
                                              "ORDER BY started_at")


def still_running(tmp_path: Path) -> bool:
    return bool(state_query(tmp_path / "state.db", "SELECT 1 FROM runs WHERE status = 'running' AND day = ?",
                            (OLDER.isoformat(),)))


def test_a_source_renamed_during_its_load_finishes_under_the_old_name_and_the_new_name_loads_anew(tmp_path, daemon):
    proc, cfg = daemon
    reload(proc, cfg, config(name="renamed"))
    wait_for(lambda: state_query(tmp_path / "state.db", "SELECT count(*) FROM runs WHERE source = 'renamed' AND "
                                                        "status = 'succeeded'") == [(2,)],
             timeout=60, what="the renamed source's catch-up")
    logs = stop(proc)
    assert ("orders", OLDER.isoformat(), "succeeded", 1, 10_000) in runs(tmp_path)
    assert not [r for r in runs(tmp_path) if r[0] == "orders" and r[1] == NEWER.isoformat()], \
        "the old name's window must end once the source is gone"
    assert sink_rows(tmp_path / "main.duckdb", "orders", OLDER) == 10_000
    assert sink_rows(tmp_path / "main.duckdb", "renamed", OLDER) == 10_000
    assert sink_rows(tmp_path / "main.duckdb", "renamed", NEWER) == 300
    done = [e for e in logs if e.get("event") == "load.succeeded" and e.get("source") == "orders"]
    assert [e["day"] for e in done] == [OLDER.isoformat()]
    assert not [e for e in logs if e.get("level") == "error"], [e for e in logs if e.get("level") == "error"]


def test_a_source_moved_to_another_sink_and_connection_during_its_load(tmp_path, daemon):
    proc, cfg = daemon
    reload(proc, cfg, config(sink="other", connection="wh2"))
    wait_for(lambda: state_query(tmp_path / "state.db", "SELECT status FROM runs WHERE day = ?",
                                 (NEWER.isoformat(),)) == [("succeeded",)], timeout=60, what="the newer day's load")
    stop(proc)
    # the running load read and wrote what it started with: the old connection and the old sink
    assert ("orders", OLDER.isoformat(), "succeeded", 1, 10_000) in runs(tmp_path)
    assert sink_rows(tmp_path / "main.duckdb", "orders", OLDER) == 10_000
    assert sink_rows(tmp_path / "other.duckdb", "orders", OLDER) == 0
    # the next load used the new config: the other warehouse (7 rows) into the other sink
    assert ("orders", NEWER.isoformat(), "succeeded", 1, 7) in runs(tmp_path)
    assert sink_rows(tmp_path / "other.duckdb", "orders", NEWER) == 7
    assert sink_rows(tmp_path / "main.duckdb", "orders", NEWER) == 0


def test_a_source_removed_during_its_load_finishes_that_load_and_loads_nothing_more(tmp_path, daemon):
    proc, cfg = daemon
    reload(proc, cfg, config(with_source=False))
    wait_for(lambda: not still_running(tmp_path), timeout=60, what="the running load to end")
    logs = stop(proc)
    assert runs(tmp_path) == [("orders", OLDER.isoformat(), "succeeded", 1, 10_000)]
    assert sink_rows(tmp_path / "main.duckdb", "orders", OLDER) == 10_000
    reloaded = [e for e in logs if e.get("event") == "config.reloaded"]
    assert reloaded and reloaded[0]["removed"] == ["orders"]
    assert [e["day"] for e in logs if e.get("event") == "load.succeeded"] == [OLDER.isoformat()]
