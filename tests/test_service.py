"""ingestd as a service: systemd's notify protocol on a datagram socket this test binds (no
systemd needed), signals against a real `ingestd run` process, and no secret in any output."""

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from tests.support import ROOT, cli_env, sink_rows, slow_plugin, spawn_ingestd, state_query, wait_for, write_config

D = dt.date(2026, 11, 20)


class NotifySocket:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="ingestd-n")  # short: AF_UNIX paths are limited to 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            for line in data.split("\n"):
                self.messages.append((time.monotonic(), line))

    def until(self, line_start: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(ln.startswith(line_start) for _, ln in self.messages):
                return
            self.pump(0.2)
        raise AssertionError(f"no {line_start} in {self.messages}")

    def lines(self, start: str) -> list[str]:
        return [ln for _, ln in self.messages if ln.startswith(start)]

    def close(self):
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify():
    n = NotifySocket()
    yield n
    n.close()


def test_notify_ready_status_watchdog_reloading_stopping(tmp_path, warehouse, notify):
    warehouse.add_events(D, 100)
    cfg = write_config(tmp_path, schedule='["0 0 1 1 *"]', recheck="[]", lookback=1)
    env = cli_env(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="1000000")
    proc = spawn_ingestd("run", config=cfg, env=env)
    try:
        notify.until("READY=1")
        assert (tmp_path / "state.db").exists()  # the state store is up before READY
        assert notify.messages[0][1] == "READY=1"
        notify.pump(2.5)
        pings = [t for t, ln in notify.messages if ln == "WATCHDOG=1"]
        assert len(pings) >= 4, notify.messages  # every half interval (0.5 s), from the event loop
        assert notify.lines("STATUS=")
        proc.send_signal(signal.SIGHUP)
        notify.until("RELOADING=1")
        assert any(ln.startswith("MONOTONIC_USEC=") for _, ln in notify.messages)
        ready_after_reload = [i for i, (_, ln) in enumerate(notify.messages) if ln == "READY=1"]
        notify.pump(1.0)
        assert len([ln for _, ln in notify.messages if ln == "READY=1"]) >= 2 or ready_after_reload
        proc.send_signal(signal.SIGTERM)
        notify.until("STOPPING=1")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


YESTERDAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


def _daemon_loading_yesterday(tmp_path, warehouse, grace: float, slow: str):
    """A daemon whose start-up catch-up is loading yesterday (the real clock's), slowly."""
    warehouse.add_events(YESTERDAY, 20_000)
    cfg = write_config(tmp_path, connection_type="slowduck", schedule='["0 0 * * *"]', recheck="[]", lookback=1,
                       extra_daemon=f"shutdown_grace_seconds = {grace}")
    proc = spawn_ingestd("run", config=cfg, env=cli_env([slow_plugin(tmp_path)], INGESTD_TEST_SLOW_S=slow))
    wait_for(lambda: state_query(tmp_path / "state.db", "SELECT 1 FROM runs WHERE status = 'running'"),
             what="a running load")
    return proc


def test_sigterm_lets_a_running_load_finish_within_the_grace_period(tmp_path, warehouse):
    proc = _daemon_loading_yesterday(tmp_path, warehouse, grace=60, slow="0.1")
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert state_query(tmp_path / "state.db", "SELECT status, rows_written FROM runs") == [("succeeded", 20_000)]
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", YESTERDAY) == 20_000


def test_sigterm_rolls_back_a_load_that_outlasts_the_grace_period(tmp_path, warehouse):
    proc = _daemon_loading_yesterday(tmp_path, warehouse, grace=0.5, slow="0.3")
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    runs = state_query(tmp_path / "state.db", "SELECT status, reason FROM runs")
    assert runs[-1][0] == "failed" and runs[-1][1].startswith("cancelled"), runs
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", YESTERDAY) == 0
    import duckdb
    with duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM events_data").fetchone()[0] == 0


def test_sighup_adds_a_source_and_refuses_an_invalid_config(tmp_path, warehouse, notify):
    warehouse.add_events(YESTERDAY, 100)
    cfg = write_config(tmp_path, schedule='["0 0 1 1 *"]', recheck="[]", lookback=1)
    env = cli_env(NOTIFY_SOCKET=notify.path)
    proc = spawn_ingestd("run", config=cfg, env=env)
    try:
        notify.until("READY=1")
        good = cfg.read_text()
        cfg.write_text(good + '\n[sources.bad]\nconnection = "wh"\n')  # missing keys: refused
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert proc.poll() is None
        added = good + (
            '\n[sources.copy]\nconnection = "wh"\nkind = "events"\n'
            'query = "SELECT ts, user_id, event, value FROM events_raw WHERE ts >= {start} AND ts < {end}"\n'
            'schedule = ["0 0 * * *"]\n[sources.copy.recheck]\nlookback_days = 1\n'
            '[sources.copy.mapping]\ntimestamp = "ts"\nevent_name = "event"\nids = { user_id = "user_id" }\n')
        cfg.write_text(added)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: state_query(tmp_path / "state.db",
                                     "SELECT 1 FROM runs WHERE source = 'copy' AND status = 'succeeded'"),
                 what="the added source to load")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    refused = [json.loads(ln) for ln in out.splitlines() if '"config.reload_refused"' in ln]
    assert refused and "sources.bad.kind: missing" in refused[0]["error"]
    reloaded = [json.loads(ln) for ln in out.splitlines() if '"config.reloaded"' in ln]
    assert reloaded and reloaded[0]["added"] == ["copy"]


def test_sighup_adds_a_sink_and_refuses_one_that_cannot_open(tmp_path, warehouse):
    """A reload opens the sinks it adds or changes before it takes effect: one that cannot be
    opened refuses the whole reload (the old config keeps running); a good one receives the rows
    of a source added with it, without a restart."""
    warehouse.add_events(YESTERDAY, 100)
    cfg = write_config(tmp_path, schedule='["0 0 1 1 *"]', recheck="[]", lookback=1)
    good = cfg.read_text().replace("[sources.orders]\n", '[sources.orders]\nsink = "main"\n', 1)
    assert 'sink = "main"' in good
    cfg.write_text(good)
    (tmp_path / "a-file").write_text("not a folder")
    source = ('\n[sources.copy]\nconnection = "wh"\nkind = "events"\nsink = "other"\n'
              'query = "SELECT ts, user_id, event, value FROM events_raw WHERE ts >= {start} AND ts < {end}"\n'
              'schedule = ["0 0 * * *"]\n[sources.copy.recheck]\nlookback_days = 1\n'
              '[sources.copy.mapping]\ntimestamp = "ts"\nevent_name = "event"\nids = { user_id = "user_id" }\n')
    proc = spawn_ingestd("run", config=cfg, env=cli_env())
    try:
        wait_for(lambda: (tmp_path / "state.db").exists(), what="the daemon to start")
        time.sleep(1.0)
        cfg.write_text(good + '\n[sinks.other]\ntype = "duckdb"\npath = "a-file/other.duckdb"\n' + source)
        proc.send_signal(signal.SIGHUP)
        time.sleep(2.0)
        assert proc.poll() is None
        assert not state_query(tmp_path / "state.db", "SELECT 1 FROM runs WHERE source = 'copy'")
        cfg.write_text(good.replace("batch_rows = 1000", "batch_rows = 1000\nmax_concurrent_loads = 3", 1)
                       + '\n[sinks.other]\ntype = "duckdb"\npath = "other.duckdb"\n' + source)
        proc.send_signal(signal.SIGHUP)
        try:
            wait_for(lambda: state_query(tmp_path / "state.db",
                                         "SELECT 1 FROM runs WHERE source = 'copy' AND status = 'succeeded'"),
                     what="the added source to load into the added sink")
        except AssertionError:
            proc.kill()
            raise AssertionError(proc.stdout.read()[-3000:] + proc.stderr.read()[-2000:]) from None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sink_rows(tmp_path / "other.duckdb", "copy", YESTERDAY) == 100
    out = proc.stdout.read()
    refused = [json.loads(ln) for ln in out.splitlines() if '"config.reload_refused"' in ln]
    assert refused and "sinks.other: could not be opened" in refused[0]["error"], out[-2000:]
    reloaded = [json.loads(ln) for ln in out.splitlines() if '"config.reloaded"' in ln]
    assert reloaded and reloaded[0]["sinks"] == ["other"] and reloaded[0]["added"] == ["copy"]
    restart = [json.loads(ln) for ln in out.splitlines() if '"config.restart_needed"' in ln]
    assert restart and restart[0]["keys"] == ["daemon.max_concurrent_loads"]


def test_logs_are_json_lines_with_stable_keys(tmp_path, warehouse):
    warehouse.add_events(D, 10)
    cfg = write_config(tmp_path, lookback=1)
    out = subprocess.run([str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else "python3",
                          "-m", "ingestd", "-c", str(cfg), "run", "--once", "--now", "2026-11-21T06:05:00Z"],
                         capture_output=True, text=True, env=cli_env(), timeout=120)
    lines = [json.loads(ln) for ln in out.stdout.splitlines() if ln.strip()]
    done = [rec for rec in lines if rec["event"] == "load.succeeded"][0]
    for key in ("source", "day", "run_id", "generation", "rows", "duration_ms", "timestamp", "level"):
        assert key in done, key


def test_systemd_analyze_verifies_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package provides it)")
    unit = (ROOT / "contrib/systemd/ingestd.service").read_text()
    for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "TimeoutStopSec=", "DynamicUser=yes",
                "StateDirectory=ingestd", "LoadCredential=", "NoNewPrivileges=yes", "ProtectSystem=strict",
                "ProtectHome=yes", "PrivateTmp=yes", "RestrictAddressFamilies="):
        assert key in unit, key
    venv_ingestd = ROOT / ".venv/bin/ingestd"
    target = tmp_path / "ingestd.service"
    target.write_text(unit.replace("/opt/ingestd/.venv/bin/ingestd", str(venv_ingestd)))
    out = subprocess.run([analyze, "verify", str(target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr


def test_no_secret_appears_in_logs_events_responses_or_status(tmp_path, warehouse):
    """A full run with the bus on a password-protected mosquitto (the contrib ACL), requests
    answered, loads done; every log line, MQTT message and CLI output is scanned for the secrets."""
    import asyncio

    import aiomqtt

    from tests.broker import Mosquitto, find, free_port
    from tests.test_bus import Collector, request
    folder = tmp_path / "secure"
    folder.mkdir()
    users = {"ingestd": "daemon-pw-7f3a9", "operator": "operator-pw-c41d2"}
    for i, (user, pw) in enumerate(users.items()):
        subprocess.run([find("mosquitto_passwd"), *(["-c"] if i == 0 else []), "-b", str(folder / "passwd"), user, pw],
                       check=True)
    port = free_port()
    broker = Mosquitto(folder, port=port, extra_conf=f"allow_anonymous false\npassword_file {folder / 'passwd'}\n")
    broker.start()
    secret_file = folder / "bus-password"
    secret_file.write_text(users["ingestd"] + "\n")
    warehouse.add_events(YESTERDAY, 50)
    warehouse.add_events(D, 20)
    bus = (f'enabled = true\nport = {port}\nbase_topic = "ingestd/test"\nusername = "ingestd"\n'
           f'password_file = "{secret_file}"\n')
    cfg = write_config(tmp_path, bus=bus, schedule='["0 0 * * *"]', lookback=1)
    env = cli_env(INGESTD_BUS_USERNAME="operator", INGESTD_BUS_PASSWORD=users["operator"])

    class Watch(Collector):
        async def _run(self):
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, username="operator",
                                          password=users["operator"]) as c:
                    await c.subscribe("ingestd/#", qos=1)
                    self.ready.set()
                    async for m in c.messages:
                        self.messages.append((str(m.topic), m.payload.decode(errors="replace"), m.retain))
            except aiomqtt.MqttError:
                return  # the broker stopped at the end of the test

    watcher = Watch(port, [])
    proc = spawn_ingestd("run", config=cfg, env=env)
    outputs = []
    try:
        wait_for(lambda: any('"online"' in p for _, p, _ in watcher.messages), what="online")
        answer, _, _ = asyncio.run(request(port, "backfill", {"source": "orders", "from": D.isoformat(),
                                                               "to": D.isoformat()},
                                           username="operator", password=users["operator"]))
        outputs.append(json.dumps(answer))
        wait_for(lambda: any("backfill.done" in p for _, p, _ in watcher.messages), what="backfill done")
        for cmd in (["request", "status"], ["status", "--json"], ["status"], ["check"], ["plugins", "--json"]):
            r = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "ingestd", "-c", str(cfg), *cmd],
                               capture_output=True, text=True, env=env, timeout=60)
            outputs += [r.stdout, r.stderr]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        broker.stop()
    outputs += [proc.stdout.read(), proc.stderr.read()]
    outputs += [p for _, p, _ in watcher.messages]
    assert len(watcher.messages) > 5 and any("load.succeeded" in o for o in outputs)
    for secret in users.values():
        for text in outputs:
            assert secret not in text
