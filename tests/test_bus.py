"""The MQTT bus against a real mosquitto that this module starts on a free loopback port."""

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import time

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.broker import Mosquitto
from tests.support import cli_env, ingestd, sink_rows, slow_plugin, spawn_ingestd, state_query, wait_for, write_config

D = dt.date(2026, 11, 20)
OUTAGE_S = float(os.environ.get("INGESTD_TEST_OUTAGE_S", "30"))


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(_folder(tmp_path, "broker")).start()
    yield b
    b.stop()


def _folder(tmp_path, name):
    path = tmp_path / name
    path.mkdir(exist_ok=True)
    return path


def bus_config(tmp_path, broker, **kw):
    bus = (f'enabled = true\nhost = "127.0.0.1"\nport = {broker.port}\nbase_topic = "ingestd/test"\n'
           f'keepalive = 5\nreconnect_max_seconds = 1.0\n' + kw.pop("bus_extra", ""))
    return write_config(tmp_path, bus=bus, schedule='["0 0 1 1 *"]', recheck="[]", lookback=1, **kw)


class Collector:
    """Subscribes (in a thread of its own event loop) and keeps every message it sees. Every
    collector is closed when its test ends (`_close_collectors`)."""

    open: list["Collector"] = []

    def __init__(self, port, topics, *, client_id=None, persistent=False):
        import threading
        self.port, self.topics = port, topics
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None
        self.messages: list[tuple[str, dict | bytes, bool]] = []
        self.ready = threading.Event()
        self.stop_flag = False
        self.client_id = client_id
        self.persistent = persistent
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        Collector.open.append(self)
        self.thread.start()
        assert self.ready.wait(10), "collector did not subscribe"

    def close(self):
        self.stop_flag = True
        if self.thread.is_alive() and self.loop is not None and self.task is not None:
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)

    async def _main(self):
        self.loop, self.task = asyncio.get_running_loop(), asyncio.current_task()
        try:
            await self._run()
        except asyncio.CancelledError:
            pass

    async def _run(self):
        while not self.stop_flag:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier=self.client_id,
                                          clean_session=False if self.persistent else None,
                                          protocol=aiomqtt.ProtocolVersion.V311) as client:
                    for t in self.topics:
                        await client.subscribe(t, qos=1)
                    self.ready.set()
                    async for m in client.messages:
                        try:
                            payload = json.loads(m.payload)
                        except ValueError:
                            payload = m.payload
                        self.messages.append((str(m.topic), payload, m.retain))
                        if self.stop_flag:
                            return
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    def events(self, kind=None):
        return [p for t, p, _ in self.messages if "/event/" in t and (kind is None or p.get("type") == kind)]


@pytest.fixture(autouse=True)
def _close_collectors():
    yield
    while Collector.open:
        Collector.open.pop().close()


async def request(port, command, body, *, props=True, timeout=15, username=None, password=None):
    token = f"t-{time.monotonic_ns()}"
    reply = f"ingestd/test/response/{command}/{token}"
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5,
                              username=username, password=password) as client:
        p = Properties(PacketTypes.PUBLISH)
        p.ResponseTopic = reply
        p.CorrelationData = token.encode()
        await client.subscribe(reply, qos=1)
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        await client.publish(f"ingestd/test/request/{command}", payload, qos=1, properties=p)
        async with asyncio.timeout(timeout):
            async for m in client.messages:
                return json.loads(m.payload), m.properties.CorrelationData, token.encode()


def start_daemon(cfg, env=None):
    proc = spawn_ingestd("run", config=cfg, env=env)
    return proc


def stop_daemon(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.stdout.read() + proc.stderr.read()


def test_backfill_requested_over_mqtt_loads_the_days(tmp_path, warehouse, broker):
    for i in range(3):
        warehouse.add_events(D - dt.timedelta(days=i), 100 + i)
    cfg = bus_config(tmp_path, broker)
    watcher = Collector(broker.port, ["ingestd/test/#"])
    proc = start_daemon(cfg)
    try:
        wait_for(lambda: any(t == "ingestd/test/state" and p.get("state") == "online" for t, p, _ in watcher.messages),
                 what="online state")
        answer, corr, token = asyncio.run(request(broker.port, "backfill", {
            "source": "orders", "from": (D - dt.timedelta(days=2)).isoformat(), "to": D.isoformat(),
            "request_id": "req-1", "transaction": "abc"}))
        assert corr == token  # MQTT 5 correlation data round-trips
        assert answer["status"] == "ok" and answer["transaction"] == "abc" and answer["error"] is None
        assert answer["data"]["days"] == 3 and answer["data"]["created"] is True
        wait_for(lambda: watcher.events("backfill.done"), what="backfill.done")
        again, _, _ = asyncio.run(request(broker.port, "backfill", {
            "source": "orders", "from": (D - dt.timedelta(days=2)).isoformat(), "to": D.isoformat(),
            "request_id": "req-1"}))
        assert again["data"]["created"] is False
        wait_for(lambda: any("/source/orders/state" in t for t, _, _ in watcher.messages), what="source state")
    finally:
        out = stop_daemon(proc)
    assert state_query(tmp_path / "state.db", "SELECT count(*) FROM backfills") == [(1,)], out
    for i in range(3):
        assert sink_rows(tmp_path / "analytics.duckdb", "orders", D - dt.timedelta(days=i)) == 100 + i
    types = [e["type"] for e in watcher.events()]
    assert types.count("load.succeeded") == 3 and types.count("backfill.progress") == 3
    seqs = [e["seq"] for e in watcher.events()]
    assert seqs == sorted(seqs)
    done = watcher.events("backfill.done")[0]
    assert done["data"]["status"] == "done" and done["data"]["succeeded"] == 3
    offline = [p for t, p, _ in watcher.messages if t == "ingestd/test/state"][-1]
    assert offline["state"] == "offline"


def test_response_topic_without_mqtt5_properties_and_cli_request(tmp_path, warehouse, broker):
    warehouse.add_events(D, 10)
    cfg = bus_config(tmp_path, broker)
    watcher = Collector(broker.port, ["ingestd/test/response/#", "ingestd/test/state"])
    proc = start_daemon(cfg)
    try:
        wait_for(lambda: any(p.get("state") == "online" for t, p, _ in watcher.messages if t.endswith("/state")),
                 what="online")

        async def v311():
            async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V311) as c:
                await c.publish("ingestd/test/request/status", json.dumps({"transaction": 7}).encode(), qos=1)
        asyncio.run(v311())
        wait_for(lambda: [p for t, p, _ in watcher.messages if t == "ingestd/test/response/status"], what="response")
        resp = [p for t, p, _ in watcher.messages if t == "ingestd/test/response/status"][0]
        assert resp["status"] == "ok" and resp["transaction"] == 7
        assert resp["data"]["sources"][0]["source"] == "orders"

        out = ingestd("request", "ready", "orders", "--day", D.isoformat(), config=cfg)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["data"]["trigger"] == "ready"
        wait_for(lambda: state_query(tmp_path / "state.db",
                                     "SELECT 1 FROM runs WHERE trigger = 'ready' AND status = 'succeeded'"),
                 what="ready load")
        out = ingestd("request", "backfill", "nope", "--from", "2026-01-01", "--to", "2026-01-02", config=cfg)
        assert out.returncode == 1
        assert "unknown source 'nope'" in out.stdout
    finally:
        stop_daemon(proc)


def test_will_message_says_offline_after_kill_9(tmp_path, warehouse, broker):
    cfg = bus_config(tmp_path, broker)
    proc = start_daemon(cfg)
    watcher = Collector(broker.port, ["ingestd/test/state"])
    wait_for(lambda: any(p.get("state") == "online" for _, p, _ in watcher.messages), what="online")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: watcher.messages[-1][1].get("state") == "offline", timeout=20, what="will message")
    late = Collector(broker.port, ["ingestd/test/state"])  # retained: a new subscriber sees offline too
    wait_for(lambda: late.messages, what="retained state")
    assert late.messages[0][1]["state"] == "offline" and late.messages[0][2] is True


BAD_REQUESTS = [
    ("backfill", b"not json", "not JSON"),
    ("backfill", b"[1, 2]", "must be a JSON object"),
    ("backfill", json.dumps({"source": "orders", "from": "2026-01-02"}).encode(), "missing field 'to'"),
    ("backfill", json.dumps({"source": 5, "from": "2026-01-01", "to": "2026-01-02"}).encode(), "must be a string"),
    ("backfill", json.dumps({"source": "orders", "from": "2026-01-05", "to": "2026-01-01"}).encode(), "is after"),
    ("backfill", json.dumps({"source": "orders", "from": "2026-13-01", "to": "2026-01-01"}).encode(), "not a date"),
    ("backfill", json.dumps({"source": "orders", "from": "2020-01-01", "to": "2026-01-01"}).encode(),
     "max_backfill_days"),
    ("backfill", json.dumps({"source": "ghost", "from": "2026-01-01", "to": "2026-01-01"}).encode(), "unknown source"),
    ("backfill", json.dumps({"source": "orders", "from": "2026-01-01", "to": "2026-01-01", "x": 1}).encode(),
     "unknown field 'x'"),
    ("explode", b"{}", "unknown command 'explode'"),
    ("ready", json.dumps({"source": "orders", "day": "yesterday"}).encode(), "not a date"),
    ("cancel", json.dumps({"backfill_id": 99}).encode(), "no running backfill"),
    ("status", b"x" * 70000, "larger than 65536"),
]


def test_bad_requests_get_an_error_answer_and_change_nothing(tmp_path, warehouse, broker):
    cfg = bus_config(tmp_path, broker)
    proc = start_daemon(cfg)
    watcher = Collector(broker.port, ["ingestd/test/state"])
    try:
        wait_for(lambda: any(p.get("state") == "online" for _, p, _ in watcher.messages), what="online")
        wait_for(lambda: state_query(tmp_path / "state.db", "SELECT 1 FROM windows"), what="start-up catch-up")
        before = state_query(tmp_path / "state.db",
                             "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM backfills)")
        for command, payload, message in BAD_REQUESTS:
            answer, _, _ = asyncio.run(request(broker.port, command, payload))
            assert answer["status"] == "error", (command, payload[:50], answer)
            assert message in answer["error"], (message, answer["error"])
        assert proc.poll() is None
        after = state_query(tmp_path / "state.db",
                            "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM backfills)")
        assert before == after
    finally:
        stop_daemon(proc)


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_broker_outage_during_a_backfill_loses_no_event(tmp_path, warehouse, how):
    """The broker is stopped (SIGTERM) for OUTAGE_S seconds (30 by default), or killed (SIGKILL)
    for a sixth of that, while a backfill runs; the subscriber has a persistent session (saved
    every second, so it outlives a kill), so what the daemon publishes after the restart reaches
    it. The daemon's outbox holds every event the broker did not acknowledge."""
    broker = Mosquitto(_folder(tmp_path, "broker"), extra_conf=(
        f"allow_anonymous true\npersistence true\npersistence_location {tmp_path / 'broker'}/\n"
        "autosave_interval 1\n"))
    broker.conf.write_text(broker.conf.read_text().replace("persistence false\n", ""))
    broker.start()
    days = [D - dt.timedelta(days=i) for i in range(9, -1, -1)]
    for day in days:
        warehouse.add_events(day, 3000)
    cfg = bus_config(tmp_path, broker, connection_type="slowduck", extra_daemon="max_concurrent_loads = 1")
    env = cli_env([slow_plugin(tmp_path)], INGESTD_TEST_SLOW_S=str(max(0.05, OUTAGE_S / 60)))
    watcher = Collector(broker.port, ["ingestd/test/event/#", "ingestd/test/state"], client_id="outage-watcher",
                        persistent=True)
    proc = start_daemon(cfg, env)
    try:
        wait_for(lambda: any(t.endswith("/state") and p.get("state") == "online" for t, p, _ in watcher.messages),
                 what="online")
        answer, _, _ = asyncio.run(request(broker.port, "backfill", {
            "source": "orders", "from": days[0].isoformat(), "to": days[-1].isoformat()}))
        assert answer["status"] == "ok"
        wait_for(lambda: watcher.events("load.succeeded"), what="first load")
        time.sleep(1.5)  # the broker's autosave has the watcher's session
        broker.stop() if how == "stopped" else broker.kill()
        stopped_at = time.monotonic()
        wait_for(lambda: state_query(tmp_path / "state.db", "SELECT count(*) FROM outbox")[0][0] > 0,
                 what="events queued in the outbox")
        outage = OUTAGE_S if how == "stopped" else OUTAGE_S / 6
        time.sleep(max(0.0, outage - (time.monotonic() - stopped_at)))
        loaded_during_outage = state_query(tmp_path / "state.db",
                                           "SELECT count(*) FROM runs WHERE status = 'succeeded'")[0][0]
        broker.start()
        wait_for(lambda: watcher.events("backfill.done"), timeout=120, what="backfill.done after the outage")
        wait_for(lambda: state_query(tmp_path / "state.db", "SELECT count(*) FROM outbox")[0][0] == 0,
                 what="outbox drained")
    finally:
        watcher.stop_flag = True
        stop_daemon(proc)
        broker.stop()
    assert loaded_during_outage >= 2  # the daemon kept ingesting while the broker was away
    seen: dict[int, dict] = {}
    order = []
    for e in watcher.events():
        if e["seq"] not in seen:
            seen[e["seq"]] = e
            order.append(e["seq"])
    assert order == sorted(order)
    events = [seen[s] for s in order]
    bf = [e for e in events if e["type"].startswith(("backfill", "load"))]
    assert [e["type"] for e in bf].count("load.succeeded") == len(days)
    assert [e["type"] for e in bf].count("backfill.progress") == len(days)
    assert [e["data"]["done"] for e in bf if e["type"] == "backfill.progress"] == list(range(1, len(days) + 1))
    assert bf[-1]["type"] == "backfill.done"


def test_contrib_acl_lets_only_the_operator_trigger_a_backfill(tmp_path, warehouse):
    """mosquitto runs the shipped contrib/mosquitto configuration and ACL (paths and port
    adapted to this test); users are made with the real mosquitto_passwd."""
    from pathlib import Path

    from tests.broker import find, free_port
    root = Path(__file__).resolve().parent.parent / "contrib" / "mosquitto"
    folder = _folder(tmp_path, "secure")
    passwd = folder / "passwd"
    users = {"ingestd": "daemon-secret-1", "operator": "op-secret-2", "viewer": "view-secret-3"}
    for i, (user, pw) in enumerate(users.items()):
        subprocess.run([find("mosquitto_passwd"), *(["-c"] if i == 0 else []), "-b", str(passwd), user, pw], check=True)
    acl = folder / "ingestd.acl"
    acl.write_text((root / "ingestd.acl").read_text())
    port = free_port()
    conf = (root / "ingestd.conf").read_text()
    conf = (conf.replace("/etc/mosquitto/ingestd.passwd", str(passwd)).replace("/etc/mosquitto/ingestd.acl", str(acl))
            .replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1"))
    broker = Mosquitto(folder, port=port, extra_conf="")
    broker.conf.write_text(conf + "\npersistence false\nuser root\n")
    broker.start()
    (folder / "bus-password").write_text(users["ingestd"])
    warehouse.add_events(D, 10)
    cfg = bus_config(tmp_path, broker, bus_extra=f'username = "ingestd"\npassword_file = "{folder / "bus-password"}"\n')
    proc = start_daemon(cfg)
    try:
        async def online():
            async with aiomqtt.Client("127.0.0.1", port, username="viewer", password=users["viewer"]) as c:
                await c.subscribe("ingestd/test/state", qos=1)
                async with asyncio.timeout(20):
                    async for m in c.messages:
                        if json.loads(m.payload)["state"] == "online":
                            return
        asyncio.run(online())
        body = {"source": "orders", "from": D.isoformat(), "to": D.isoformat()}

        async def anonymous():
            async with aiomqtt.Client("127.0.0.1", port) as c:
                await c.publish("ingestd/test/request/backfill", json.dumps(body).encode(), qos=1)
        with pytest.raises(aiomqtt.MqttError):
            asyncio.run(anonymous())
        with pytest.raises(aiomqtt.MqttError):
            asyncio.run(request(port, "backfill", body, username="operator", password="wrong", timeout=3))
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            asyncio.run(request(port, "backfill", body, username="viewer", password=users["viewer"], timeout=3))
        assert state_query(tmp_path / "state.db", "SELECT count(*) FROM backfills") == [(0,)]
        answer, _, _ = asyncio.run(request(port, "backfill", body, username="operator", password=users["operator"]))
        assert answer["status"] == "ok"
        assert state_query(tmp_path / "state.db", "SELECT count(*) FROM backfills") == [(1,)]
        for secret in users.values():
            assert secret not in json.dumps(answer)
    finally:
        out = stop_daemon(proc)
        broker.stop()
    assert users["ingestd"] not in out


def test_without_a_broker_the_daemon_ingests_and_publishes_once_one_appears(tmp_path, warehouse):
    """MQTT 3.1.1 this time. No broker at start: the daemon loads anyway, keeps its events in the
    outbox, and publishes them in order when the broker comes up."""
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    warehouse.add_events(yesterday, 40)
    broker = Mosquitto(_folder(tmp_path, "late-broker"))
    cfg = bus_config(tmp_path, broker, bus_extra='protocol = "3.1.1"\n')
    cfg.write_text(cfg.read_text().replace('schedule = ["0 0 1 1 *"]', 'schedule = ["0 0 * * *"]'))
    proc = start_daemon(cfg)
    try:
        wait_for(lambda: state_query(tmp_path / "state.db", "SELECT 1 FROM runs WHERE status = 'succeeded'"),
                 what="a load without a broker")
        assert state_query(tmp_path / "state.db", "SELECT count(*) FROM outbox")[0][0] >= 2
        broker.start()
        watcher = Collector(broker.port, ["ingestd/test/#"])
        wait_for(lambda: state_query(tmp_path / "state.db", "SELECT count(*) FROM outbox")[0][0] == 0,
                 what="the outbox to drain")
        wait_for(lambda: watcher.events("load.succeeded"), what="the queued load event")
        async def status311():
            async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V311) as c:
                await c.subscribe("ingestd/test/response/status", qos=1)
                await c.publish("ingestd/test/request/status", b'{"transaction": "x"}', qos=1)
                async with asyncio.timeout(15):
                    async for m in c.messages:
                        return json.loads(m.payload)
        answer = asyncio.run(status311())
        assert answer["status"] == "ok" and answer["transaction"] == "x"
    finally:
        out = stop_daemon(proc)
        broker.stop()
    attempts = [ln for ln in out.splitlines() if "bus.disconnected" in ln]
    assert attempts, out[-2000:]
    seqs = [e["seq"] for e in watcher.events()]
    assert seqs == sorted(seqs) and len(seqs) >= 2


def _tls_material(folder):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ingestd-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    (folder / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.crt", "-extfile", "san.ext")


def test_tls_with_a_ca_file_and_a_client_certificate(tmp_path, warehouse):
    import ssl
    folder = _folder(tmp_path, "tls")
    _tls_material(folder)
    broker = Mosquitto(folder, extra_conf=(
        f"allow_anonymous true\ncafile {folder / 'ca.crt'}\ncertfile {folder / 'server.crt'}\n"
        f"keyfile {folder / 'server.key'}\nrequire_certificate true\n"))
    broker.start()
    cfg = bus_config(tmp_path, broker, bus_extra=(
        f'tls = true\nca_file = "{folder / "ca.crt"}"\ncert_file = "{folder / "client.crt"}"\n'
        f'key_file = "{folder / "client.key"}"\n'))
    proc = start_daemon(cfg)

    async def watch():
        tls = aiomqtt.TLSParameters(ca_certs=str(folder / "ca.crt"), certfile=str(folder / "client.crt"),
                                    keyfile=str(folder / "client.key"), cert_reqs=ssl.CERT_REQUIRED)
        async with aiomqtt.Client("127.0.0.1", broker.port, tls_params=tls) as c:
            await c.subscribe("ingestd/test/state", qos=1)
            async with asyncio.timeout(20):
                async for m in c.messages:
                    if json.loads(m.payload)["state"] == "online":
                        return True
    try:
        assert asyncio.run(watch())
    finally:
        stop_daemon(proc)
        broker.stop()


def test_a_ready_request_loads_the_day_although_the_ready_query_says_no(tmp_path, warehouse, broker):
    """Issue 14: `ready` over MQTT is the user's word that the day is complete; it loads now,
    whatever the ready_query answers, and a day in the future is refused with an error answer."""
    warehouse.add_events(D, 40)
    warehouse.execute("CREATE TABLE markers (day DATE)")
    cfg = bus_config(tmp_path, broker)
    cfg.write_text(cfg.read_text().replace("max_reject_pct = 1.0", 'max_reject_pct = 1.0\n'
                                           'ready_query = "SELECT count(*) > 0 FROM markers WHERE day = {day}"'))
    watcher = Collector(broker.port, ["ingestd/test/#"])
    proc = start_daemon(cfg)
    try:
        wait_for(lambda: any(t == "ingestd/test/state" and p.get("state") == "online" for t, p, _ in watcher.messages),
                 what="online state")
        answer, _, _ = asyncio.run(request(broker.port, "ready", {"source": "orders", "day": D.isoformat()}))
        assert answer["status"] == "ok" and answer["data"]["accepted"] is True, answer
        wait_for(lambda: watcher.events("load.succeeded"), what="the ready load")
        future = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=3)).isoformat()
        refused, _, _ = asyncio.run(request(broker.port, "ready", {"source": "orders", "day": future}))
        assert refused["status"] == "error" and "is in the future" in refused["error"]
    finally:
        stop_daemon(proc)
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 40
    done = watcher.events("load.succeeded")[0]
    assert done["data"]["trigger"] == "ready" and done["data"]["rows"] == 40
    assert not [e for e in watcher.events("load.empty") if e["day"] == D.isoformat()]
    assert state_query(tmp_path / "state.db", "SELECT ready_at IS NOT NULL FROM partitions WHERE day = ?",
                       (D.isoformat(),)) == [(1,)]
