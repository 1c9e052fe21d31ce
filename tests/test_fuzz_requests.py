"""Fuzzing the bus (issue 15): for each request command, 1,000 generated requests (wrong types,
huge numbers, odd unicode, NUL bytes, nested objects, very long strings, dates at the calendar's
edges, bytes that are no JSON) go through a real mosquitto to a running daemon. Each gets an
answer of the documented shape with a specific error (never an internal one); afterwards the
daemon still answers a valid request, and the state store and the sink are unchanged.

Every generated request is invalid by construction (a source that is not configured, a
backfill id that does not exist), so none of them may change anything."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import threading
import time
from pathlib import Path

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingestd.bus.mqtt import send_without_delay
from tests.broker import Mosquitto
from tests.support import Warehouse, spawn_ingestd, state_query, wait_for, write_config

D = dt.date(2026, 11, 20)
PER_COMMAND = 1000

CONFIGURED = {"orders", "*"}


class Requester:
    """One MQTT 5 client in a thread of its own, sending requests and waiting for their answers."""

    def __init__(self, port: int):
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client: aiomqtt.Client | None = None
        self.waiting: dict[bytes, asyncio.Future] = {}
        self.reader: asyncio.Future | None = None
        asyncio.run_coroutine_threadsafe(self._connect(), self.loop).result(10)

    async def _connect(self) -> None:
        self.client = aiomqtt.Client("127.0.0.1", self.port, protocol=aiomqtt.ProtocolVersion.V5)
        await self.client.__aenter__()
        send_without_delay(self.client)
        await self.client.subscribe("fuzz/answers/#", qos=1)
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for m in self.client.messages:
            future = self.waiting.pop(m.properties.CorrelationData, None)
            if future is not None and not future.done():
                future.set_result(json.loads(m.payload))

    async def _send(self, command: str, payload: bytes, token: bytes) -> dict:
        future = self.loop.create_future()
        self.waiting[token] = future
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "fuzz/answers/x"
        props.CorrelationData = token
        await self.client.publish(f"ingestd/test/request/{command}", payload, qos=1, properties=props)
        return await asyncio.wait_for(future, 15)

    def send(self, command: str, payload: bytes) -> dict:
        token = f"{time.monotonic_ns()}".encode()
        return asyncio.run_coroutine_threadsafe(self._send(command, payload, token), self.loop).result(20)

    def close(self) -> None:
        async def stop():
            self.reader.cancel()
            await self.client.__aexit__(None, None, None)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def snapshot(tmp_path: Path) -> tuple[str, bytes]:
    con = sqlite3.connect(f"file:{tmp_path / 'state.db'}?mode=ro", uri=True)
    try:
        dump = "\n".join(con.iterdump())
    finally:
        con.close()
    return dump, (tmp_path / "analytics.duckdb").read_bytes()


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = Mosquitto(folder).start()
    Warehouse(tmp_path / "warehouse.duckdb").add_events(D, 100)
    cfg = write_config(tmp_path, bus=f'enabled = true\nport = {broker.port}\nbase_topic = "ingestd/test"\n'
                                     'heartbeat_seconds = 3600', schedule='["0 0 1 1 *"]', recheck="[]", lookback=1)
    proc = spawn_ingestd("run", config=cfg)
    requester = None
    try:
        wait_for(lambda: state_query(tmp_path / "state.db", "SELECT 1 FROM windows WHERE kind = 'load'"),
                 what="the start-up window")
        wait_for(lambda: state_query(tmp_path / "state.db", "SELECT count(*) FROM outbox") == [(0,)],
                 what="the outbox to drain")
        requester = Requester(broker.port)
        assert requester.send("status", b"{}")["status"] == "ok"
        yield tmp_path, requester, snapshot(tmp_path)
    finally:
        if requester:
            requester.close()
        proc.terminate()
        proc.wait(30)
        broker.stop()


def not_configured(text: str) -> bool:
    return text not in CONFIGURED


texts = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Cs", "Co", "Zs", "So"]), max_size=10),
    st.sampled_from(["", "\x00", "orders\x00", " orders", "ORDERS", "\u202eorders", "../../etc/passwd"]),
    st.text(min_size=300, max_size=2000),
).filter(not_configured)
dates = st.one_of(
    st.sampled_from(["0001-01-01", "9999-12-31", "1899-12-31", "2200-01-01", "2026-02-30", "2026-W46-1",
                     "20261120", "2026-11-20T00:00:00", "2026-11-20\n", "", "yesterday", "2026-13-01"]),
    st.dates().map(dt.date.isoformat), st.text(max_size=12))
numbers = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False),
                    st.sampled_from([0, -1, 2**63, 2**63 - 1, 10**30, 1e308]))
json_values = st.recursive(st.none() | st.booleans() | numbers | texts | dates,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3),
                           max_leaves=10)
FIELDS = {
    "backfill": {"source": texts, "from": dates, "to": dates, "request_id": texts | numbers, "missing": json_values},
    "ready": {"source": texts, "day": dates},
    "reload": {"source": texts, "day": dates},
    "status": {"source": texts},
    "cancel": {"backfill_id": numbers | texts | json_values},
    "preview": {"source": texts, "day": dates, "rows": numbers | json_values},
}


def bodies(command: str) -> st.SearchStrategy[bytes]:
    fields = FIELDS[command]
    structured = st.fixed_dictionaries({}, optional={**fields, "transaction": json_values,
                                                     "extra": json_values}).map(
        lambda d: json.dumps(d).encode())
    shaped = st.fixed_dictionaries(fields).map(lambda d: json.dumps(d).encode())
    raw = st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                    st.integers(1, 40).map(lambda n: ("[" * (n * 1000) + "]" * (n * 1000)).encode()),
                    st.just(b"x" * 70_000))
    return st.one_of(shaped, structured, raw)


MUTATING = {"backfill", "ready", "reload", "cancel"}


@pytest.mark.parametrize("command", sorted(FIELDS))
def test_a_thousand_generated_requests_get_specific_errors_and_change_nothing(fuzz_daemon, command):
    tmp_path, requester, before = fuzz_daemon
    seen = {"n": 0}

    @settings(max_examples=PER_COMMAND, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(payload=bodies(command))
    def one(payload: bytes) -> None:
        seen["n"] += 1
        answer = requester.send(command, payload)
        assert set(answer) == {"status", "data", "error", "transaction"}, answer
        if command in MUTATING:
            assert answer["status"] == "error", (payload[:200], answer)
        if answer["status"] == "error":
            assert isinstance(answer["error"], str) and answer["error"]
            assert "internal error" not in answer["error"], (payload[:200], answer)
            assert answer["data"] is None

    one()
    assert seen["n"] >= PER_COMMAND
    assert requester.send("status", json.dumps({"source": "orders"}).encode())["status"] == "ok"
    assert snapshot(tmp_path) == before, "an invalid request changed the state store or the sink"
