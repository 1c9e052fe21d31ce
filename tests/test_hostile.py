"""Hostile input and hostile conditions (issue 15), against real processes and a real mosquitto:
a closed stdout, retained requests, request ids and dates that are wrong in every way, requests
built to crash a parser, `request` with the bus off, environment references in the config, and
the bus's hygiene (one `daemon.stopping`, the stop time, a heartbeat, the version, a handler that
fails, events out within a second)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time

import aiomqtt
import pytest

from tests.broker import Mosquitto
from tests.support import cli_env, ingestd, state_query, wait_for, write_config
from tests.test_bus import Collector, bus_config, request, start_daemon, stop_daemon

D = dt.date(2026, 11, 20)


@pytest.fixture
def broker(tmp_path):
    folder = tmp_path / "broker"
    folder.mkdir()
    b = Mosquitto(folder).start()
    yield b
    b.stop()


def online(watcher: Collector) -> bool:
    return any(t == "ingestd/test/state" and isinstance(p, dict) and p.get("state") == "online"
               for t, p, _ in watcher.messages)


# -- a closed stdout ------------------------------------------------------------------------------

def test_a_daemon_whose_stdout_is_closed_keeps_working_and_stops_on_sigterm(tmp_path, warehouse):
    """`ingestd run 2>&1 | head -1`: once head exits, every log write would fail; the daemon
    must go on loading and stop cleanly on SIGTERM within its grace period."""
    for i in range(3):
        warehouse.add_events(D - dt.timedelta(days=i), 200)
    cfg = write_config(tmp_path, schedule='["0 0 * * *"]', recheck="[]", lookback=3,
                       extra_daemon="shutdown_grace_seconds = 5")
    cmd = f"{sys.executable} -m ingestd -c {cfg} run 2>&1 | head -1"
    shell = subprocess.Popen(["bash", "-c", cmd], env=cli_env(), stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        first = shell.stdout.readline()
        assert first.startswith("{"), first
        pid = int(subprocess.run(["pgrep", "-f", f"^{sys.executable} -m ingestd -c {cfg} run"],
                                 capture_output=True, text=True).stdout.split()[0])
        wait_for(lambda: state_query(tmp_path / "state.db", "SELECT 1 FROM windows WHERE kind = 'load'"),
                 timeout=60, what="the start-up window to finish with stdout closed")
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0, timeout=30,
                 what="the daemon to exit after SIGTERM")
        assert time.monotonic() - started < 15
        shell.wait(10)
    finally:  # a failed check must not leave the daemon running behind the suite
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
    running = state_query(tmp_path / "state.db", "SELECT count(*) FROM runs WHERE status = 'running'")
    assert running == [(0,)]


# -- requests ---------------------------------------------------------------------------------------

def test_a_retained_request_is_answered_with_an_error_and_never_replayed(tmp_path, warehouse, broker):
    warehouse.add_events(D, 10)
    cfg = bus_config(tmp_path, broker)

    async def publish_retained():
        async with aiomqtt.Client("127.0.0.1", broker.port) as c:
            await c.publish("ingestd/test/request/backfill", json.dumps(
                {"source": "orders", "from": D.isoformat(), "to": D.isoformat(), "transaction": "kept"}).encode(),
                qos=1, retain=True)
    asyncio.run(publish_retained())
    for _ in range(2):  # two starts: neither acts on it
        watcher = Collector(broker.port, ["ingestd/test/response/#", "ingestd/test/state"])
        proc = start_daemon(cfg)
        try:
            wait_for(lambda w=watcher: [p for t, p, _ in w.messages if t == "ingestd/test/response/backfill"],
                     what="the answer to the retained request")
        finally:
            stop_daemon(proc)
        answer, retained = next((p, r) for t, p, r in watcher.messages if t == "ingestd/test/response/backfill")
        assert answer["status"] == "error" and "retained request is ignored" in answer["error"]
        assert answer["transaction"] is None and retained is False
    assert state_query(tmp_path / "state.db", "SELECT count(*) FROM backfills") == [(0,)]


MALFORMED = [
    ("backfill", {"source": "orders", "from": D.isoformat(), "to": D.isoformat(), "request_id": ""},
     "'request_id' must not be empty"),
    ("backfill", {"source": "orders", "from": D.isoformat(), "to": D.isoformat(), "request_id": "x" * 129},
     "at most 128"),
    ("backfill", {"source": "orders", "from": D.isoformat(), "to": D.isoformat(), "request_id": "a\nb"},
     "not printable"),
    ("backfill", {"source": "orders", "from": "2026-W46-1", "to": D.isoformat()}, "not a date (YYYY-MM-DD)"),
    ("backfill", {"source": "orders", "from": "20261120", "to": D.isoformat()}, "not a date (YYYY-MM-DD)"),
    ("backfill", {"source": "orders", "from": "0001-01-01", "to": "0001-01-02"}, "outside the days ingestd handles"),
    ("backfill", {"source": "orders", "from": "9999-12-31", "to": "9999-12-31"}, "outside the days ingestd handles"),
    ("reload", {"source": "orders", "day": "9999-12-31"}, "outside the days ingestd handles"),
    ("ready", {"source": "orders\u0000", "day": D.isoformat()}, "not printable"),
    ("status", {"source": "\ud800"}, "not printable"),
    ("cancel", {"backfill_id": 10 ** 30}, "must be between 1 and"),
    ("cancel", {"backfill_id": -1}, "must be between 1 and"),
    ("status", {"source": "s" * 10_000}, "at most 256"),
]


def test_malformed_requests_get_a_specific_error_never_an_internal_one(tmp_path, warehouse, broker):
    cfg = bus_config(tmp_path, broker, extra_daemon="max_backfill_days = 30")
    watcher = Collector(broker.port, ["ingestd/test/state"])
    proc = start_daemon(cfg)
    try:
        wait_for(lambda: online(watcher), what="online")
        for command, body, words in MALFORMED:
            answer, _, _ = asyncio.run(request(broker.port, command, body))
            assert answer["status"] == "error" and words in answer["error"], (command, body, answer)
        deep = ("[" * 30_000 + "]" * 30_000).encode()
        for payload, words in ((b'{"source": "\\ud800x"}', "not printable"), (deep, "nests too deeply"),
                               (b"\xff\xfe", "not UTF-8"), (b'{"source": "orders", "from": NaN}', "must be a string")):
            answer, _, _ = asyncio.run(request(broker.port, "backfill", payload))
            assert answer["status"] == "error" and words in answer["error"], (payload[:30], answer)
            assert "internal error" not in answer["error"]
        ok, _, _ = asyncio.run(request(broker.port, "status", {}))
        assert ok["status"] == "ok"
    finally:
        out = stop_daemon(proc)
    assert state_query(tmp_path / "state.db", "SELECT count(*) FROM backfills") == [(0,)], out[-2000:]


def test_a_request_id_reused_for_another_backfill_is_a_conflict(tmp_path, warehouse, broker):
    for i in range(3):
        warehouse.add_events(D - dt.timedelta(days=i), 10)
    cfg = bus_config(tmp_path, broker)
    text = cfg.read_text() + ('\n[sources.copy]\nconnection = "wh"\nkind = "events"\n'
                              'query = "SELECT ts, user_id, event FROM events_raw WHERE ts >= {start} AND ts < {end}"\n'
                              'schedule = ["0 0 1 1 *"]\n[sources.copy.recheck]\nschedule = []\nlookback_days = 1\n'
                              '[sources.copy.mapping]\ntimestamp = "ts"\nevent_name = "event"\n'
                              'ids = { user_id = "user_id" }\n')
    cfg.write_text(text)
    watcher = Collector(broker.port, ["ingestd/test/#"])
    proc = start_daemon(cfg)
    try:
        wait_for(lambda: online(watcher), what="online")
        first = {"source": "orders", "from": (D - dt.timedelta(days=1)).isoformat(), "to": D.isoformat(),
                 "request_id": "nightly-42"}
        answer, _, _ = asyncio.run(request(broker.port, "backfill", first))
        assert answer["status"] == "ok" and answer["data"]["days"] == 2 and answer["data"]["source_days"] == 2
        same, _, _ = asyncio.run(request(broker.port, "backfill", first))
        assert same["status"] == "ok" and same["data"]["created"] is False
        for change in ({"to": (D - dt.timedelta(days=1)).isoformat()}, {"source": "copy"}, {"missing": True}):
            other, _, _ = asyncio.run(request(broker.port, "backfill", {**first, **change}))
            assert other["status"] == "error" and other["error"].startswith("conflict: request_id 'nightly-42'"), other
        both, _, _ = asyncio.run(request(broker.port, "backfill", {"source": "*", "from": (D - dt.timedelta(days=1))
                                                                    .isoformat(), "to": D.isoformat()}))
        assert both["data"]["days"] == 2 and both["data"]["source_days"] == 4
    finally:
        stop_daemon(proc)
    assert state_query(tmp_path / "state.db", "SELECT count(*) FROM backfills") == [(2,)]


def test_the_cli_refuses_an_empty_or_conflicting_request_id_too(tmp_path, warehouse):
    warehouse.add_events(D, 5)
    cfg = write_config(tmp_path, lookback=1)
    empty = ingestd("backfill", "orders", "--from", D.isoformat(), "--to", D.isoformat(), "--request-id", "",
                    config=cfg)
    assert empty.returncode == 2 and "request_id must be 1 to 128 printable characters" in empty.stderr
    ingestd("backfill", "orders", "--from", D.isoformat(), "--to", D.isoformat(), "--request-id", "r1",
            config=cfg, check=True)
    other = ingestd("backfill", "orders", "--from", (D - dt.timedelta(days=1)).isoformat(), "--to", D.isoformat(),
                    "--request-id", "r1", config=cfg)
    assert other.returncode == 2 and "conflict: request_id 'r1' was used for backfill 1" in other.stderr


def test_request_with_the_bus_off_refuses_and_publishes_nothing(tmp_path, warehouse, broker):
    cfg = write_config(tmp_path, bus=f'enabled = false\nport = {broker.port}\nbase_topic = "ingestd/test"')
    watcher = Collector(broker.port, ["#"])
    out = ingestd("request", "status", config=cfg, timeout=30)
    assert out.returncode == 2
    assert "[bus] enabled = false" in out.stderr and "nothing was sent" in out.stderr
    time.sleep(0.5)
    assert watcher.messages == []


# -- environment references in the config -------------------------------------------------------

def test_environment_references_expand_and_an_unset_one_names_key_and_variable(tmp_path, warehouse):
    cfg = write_config(tmp_path)
    text = cfg.read_text().replace('state_path = "state.db"', 'state_path = "${STATE_DIR}/state.db"')
    cfg.write_text(text)
    out = ingestd("check", config=cfg, env=cli_env())
    assert out.returncode == 2
    assert "daemon.state_path: environment variable STATE_DIR is not set" in out.stderr
    assert not list(tmp_path.glob("$*")), "no folder named after the reference"
    cfg.write_text(text.replace("${STATE_DIR}", "${STATE_DIR:-var}"))
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=cli_env(), check=True)
    assert (tmp_path / "var" / "state.db").exists()
    (tmp_path / "elsewhere").mkdir()
    ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=cli_env(STATE_DIR=str(tmp_path / "elsewhere")),
            check=True)
    assert (tmp_path / "elsewhere" / "state.db").exists()
    # a source's SQL is never expanded: $$ and ${...} there are the warehouse's business
    sql = cfg.read_text().replace("FROM events_raw WHERE", "FROM events_raw WHERE '${NOT_SET}' <> '' AND")
    cfg.write_text(sql)
    assert ingestd("check", config=cfg, env=cli_env()).returncode == 0


# -- the bus's hygiene -------------------------------------------------------------------------------

def test_bus_hygiene_one_stopping_event_stop_time_heartbeat_version_and_the_will(tmp_path, warehouse, broker):
    cfg = bus_config(tmp_path, broker, bus_extra="heartbeat_seconds = 0.5\n")
    watcher = Collector(broker.port, ["ingestd/test/#"])
    proc = start_daemon(cfg)
    wait_for(lambda: online(watcher), what="online")
    wait_for(lambda: len({p.get("heartbeat_at") for t, p, _ in watcher.messages
                          if t == "ingestd/test/state" and isinstance(p, dict)}) >= 3, what="heartbeats")
    stopped_at = dt.datetime.now(dt.UTC)
    stop_daemon(proc)
    wait_for(lambda: watcher.events("daemon.stopping"), what="daemon.stopping")
    time.sleep(0.5)
    assert len(watcher.events("daemon.stopping")) == 1
    started = watcher.events("daemon.started")[0]
    assert started["data"]["version"] and started["data"]["version"] != "unknown"
    offline = [p for t, p, _ in watcher.messages if t == "ingestd/test/state"][-1]
    assert offline["state"] == "offline" and offline["reason"] == "stopped"
    assert abs(dt.datetime.fromisoformat(offline["at"]) - stopped_at) < dt.timedelta(seconds=10)
    seqs = [e["seq"] for e in watcher.events()]
    assert len(seqs) == len(set(seqs)), "no event published twice"

    killed = start_daemon(cfg)
    wait_for(lambda: sum(1 for t, p, _ in watcher.messages if t == "ingestd/test/state"
                         and isinstance(p, dict) and p.get("state") == "online") >= 5, what="online again")
    killed.kill()
    killed.wait(10)
    wait_for(lambda: [p for t, p, _ in watcher.messages if t == "ingestd/test/state"][-1].get("reason") == "lost",
             timeout=30, what="the will")
    lost = [p for t, p, _ in watcher.messages if t == "ingestd/test/state"][-1]
    assert lost["state"] == "offline" and "at" not in lost and "heartbeat_at" in lost["detail"]


def test_the_last_events_of_a_burst_arrive_without_waiting_for_the_fallback_poll(tmp_path, warehouse, broker):
    """Events leave the outbox as soon as their transaction commits; the drainer's 5 s poll is a
    fallback only (a burst's last events used to wait for it)."""
    for i in range(5):
        warehouse.add_events(D - dt.timedelta(days=i), 20)
    cfg = bus_config(tmp_path, broker)
    watcher = Collector(broker.port, ["ingestd/test/event/#", "ingestd/test/state"])
    proc = start_daemon(cfg)
    try:
        wait_for(lambda: online(watcher), what="online")
        for i in range(5):
            day = (D - dt.timedelta(days=i)).isoformat()
            answer, _, _ = asyncio.run(request(broker.port, "reload", {"source": "orders", "day": day}))
            assert answer["status"] == "ok"
        wait_for(lambda: len(watcher.events("load.succeeded")) == 5, timeout=10, what="five loads")
        committed = max(dt.datetime.fromisoformat(e["at"]) for e in watcher.events("load.succeeded"))
        received = dt.datetime.now(dt.UTC)
    finally:
        stop_daemon(proc)
    assert received - committed < dt.timedelta(seconds=3), "the last event waited for the fallback poll"


def test_the_bus_survives_a_failing_request_handler_and_answers_the_next_request(tmp_path, warehouse, broker):
    """In-process, against the real broker: the control layer's `status` is made to fail once
    (there is no way to make it fail from outside), the request gets an error answer, the bus
    logs the traceback, and the next request is answered."""
    from ingestd.bus.server import Bus
    from ingestd.core.config import load_config
    from ingestd.plugin.manager import load_plugins
    from ingestd.service.bootstrap import open_runtime
    from ingestd.service.control import Control
    from ingestd.service.tasks import Tasks

    cfg = bus_config(tmp_path, broker)

    async def scenario() -> list[dict]:
        plugins = load_plugins()
        rt = await open_runtime(load_config(cfg, plugins.registry), plugins)
        control = Control(rt, Tasks())
        calls = {"n": 0}
        real = control.status

        async def flaky(source=None, days=7):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected failure in the handler")
            return await real(source, days)

        control.status = flaky  # type: ignore[method-assign]
        bus = Bus(rt, control)
        task = asyncio.create_task(bus.run())
        try:
            await asyncio.wait_for(bus.connected.wait(), 10)
            answers = [(await request(broker.port, "status", {}))[0] for _ in range(2)]
            return answers
        finally:
            await bus.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await rt.close()

    failed, answered = asyncio.run(scenario())
    assert failed["status"] == "error" and "internal error while handling 'status' (RuntimeError)" in failed["error"]
    assert answered["status"] == "ok" and answered["data"]["sources"][0]["source"] == "orders"
