"""Kills, resumes, bad configs and bad plugins, each through the real CLI."""

import datetime as dt
import signal
import time

import duckdb

from tests.support import (
    cli_env,
    ingestd,
    plugin_dist,
    sink_rows,
    slow_plugin,
    spawn_ingestd,
    state_query,
    wait_for,
    write_config,
)

D = dt.date(2026, 11, 20)


def test_kill_9_during_the_write_then_rerun_leaves_one_whole_generation(tmp_path, warehouse):
    warehouse.add_events(D, 20_000)
    cfg = write_config(tmp_path, connection_type="slowduck",
                       sink='type = "duckdb"\npath = "analytics.duckdb"\nchunk_rows = 1000')
    env = cli_env([slow_plugin(tmp_path)], INGESTD_TEST_SLOW_S="0.1")
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env={**env, "INGESTD_TEST_SLOW_S": "0"}, check=True)
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 20_000

    warehouse.add_events(D, 1_000, start_id=90_000)
    proc = spawn_ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env)
    wait_for(lambda: state_query(tmp_path / "state.db", "SELECT 1 FROM runs WHERE status = 'running'"),
             what="the load to start")
    time.sleep(1.0)  # several committed chunks of generation 2 are in the sink, not yet visible
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 20_000  # generation 1, whole
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env={**env, "INGESTD_TEST_SLOW_S": "0"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 21_000
    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        gens = con.execute("SELECT DISTINCT generation FROM events WHERE day = ?", [D]).fetchall()
        assert len(gens) == 1
        counts = con.execute("SELECT count(*), count(DISTINCT unit_id) FROM events WHERE day = ?", [D]).fetchone()
        assert counts == (21_000, 21_000)
    runs = state_query(tmp_path / "state.db", "SELECT status, reason, generation FROM runs ORDER BY started_at")
    assert runs[1][0] == "failed" and "interrupted" in runs[1][1]
    assert runs[2][0] == "succeeded"
    state_gen = state_query(tmp_path / "state.db", "SELECT generation FROM partitions")[0][0]
    assert gens[0][0] == state_gen == runs[2][2]


def test_backfill_killed_half_way_resumes_without_a_duplicated_day(tmp_path, warehouse):
    days = [D - dt.timedelta(days=i) for i in range(7, -1, -1)]
    for i, day in enumerate(days):
        warehouse.add_events(day, 2000 + i)
    cfg = write_config(tmp_path, connection_type="slowduck", extra_daemon="max_concurrent_loads = 1")
    env = cli_env([slow_plugin(tmp_path)], INGESTD_TEST_SLOW_S="0.15")
    args = ("backfill", "orders", "--from", days[0].isoformat(), "--to", days[-1].isoformat())
    proc = spawn_ingestd(*args, config=cfg, env=env)
    wait_for(lambda: (state_query(tmp_path / "state.db",
                                  "SELECT count(*) FROM backfill_days WHERE status = 'succeeded'")
                      or [(0,)])[0][0] >= 3, what="three backfilled days")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {r[0] for r in state_query(tmp_path / "state.db",
                                             "SELECT day FROM backfill_days WHERE status = 'succeeded'")}
    assert 3 <= len(done_before) < len(days)

    out = ingestd(*args, config=cfg, env={**env, "INGESTD_TEST_SLOW_S": "0"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resuming backfill 1" in out.stdout
    for i, day in enumerate(days):
        assert sink_rows(tmp_path / "analytics.duckdb", "orders", day) == 2000 + i
    succeeded = state_query(tmp_path / "state.db",
                            "SELECT day, count(*) FROM runs WHERE status = 'succeeded' GROUP BY day")
    assert all(n == 1 for _, n in succeeded), succeeded
    assert len(succeeded) == len(days)
    assert state_query(tmp_path / "state.db", "SELECT status FROM backfills") == [("done",)]


def test_a_bad_config_key_names_its_path(tmp_path, warehouse):
    cfg = write_config(tmp_path, extra_daemon="max_loads = 3")
    out = ingestd("check", config=cfg)
    assert out.returncode == 2
    assert f"{cfg}: daemon.max_loads: unknown key" in out.stderr


def test_a_bad_shared_bus_group_names_its_path(tmp_path, warehouse):
    """`[bus] shared` is true/false or a cluster name that is one topic level (it goes into
    `$share/<group>/...`): a '/' or a wildcard is refused, naming the key."""
    cfg = write_config(tmp_path, bus='enabled = false\nshared = "team/a"')
    out = ingestd("check", config=cfg)
    assert out.returncode == 2
    assert f"{cfg}: bus.shared: a cluster name must be one topic level" in out.stderr
    cfg = write_config(tmp_path, bus="enabled = false\nshared = 3")
    out = ingestd("check", config=cfg)
    assert out.returncode == 2 and f"{cfg}: bus.shared: expected one of" in out.stderr


def test_a_bad_cron_string_names_its_path(tmp_path, warehouse):
    cfg = write_config(tmp_path, schedule='["0 6 * * *", "61 * * * *"]')
    out = ingestd("run", "--once", config=cfg)
    assert out.returncode == 2
    assert "sources.orders.schedule[1]: not a cron expression: '61 * * * *'" in out.stderr
    assert not (tmp_path / "state.db").exists()


def test_a_wrong_type_and_a_missing_key_are_both_reported(tmp_path, warehouse):
    cfg = write_config(tmp_path, extra_daemon='max_backfill_days = "many"')
    cfg.write_text(cfg.read_text().replace('kind = "events"\n', ""))
    out = ingestd("check", config=cfg)
    assert out.returncode == 2
    assert "daemon.max_backfill_days: expected an integer, got 'many'" in out.stderr
    assert "sources.orders.kind: missing" in out.stderr


def test_a_missing_secret_says_which_variable(tmp_path, warehouse):
    cfg = write_config(tmp_path, bus='enabled = false\nusername = "ingestd"\npassword_env = "INGESTD_TEST_NO_SUCH_VAR"')
    out = ingestd("check", config=cfg)
    assert out.returncode == 2
    assert "bus.password_env: environment variable INGESTD_TEST_NO_SUCH_VAR is not set" in out.stderr
    secret_file = tmp_path / "bus-password"
    secret_file.write_text("hunter2-secret\n")
    cfg = write_config(tmp_path, bus=f'enabled = false\nusername = "ingestd"\npassword_file = "{secret_file}"')
    out = ingestd("check", config=cfg)
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout + out.stderr


BROKEN = '''
raise RuntimeError("this plugin is broken on purpose")
'''


def test_a_plugin_that_raises_on_import_is_reported_and_skipped(tmp_path, warehouse):
    env = cli_env([plugin_dist(tmp_path / "extra", "brokenplug", BROKEN)])
    out = ingestd("plugins", env=env, check=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("brokenplug"))
    assert "FAILED: RuntimeError: this plugin is broken on purpose" in line
    assert any(ln.startswith("duckdb ") and "connector:duckdb" in ln for ln in out.stdout.splitlines())

    warehouse.add_events(D, 5)
    cfg = write_config(tmp_path)
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=env)
    assert out.returncode == 0, out.stderr  # the daemon runs on without it

    cfg = write_config(tmp_path, connection_type="brokentype")
    out = ingestd("check", config=cfg, env=env)
    assert out.returncode == 2
    assert "connections.wh.type: unknown connector type 'brokentype'" in out.stderr
    assert "plugin 'brokenplug' failed to load: RuntimeError: this plugin is broken on purpose" in out.stderr


def test_a_plugin_for_another_api_version_is_refused(tmp_path):
    src = "INGESTD_API = (3, 4)\n"
    env = cli_env([plugin_dist(tmp_path / "extra", "futureplug", src)])
    out = ingestd("plugins", env=env, check=True)
    assert "supports plugin API 3..4, but this ingestd has API 2" in out.stdout


def test_a_plugin_with_an_unknown_hook_is_refused(tmp_path):
    src = "from ingestd import hookimpl\nINGESTD_API = (2, 2)\n@hookimpl\ndef ingestd_bogus():\n    pass\n"
    env = cli_env([plugin_dist(tmp_path / "extra", "bogusplug", src)])
    out = ingestd("plugins", env=env, check=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("bogusplug"))
    assert "implements a hook ingestd does not have" in line and "ingestd_bogus" in line


def test_check_runs_every_connector_check(tmp_path, warehouse):
    cfg = write_config(tmp_path)
    out = ingestd("check", config=cfg)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok     orders")
    cfg.write_text(cfg.read_text().replace("FROM events_raw", "FROM no_such_table"))
    out = ingestd("check", config=cfg)
    assert out.returncode == 1
    assert "FAILED orders" in out.stdout and "no_such_table" in out.stdout
