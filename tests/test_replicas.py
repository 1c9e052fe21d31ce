"""Several daemons on one PostgreSQL state store and one mosquitto, both started by these tests
(`tests/postgres.py`, `tests/broker.py`): every day loaded once, each window fired once, a
backfill request answered once and its days spread over replicas; a replica killed with kill -9
mid-load and mid-backfill, and one paused with SIGSTOP past its lease, whose late commit is refused.

Everything here is real: `ingestd run` processes, psycopg to PostgreSQL, the PostgreSQL sink,
MQTT 5 shared subscriptions on mosquitto. The warehouse is DuckDB files, read only by each replica.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.broker import Mosquitto
from tests.postgres import postgres_cluster  # noqa: F401  (a fixture)
from tests.support import Warehouse, cli_env, slow_plugin, wait_for

PASSWORD = "replicas-pw-Qh7x2"
BASE = "ingestd/cluster"
_databases = itertools.count()


@pytest.fixture(scope="module")
def pg(postgres_cluster):  # noqa: F811
    postgres_cluster.create_user("ingestd", PASSWORD)
    return postgres_cluster


@pytest.fixture
def db(pg):
    """A database of its own for each test, owned by the `ingestd` role."""
    name = f"cluster_{os.getpid()}_{next(_databases)}"
    pg.create_database(name, owner="ingestd")
    return name


@pytest.fixture
def broker(tmp_path):
    folder = tmp_path / "broker"
    folder.mkdir()
    b = Mosquitto(folder).start()
    yield b
    b.stop()


def newest_due_day(now: dt.datetime | None = None) -> dt.date:
    """The newest day a `0 6 * * *` UTC schedule with lag_days = 1 has due at `now`."""
    now = now or dt.datetime.now(dt.UTC)
    window = now.date() if now.hour >= 6 else now.date() - dt.timedelta(days=1)
    return window - dt.timedelta(days=1)


def source_names(n: int) -> list[str]:
    return [f"s{i:02d}" for i in range(n)]


def fill_warehouse(path: Path, sources: list[str], days: list[dt.date], rows: int) -> Warehouse:
    wh = Warehouse(path)
    for i, name in enumerate(sources):
        for d in days:
            wh.add_events(d, rows + i, event=name)
    return wh


def replica_config(folder: Path, replica: str, *, port: int, db: str, broker_port: int, sources: list[str],
                   lease_seconds: float = 6, connection_type: str = "duckdb", max_concurrent_loads: int = 2,
                   lookback: int = 3, recheck: str = '["0 18 * * *"]', batch_rows: int = 1000,
                   warehouse: Path | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    url = f"postgresql://ingestd@127.0.0.1:{port}/{db}"
    text = f"""
[daemon]
state_path = "state/state.db"
state_url = "{url}"
state_password_env = "INGESTD_TEST_PG_PASSWORD"
replica_id = "{replica}"
lease_seconds = {lease_seconds}
max_concurrent_loads = {max_concurrent_loads}
batch_rows = {batch_rows}
retry_attempts = 3
retry_base_seconds = 0.05
retry_max_seconds = 0.2
shutdown_grace_seconds = 5

[bus]
enabled = true
host = "127.0.0.1"
port = {broker_port}
base_topic = "{BASE}"
shared = true
keepalive = 5
reconnect_max_seconds = 1.0
heartbeat_seconds = 2

[sinks.main]
type = "postgres"
url = "{url}"
password_env = "INGESTD_TEST_PG_PASSWORD"

[connections.wh]
type = "{connection_type}"
path = "{warehouse or folder.parent / 'warehouse.duckdb'}"
"""
    for name in sources:
        text += f"""
[sources.{name}]
connection = "wh"
kind = "events"
query = "SELECT ts, user_id, event, value FROM events_raw WHERE event = '{name}' AND ts >= {{start}} AND ts < {{end}}"
schedule = ["0 6 * * *"]
lag_days = 1
[sources.{name}.recheck]
schedule = {recheck}
lookback_days = {lookback}
[sources.{name}.mapping]
timestamp = "ts"
event_name = "event"
event_value = "value"
ids = {{ user_id = "user_id" }}
"""
    path = folder / "daemon.toml"
    path.write_text(text)
    return path


class Replica:
    """One `ingestd run` process; its JSON log lines go to a file (a pipe could fill and block it)."""

    def __init__(self, config: Path, name: str, env: dict[str, str]):
        self.config, self.name = config, name
        self.log = config.parent / "daemon.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ingestd", "-c", str(config), "run"],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)

    def lines(self) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            with_signal(self.proc, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def with_signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return cli_env([slow_plugin(tmp_path)], INGESTD_TEST_PG_PASSWORD=PASSWORD, **extra)


def q(pg, db: str, sql: str, params=None) -> list[tuple]:
    return pg.execute(sql, params, dbname=db)


def count(pg, db: str, sql: str, params=None) -> int:
    """The first value of a count; 0 before the first replica has created the tables."""
    import psycopg
    try:
        return q(pg, db, sql, params)[0][0]
    except psycopg.errors.UndefinedTable:
        return 0


def partitions(pg, db: str) -> dict[tuple[str, dt.date], tuple[str, int]]:
    rows = q(pg, db, "SELECT source, day, status, generation FROM ingestd.partitions")
    return {(s, _day(d)): (st, g) for s, d, st, g in rows}


def _day(value) -> dt.date:
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(str(value))


def runs(pg, db: str) -> list[dict]:
    cols = ["run_id", "source", "day", "trigger", "status", "reason", "generation", "replica", "started_at",
            "finished_at", "backfill_id"]
    rows = q(pg, db, f"SELECT {', '.join(cols)} FROM ingestd.runs")
    out = []
    for r in rows:
        run = dict(zip(cols, r, strict=True)) | {"day": _day(r[2])}
        for key in ("started_at", "finished_at"):
            if isinstance(run[key], str):
                run[key] = dt.datetime.fromisoformat(run[key])
        out.append(run)
    return out


def sink_partitions(pg, db: str) -> dict[tuple[str, dt.date], tuple[int, int]]:
    """(source, day) -> (visible generation, rows) as the PostgreSQL sink serves them, read with SQL."""
    rows = q(pg, db, "SELECT source, day, generation, count(*) FROM analytics.events GROUP BY 1, 2, 3")
    out: dict[tuple[str, dt.date], tuple[int, int]] = {}
    for s, d, g, n in rows:
        assert (s, _day(d)) not in out, f"the sink serves two generations of {s} {d}"
        out[(s, _day(d))] = (g, n)
    return out


def all_loaded(pg, db, keys) -> bool:
    if count(pg, db, "SELECT count(*) FROM ingestd.partitions") < len(keys):
        return False
    parts = partitions(pg, db)
    running = count(pg, db, "SELECT count(*) FROM ingestd.runs WHERE status = 'running'")
    return running == 0 and all(parts.get(k, ("", 0))[0] == "succeeded" for k in keys)


def window_starts(replicas: list[Replica]) -> Counter:
    return Counter((line["source"], line["kind"], line.get("due")) for r in replicas for line in r.lines()
                   if line.get("event") == "window.claimed")


async def mqtt_request(port: int, command: str, body: dict, *, listen_s: float = 3.0) -> list[dict]:
    """Publish one request with an MQTT 5 response topic; return every answer seen until
    `listen_s` after the first (or 20 s without one)."""
    token = f"t-{time.monotonic_ns()}"
    reply = f"{BASE}/response/{command}/{token}"
    answers: list[dict] = []
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply
        props.CorrelationData = token.encode()
        await client.subscribe(reply, qos=1)
        reader = asyncio.create_task(_collect(client, answers))
        await client.publish(f"{BASE}/request/{command}", json.dumps(body).encode(), qos=1, properties=props)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if answers:
                deadline = min(deadline, time.monotonic() + listen_s)
            await asyncio.sleep(0.05)
        reader.cancel()
    return [json.loads(p) for _, p in answers]


async def _collect(client: aiomqtt.Client, into: list) -> None:
    """Every message of the client's subscriptions, appended as (topic, payload) until cancelled.
    One reader for the client's whole life: a read abandoned by a timeout could drop a message."""
    async for m in client.messages:
        into.append((str(m.topic), m.payload))


class EventLog:
    """Every message under `<base>/event/#` and `<base>/replica/#`, collected in a thread."""

    def __init__(self, port: int):
        import threading
        self.port = port
        self.raw: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe(f"{BASE}/event/#", qos=1)
            await client.subscribe(f"{BASE}/replica/#", qos=1)
            reader = asyncio.create_task(_collect(client, self.raw))
            self.ready.set()
            while not self.done.is_set():
                await asyncio.sleep(0.2)
            reader.cancel()

    @property
    def messages(self) -> list[tuple[str, dict]]:
        return [(t, json.loads(p)) for t, p in list(self.raw)]

    def events(self, kind: str) -> list[dict]:
        return [p for t, p in self.messages if "/event/" in t and p.get("type") == kind]

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)


def test_three_replicas_load_every_day_once_fire_each_window_once_and_share_a_backfill(tmp_path, pg, db, broker):
    sources = source_names(30)
    newest = newest_due_day()
    days = [newest - dt.timedelta(days=i) for i in range(3)]
    backfill_days = [newest - dt.timedelta(days=i) for i in range(10, 14)]
    wh = fill_warehouse(tmp_path / "warehouse.duckdb", sources, days + backfill_days, rows=200)
    env = env_for(tmp_path, INGESTD_TEST_SLOW_S="0.05")
    events = EventLog(broker.port)
    replicas = [Replica(replica_config(tmp_path / f"r{i}", f"r{i}", port=pg.port, db=db, broker_port=broker.port,
                                       sources=sources, connection_type="slowduck"), f"r{i}", env)
                for i in (1, 2, 3)]
    try:
        keys = [(s, d) for s in sources for d in days]
        wait_for(lambda: all_loaded(pg, db, keys), timeout=240, interval=0.5, what="the catch-up of 30 sources")
        wait_for(lambda: len(window_starts(replicas)) >= 60, timeout=60, interval=0.5, what="the re-check windows")

        done = runs(pg, db)
        per_day = Counter((r["source"], r["day"]) for r in done if r["status"] == "succeeded")
        assert set(per_day) == set(keys) and set(per_day.values()) == {1}, per_day
        assert {g for st, g in partitions(pg, db).values()} == {1}
        served = sink_partitions(pg, db)
        for i, s in enumerate(sources):
            for d in days:
                assert served[(s, d)] == (1, 200 + i)
        starts = window_starts(replicas)
        assert set(starts.values()) == {1}, [k for k, n in starts.items() if n > 1]
        assert {(s, k) for s, k, _ in starts} == {(s, k) for s in sources for k in ("load", "recheck")}
        spread = Counter(r["replica"] for r in done)
        assert set(spread) == {"r1", "r2", "r3"}, spread
        out = subprocess.run([sys.executable, "-m", "ingestd", "-c", str(replicas[0].config), "status", "--json"],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        assert sorted(r["replica"] for r in json.loads(out.stdout)["replicas"]) == ["r1", "r2", "r3"]
        assert PASSWORD not in out.stdout + out.stderr

        request = {"source": "*", "from": backfill_days[-1].isoformat(), "to": backfill_days[0].isoformat(),
                   "request_id": "bf-shared-1"}
        answers = asyncio.run(mqtt_request(broker.port, "backfill", request))
        assert len(answers) == 1 and answers[0]["status"] == "ok", answers
        backfill_id = answers[0]["data"]["backfill_id"]
        bf_keys = [(s, d) for s in sources for d in backfill_days]
        wait_for(lambda: q(pg, db, "SELECT status FROM ingestd.backfills WHERE id = %s", [backfill_id])[0][0] == "done",
                 timeout=180, interval=0.5, what="the backfill")
        bf_runs = [r for r in runs(pg, db) if r["backfill_id"] == backfill_id]
        assert Counter((r["source"], r["day"]) for r in bf_runs if r["status"] == "succeeded") == Counter(bf_keys)
        assert len({r["replica"] for r in bf_runs}) == 3, Counter(r["replica"] for r in bf_runs)
        again = asyncio.run(mqtt_request(broker.port, "backfill", request))
        assert len(again) == 1 and again[0]["data"]["backfill_id"] == backfill_id

        wait_for(lambda: len(events.events("backfill.done")) >= 1, timeout=30, what="backfill.done")
        expected = {(s, d.isoformat()) for s, d in keys + bf_keys}

        def published() -> Counter:
            return Counter((e["source"], e["day"]) for e in events.events("load.succeeded"))

        try:
            wait_for(lambda: set(published()) >= expected, timeout=30, what="every load.succeeded event")
        finally:
            print("unsent outbox rows:", q(pg, db, "SELECT replica, type, source, payload FROM ingestd.outbox"))
            print("missing events:", expected - set(published()))
        time.sleep(1)
        succeeded = published()
        assert set(succeeded.values()) == {1}, [k for k, n in succeeded.items() if n > 1]
        assert set(succeeded) == expected
        assert len(events.events("backfill.done")) == 1
        assert {e["data"].get("replica") or e.get("replica") for e in events.events("load.succeeded")} == \
            {"r1", "r2", "r3"}
        states = {t: p for t, p in events.messages if t.startswith(f"{BASE}/replica/")}
        assert {f"{BASE}/replica/r{i}/state" for i in (1, 2, 3)} <= set(states)
        assert wh.count(days[0]) > 0
    finally:
        for r in replicas:
            r.stop()
        events.close()


def _overlapping(runs_of_day: list[dict]) -> list[tuple[dict, dict]]:
    spans = [(r["started_at"], r["finished_at"] or dt.datetime.max.replace(tzinfo=dt.UTC), r) for r in runs_of_day]
    return [(a[2], b[2]) for a, b in itertools.combinations(spans, 2) if a[0] < b[1] and b[0] < a[1]]


def test_a_replica_killed_mid_load_and_mid_backfill_leaves_its_days_to_the_others(tmp_path, pg, db, broker):
    sources = source_names(8)
    newest = newest_due_day()
    days = [newest - dt.timedelta(days=i) for i in range(3)]
    backfill_days = [newest - dt.timedelta(days=i) for i in range(10, 16)]
    fill_warehouse(tmp_path / "warehouse.duckdb", sources, days + backfill_days, rows=4000)
    env = env_for(tmp_path, INGESTD_TEST_SLOW_S="0.3")
    replicas = [Replica(replica_config(tmp_path / f"r{i}", f"r{i}", port=pg.port, db=db, broker_port=broker.port,
                                       sources=sources, connection_type="slowduck", lease_seconds=5), f"r{i}", env)
                for i in (1, 2, 3)]
    try:
        wait_for(lambda: count(pg, db, "SELECT count(*) FROM ingestd.replicas") >= 3, timeout=60,
                 what="three replicas")
        answers = asyncio.run(mqtt_request(broker.port, "backfill", {
            "source": "*", "from": backfill_days[-1].isoformat(), "to": backfill_days[0].isoformat()}))
        assert len(answers) == 1 and answers[0]["status"] == "ok", answers
        victim = replicas[2]
        wait_for(lambda: count(pg, db, "SELECT count(*) FROM ingestd.runs WHERE replica = 'r3' AND status = 'running'"
                                       " AND backfill_id IS NOT NULL") >= 1,
                 timeout=120, interval=0.1, what="r3 loading a backfill day")
        victim.proc.kill()
        victim.proc.wait()
        killed_at = dt.datetime.now(dt.UTC)

        keys = [(s, d) for s in sources for d in days + backfill_days]
        try:
            wait_for(lambda: all_loaded(pg, db, keys), timeout=300, interval=0.5, what="the others finishing r3's days")
        finally:
            parts = partitions(pg, db)
            print("not loaded:", {k: parts.get(k) for k in keys if parts.get(k, ("", 0))[0] != "succeeded"})
            print("running:", q(pg, db, "SELECT source, day, replica FROM ingestd.runs WHERE status = 'running'"))
            print("leases:", q(pg, db, "SELECT * FROM ingestd.leases WHERE expires_at > now()"))
            print("windows:", q(pg, db, "SELECT * FROM ingestd.windows"))
        done = runs(pg, db)
        late = [r for r in done if r["replica"] == "r3" and r["status"] == "succeeded" and r["finished_at"] > killed_at]
        assert not late
        interrupted = [r for r in done if r["replica"] == "r3" and r["status"] == "failed"]
        assert interrupted, "r3's interrupted runs were settled"
        for s, d in partitions(pg, db):
            mine = [r for r in done if (r["source"], r["day"]) == (s, d) and r["replica"] != "r3"]
            assert not _overlapping(mine), (s, d)
        served = sink_partitions(pg, db)
        for key in keys:
            assert served[key][0] == partitions(pg, db)[key][1]
            assert served[key][1] == 4000 + sources.index(key[0])
        assert q(pg, db, "SELECT status FROM ingestd.backfills")[0][0] == "done"
    finally:
        for r in replicas:
            r.stop()


def test_a_replica_stalled_past_its_lease_cannot_publish_its_generation(tmp_path, pg, db, broker):
    """r1 starts loading a slow day, is paused with SIGSTOP past its lease; r2, started then, takes
    the window and the day over (settling r1's run as interrupted under a new lease) and publishes
    a newer generation. When r1 resumes, its sink swap is refused (fenced) and the sink keeps r2's
    generation."""
    newest = newest_due_day()
    fill_warehouse(tmp_path / "warehouse.duckdb", ["s00"], [newest], rows=8000)
    cfg = {"port": pg.port, "db": db, "broker_port": broker.port, "sources": ["s00"], "lease_seconds": 5,
           "lookback": 1, "recheck": "[]", "connection_type": "slowduck"}
    r1 = Replica(replica_config(tmp_path / "r1", "r1", **cfg), "r1", env_for(tmp_path, INGESTD_TEST_SLOW_S="0.5"))
    r2 = None
    try:
        wait_for(lambda: count(pg, db, "SELECT count(*) FROM ingestd.runs WHERE replica = 'r1' AND status = 'running'"
                                       " AND rows_fetched > 0") == 1,
                 timeout=120, interval=0.1, what="r1 fetching the day")
        os.kill(r1.proc.pid, signal.SIGSTOP)
        time.sleep(5 + 2)
        r2 = Replica(replica_config(tmp_path / "r2", "r2", **cfg), "r2", env_for(tmp_path, INGESTD_TEST_SLOW_S="0"))
        wait_for(lambda: count(pg, db, "SELECT count(*) FROM ingestd.partitions WHERE status = 'succeeded'"
                                       " AND generation >= 2") == 1, timeout=120, interval=0.2,
                 what="r2 publishing a newer generation")
        status, newer = partitions(pg, db)[("s00", newest)]
        os.kill(r1.proc.pid, signal.SIGCONT)
        wait_for(lambda: any(line.get("event") == "load.fenced" for line in r1.lines()), timeout=120, interval=0.2,
                 what="r1's commit being refused")
        time.sleep(1)
        assert partitions(pg, db)[("s00", newest)] == ("succeeded", newer)
        assert sink_partitions(pg, db)[("s00", newest)] == (newer, 8000)
        r1_runs = [r for r in runs(pg, db) if r["replica"] == "r1"]
        assert r1_runs and all(r["status"] == "failed" and r["generation"] < newer for r in r1_runs), r1_runs
        assert any("fenced out" in (r["reason"] or "") for r in r1_runs) or \
            any("interrupted" in (r["reason"] or "") for r in r1_runs), r1_runs
        assert r1.proc.poll() is None, "r1 goes on running after its commit was refused"
    finally:
        r1.stop()
        if r2 is not None:
            r2.stop()
