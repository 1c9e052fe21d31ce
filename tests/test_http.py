"""The HTTP listener against a real `ingestd run`: /metrics parsed with prometheus-client's own
parser, /healthz and /readyz (503 while a sink cannot open), the control API (each command, bad
bodies, missing or wrong token, an oversize body: an error answer and nothing changed), the
listener's config rules, and the CLI going through the API while the daemon runs."""

from __future__ import annotations

import datetime as dt
import json
import os
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.http_support import TOKEN, RunningDaemon, http_table
from tests.support import cli_env, ingestd, state_query, wait_for, write_config

TODAY = dt.datetime.now(dt.UTC).date()
YESTERDAY = TODAY - dt.timedelta(days=1)
OLDER = TODAY - dt.timedelta(days=5)


def metrics(daemon: RunningDaemon) -> dict[tuple[str, tuple], float]:
    status, text, headers = daemon.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain"), (status, text)
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def runs(folder) -> list[tuple]:
    return state_query(folder / "state.db", "SELECT day, trigger, status FROM runs ORDER BY started_at")


@pytest.fixture
def daemon(tmp_path, warehouse):
    warehouse.add_events(YESTERDAY, 300)
    warehouse.add_events(OLDER, 120)
    d = RunningDaemon(tmp_path, schedule='["0 0 * * *"]', recheck="[]", lookback=2)
    try:
        d.wait_listening()
        wait_for(lambda: ("succeeded",) in state_query(tmp_path / "state.db", "SELECT status FROM runs"),
                 what="the catch-up load")
        yield d
    finally:
        d.stop()


def test_metrics_health_and_readiness_after_known_loads(daemon):
    status, body, _ = daemon.get("/healthz")
    assert status == 200 and body["status"] == "ok" and body["loop_lag_ms"] < 5000
    status, body, _ = daemon.get("/readyz")
    assert status == 200 and body["ready"] is True
    assert body["checks"]["state"]["ok"] and body["checks"]["sink:main"]["ok"] and "bus" not in body["checks"]
    wait_for(lambda: len(runs(daemon.folder)) >= 2, what="both catch-up days")
    m = metrics(daemon)
    src = ("source", "orders")
    assert m[("ingestd_loads_total", (("outcome", "succeeded"), src, ("trigger", "scheduled")))] == 1
    assert m[("ingestd_loads_total", (("outcome", "empty"), src, ("trigger", "scheduled")))] == 1  # today-2: no rows
    assert m[("ingestd_rows_written_total", (src,))] == 300
    assert m[("ingestd_rows_rejected_total", (src,))] == 0
    assert m[("ingestd_load_duration_seconds_count", (src,))] == 1
    assert m[("ingestd_days", (src, ("status", "succeeded")))] == 1
    assert m[("ingestd_days_behind", (src,))] == 0
    assert m[("ingestd_last_success_timestamp_seconds", (src,))] > dt.datetime.now(dt.UTC).timestamp() - 300
    assert m[("ingestd_running_loads", (src,))] == 0
    assert m[("ingestd_ready", ())] == 1
    assert m[("ingestd_bus_enabled", ())] == 0 and m[("ingestd_bus_connected", ())] == 0
    assert m[("ingestd_outbox_depth", ())] == 0 and m[("ingestd_backfills_running", ())] == 0
    info = next(k for k in m if k[0] == "ingestd_build_info")
    assert dict(info[1])["api"] == "2" and dict(info[1])["version"]

    # a manual reload through the API shows up in the counters, with its trigger
    status, answer, _ = daemon.post("/api/v1/load", {"source": "orders", "day": YESTERDAY.isoformat()})
    assert status == 202 and answer["status"] == "ok", answer
    wait_for(lambda: ("manual", "succeeded") in [(t, s) for _, t, s in runs(daemon.folder)], what="the manual load")
    m = metrics(daemon)
    assert m[("ingestd_loads_total", (("outcome", "succeeded"), src, ("trigger", "manual")))] == 1
    assert m[("ingestd_rows_written_total", (src,))] == 600
    assert m[("ingestd_days", (src, ("status", "succeeded")))] == 1  # the same day, reloaded

    request = urllib.request.Request(daemon.url + "/metrics", headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(request, timeout=30) as response:  # OpenMetrics when the scraper asks for it
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert response.read().decode().rstrip().endswith("# EOF")


def test_control_api_commands_and_bad_requests_change_nothing(daemon):
    folder = daemon.folder
    status, answer, _ = daemon.get("/api/v1/status")
    assert status == 200 and answer["status"] == "ok" and answer["data"]["sources"][0]["source"] == "orders"
    status, answer, _ = daemon.get("/api/v1/status?source=ghost")
    assert status == 400 and "unknown source 'ghost'" in answer["error"]
    before = runs(folder)
    backfills = state_query(folder / "state.db", "SELECT COUNT(*) FROM backfills")
    good = {"source": "orders", "from": OLDER.isoformat(), "to": OLDER.isoformat(), "transaction": "t-1"}
    bad = [
        # (what, request kwargs, expected status, part of the error)
        ("no token", dict(body=good, token=None), 401, "Bearer"),
        ("wrong token", dict(body=good, token="not-the-token-at-all"), 403, "wrong bearer token"),
        ("not JSON", dict(body=b"{source: orders}"), 400, "not strict JSON"),
        ("NaN", dict(body=b'{"source": "orders", "from": NaN}'), 400, "NaN is not JSON"),
        ("a key twice", dict(body=b'{"source": "orders", "source": "x"}'), 400, "appears twice"),
        ("not an object", dict(body=b'["orders"]'), 400, "must be a JSON object"),
        ("wrong type", dict(body=b'text', content_type="text/plain"), 415, "application/json"),
        ("oversize", dict(body=json.dumps({**good, "request_id": "x" * 70_000}).encode()), 413, "larger than"),
        ("unknown field", dict(body={**good, "force": True}), 400, "unknown field 'force'"),
        ("unknown source", dict(body={**good, "source": "ghost"}), 400, "unknown source 'ghost'"),
        ("from after to", dict(body={**good, "from": YESTERDAY.isoformat(), "to": OLDER.isoformat()}), 400, "after"),
        ("not a date", dict(body={**good, "from": "yesterday"}), 400, "not a date"),
    ]
    for what, kw, want, error in bad:
        status, answer, headers = daemon.post("/api/v1/backfill", kw.pop("body"), **kw)
        assert status == want, (what, status, answer)
        assert answer["status"] == "error" and error in answer["error"], (what, answer)
        assert set(answer) == {"status", "data", "error", "transaction"}, what
        if want == 401:
            assert headers["WWW-Authenticate"].startswith("Bearer")
    assert runs(folder) == before, "a refused request changed something"
    assert state_query(folder / "state.db", "SELECT COUNT(*) FROM backfills") == backfills

    # each command, with the token
    status, answer, _ = daemon.post("/api/v1/backfill", good)
    assert status == 202 and answer["status"] == "ok" and answer["transaction"] == "t-1", answer
    assert answer["data"]["source_days"] == 1 and answer["data"]["created"] is True
    wait_for(lambda: ("backfill", "succeeded") in [(t, s) for _, t, s in runs(folder)], what="the backfill's load")
    status, answer, _ = daemon.post("/api/v1/backfill", good)  # the same request again: no request_id, so a new one
    assert status == 202
    status, answer, _ = daemon.post("/api/v1/backfill", {**good, "request_id": "r-1"})
    assert status == 202 and answer["data"]["created"] is True
    status, answer, _ = daemon.post("/api/v1/backfill", {**good, "request_id": "r-1"})  # the same id again: runs once
    assert status == 202 and answer["data"]["created"] is False
    status, answer, _ = daemon.post("/api/v1/backfill", {**good, "request_id": "r-1", "to": YESTERDAY.isoformat()})
    assert status == 409 and answer["error"].startswith("conflict"), answer
    status, answer, _ = daemon.post("/api/v1/ready", {"source": "orders", "day": YESTERDAY.isoformat()})
    assert status == 202 and answer["data"]["trigger"] == "ready", answer
    status, answer, _ = daemon.post("/api/v1/reload", {"source": "orders", "day": OLDER.isoformat()})
    assert status == 202 and answer["data"] == {"source": "orders", "day": OLDER.isoformat(), "trigger": "manual",
                                                "accepted": True}
    status, answer, _ = daemon.post("/api/v1/preview", {"source": "orders", "day": YESTERDAY.isoformat(), "rows": 3})
    assert status == 200 and answer["data"]["rows_read"] == 3 and answer["data"]["mapped"] == 3, answer
    status, answer, _ = daemon.post("/api/v1/preview", {"source": "orders"}, token=None)
    assert status == 401, "a preview's answer holds warehouse rows: it needs the token"
    status, answer, _ = daemon.post("/api/v1/cancel", {"backfill_id": 999})
    assert status == 400 and "no running backfill with id 999" in answer["error"]
    status, answer, _ = daemon.post("/api/v1/ready", {"source": "orders", "day": (TODAY + dt.timedelta(days=3))
                                                      .isoformat()})
    assert status == 400 and "in the future" in answer["error"]
    status, answer, _ = daemon.get("/api/v1/backfill")
    assert status == 405 and answer["status"] == "error"
    status, answer, _ = daemon.get("/api/v1/nothing")
    assert status == 404 and answer["status"] == "error"
    wait_for(lambda: ("ready", "succeeded") in [(t, s) for _, t, s in runs(folder)], what="the ready load")


def test_answers_never_echo_a_secret(daemon):
    """Every response leaves through one scrubbing place: a configured secret (here the token
    itself) sent back in an error is shown as ***."""
    status, answer, _ = daemon.post("/api/v1/reload", {"source": TOKEN, "day": YESTERDAY.isoformat()})
    assert status == 400 and "unknown source '***'" in answer["error"] and TOKEN not in json.dumps(answer)
    for path in ("/", "/metrics", "/api/v1/status", "/readyz"):
        assert TOKEN not in str(daemon.get(path)[1])


def test_readyz_is_503_while_a_sink_cannot_open(tmp_path, warehouse):
    warehouse.add_events(YESTERDAY, 50)
    (tmp_path / "store").write_text("a file where the sink's folder should be")
    d = RunningDaemon(tmp_path, sink='type = "duckdb"\npath = "store/analytics.duckdb"', schedule='["0 0 * * *"]',
                      recheck="[]", lookback=1)
    try:
        d.wait_listening()
        status, body, _ = d.get("/readyz")
        assert status == 503 and body["ready"] is False and body["checks"]["sink:main"]["ok"] is False, body
        assert "could not be opened" in body["checks"]["sink:main"]["detail"]
        assert d.get("/healthz")[0] == 200  # alive, only not ready
        status, answer, _ = d.post("/api/v1/reload", {"source": "orders", "day": YESTERDAY.isoformat()})
        assert status == 400 and "is not open" in answer["error"]
        assert state_query(tmp_path / "state.db", "SELECT COUNT(*) FROM runs") == [(0,)]
        (tmp_path / "store").unlink()
        (tmp_path / "store").mkdir()
        wait_for(lambda: d.get("/readyz")[0] == 200, timeout=60, what="the sink to open")
        wait_for(lambda: state_query(tmp_path / "state.db", "SELECT status FROM runs") == [("succeeded",)],
                 what="the catch-up once the sink opened")
    finally:
        _, err = d.stop()
    assert '"sink.open_failed"' in d.log() and '"level": "error"' in d.log()


def test_the_cli_goes_through_the_control_api_while_the_daemon_runs(tmp_path, warehouse):
    warehouse.add_events(OLDER, 80)
    d = RunningDaemon(tmp_path, token_env=None, schedule='["0 0 * * *"]', recheck="[]", lookback=1)
    cfg = d.config
    try:
        d.wait_listening()
        endpoint = json.loads((tmp_path / "state.db.http.json").read_text())
        assert endpoint["url"] == d.url and len(endpoint["token"]) >= 32
        assert oct((tmp_path / "state.db.http.json").stat().st_mode & 0o777) == "0o600"
        out = ingestd("load", "orders", "--day", OLDER.isoformat(), config=cfg)
        assert out.returncode == 0, out.stderr
        assert "going through its control API" in out.stderr and f"pid {d.proc.pid}" in out.stderr
        assert f"orders {OLDER}: loaded: serving gen 1, 80 rows (by the daemon, pid {d.proc.pid})" in out.stdout
        out = ingestd("backfill", "orders", "--from", (OLDER - dt.timedelta(days=1)).isoformat(),
                      "--to", OLDER.isoformat(), config=cfg)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "run by the daemon" in out.stdout and out.stdout.strip().endswith(": done")
        out = ingestd("status", "--days", "6", config=cfg)
        assert out.returncode == 0 and "going through its control API" in out.stderr
        assert f"{OLDER}  reloaded   serving gen 2, 80 rows" in out.stdout, out.stdout
        out = ingestd("status", "--calendar", config=cfg)
        assert out.returncode == 0 and out.stdout.splitlines()[1].startswith("orders  ")
        out = ingestd("cancel", "77", config=cfg)
        assert out.returncode == 1 and "no running backfill with id 77" in out.stderr
        out = ingestd("ready", "orders", "--day", (TODAY + dt.timedelta(days=2)).isoformat(), config=cfg)
        assert out.returncode == 2 and "in the future" in out.stderr
        out = ingestd("request", "status", config=cfg)
        assert out.returncode == 2 and "[bus] enabled = false" in out.stderr
    finally:
        d.stop()
    assert not (tmp_path / "state.db.http.json").exists()


def test_without_http_the_cli_says_how_to_reach_a_running_daemon(tmp_path, warehouse):
    d = RunningDaemon(tmp_path, token_env=None, schedule='["0 0 * * *"]', recheck="[]", lookback=1)
    (tmp_path / "plain").mkdir()
    plain = write_config(tmp_path / "plain")  # the same state database, no [http]
    plain.write_text(plain.read_text().replace('state_path = "state.db"', f'state_path = "{tmp_path}/state.db"'))
    try:
        d.wait_listening()
        out = ingestd("load", "orders", "--day", OLDER.isoformat(), config=plain)
        assert out.returncode == 1 and f"pid {d.proc.pid}" in out.stderr and "no [http] listener" in out.stderr, \
            out.stderr
    finally:
        d.stop()


def test_listener_config_rules(tmp_path):
    def check(table: str, env: dict | None = None):
        cfg = write_config(tmp_path, extra=table)
        return ingestd("config", "show", config=cfg, env=env)

    out = check('\n[http]\nhost = "0.0.0.0"\n')
    assert out.returncode == 2 and "http.host: '0.0.0.0' is not a loopback address" in out.stderr
    out = check('\n[http]\nhost = "0.0.0.0"\ntoken = "short"\n')
    assert out.returncode == 2 and "http.token: must be at least 16 characters" in out.stderr
    out = check('\n[http]\nhost = "0.0.0.0"\ntoken_env = "T"\n', env=cli_env(T="a-long-enough-token-123"))
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["http"]["token"] == "***" and "a-long-enough-token-123" not in out.stdout
    for host in ("127.0.0.1", "::1", "localhost", "127.3.4.5"):
        assert check(f'\n[http]\nhost = "{host}"\n').returncode == 0, host
    assert json.loads(ingestd("config", "show", config=write_config(tmp_path)).stdout)["http"] is None


def test_a_port_in_use_stops_the_daemon_with_a_clear_error(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = write_config(tmp_path, extra=http_table(port, token_env=None), schedule='["0 0 * * *"]', recheck="[]")
        out = ingestd("run", config=cfg, timeout=60)
    assert out.returncode == 1
    assert f"http: cannot listen on 127.0.0.1:{port}" in out.stderr, out.stdout + out.stderr


def test_the_shipped_config_turns_the_listener_on_at_loopback_8470():
    from ingestd.core.config import load_config
    from ingestd.plugin.manager import load_plugins
    from tests.support import ROOT
    loaded = load_plugins()
    config = load_config(ROOT / "daemon.toml", loaded.registry, loaded.errors())
    assert config.http is not None and (config.http.host, config.http.port, config.http.enabled) == ("127.0.0.1", 8470,
                                                                                                       True)
    assert config.http.token is None and os.path.exists(ROOT / "kernel" / "daemon.toml")
    assert (ROOT / "kernel" / "daemon.toml").read_text() == (ROOT / "daemon.toml").read_text()
