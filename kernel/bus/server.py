"""The MQTT bus on aiomqtt 2: lifecycle events out (from the durable outbox), requests in.

Topics under `ingestd/<instance>` (or `[bus].base_topic`):
- `state` (retained): online/offline; the will message publishes offline if the process dies.
- `event/<source>/<type>` (QoS 1): each outbox row, in order, deleted only after the PUBACK.
  The payload carries `seq`, the outbox sequence number, so subscribers can drop redeliveries.
- `source/<source>/state` (retained): last loaded day, last status, next windows.
- `request/<command>` in, answered on `response/<command>` or the MQTT 5 response topic.
aiomqtt does not reconnect by itself: `run` reconnects forever with backoff and jitter, while
the daemon keeps ingesting and the outbox keeps the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import random
import socket
from typing import TYPE_CHECKING, Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..core import logs
from ..service.views import source_status
from ..core.config import BusSection
from ..service.commands import COMMANDS, answer, handle

if TYPE_CHECKING:
    from ..service.daemon import Daemon

log = logs.get("ingestd.bus")


async def _first_failure(*coros) -> None:
    """Run coroutines together; when one fails, cancel the others and raise its error."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def base_topic(bus: BusSection, instance: str) -> str:
    return bus.base_topic or f"ingestd/{instance}"


def make_client(bus: BusSection, client_id: str, *, will: aiomqtt.Will | None = None,
                username: str | None = None, password: str | None = None) -> aiomqtt.Client:
    tls = None
    if bus.tls or bus.ca_file:
        tls = aiomqtt.TLSParameters(ca_certs=bus.ca_file, certfile=bus.cert_file, keyfile=bus.key_file)
    protocol = aiomqtt.ProtocolVersion.V5 if bus.protocol == "5" else aiomqtt.ProtocolVersion.V311
    return aiomqtt.Client(
        bus.host, bus.port, identifier=client_id, protocol=protocol, will=will, keepalive=bus.keepalive,
        username=username if username is not None else bus.username,
        password=password if password is not None else (bus.password.reveal() if bus.password else None),
        tls_params=tls, timeout=10.0)


class Bus:
    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        cfg = daemon.config
        self.cfg = cfg.bus
        self.instance = cfg.instance()
        self.base = base_topic(cfg.bus, self.instance)
        self.client_id = cfg.bus.client_id or f"ingestd-{self.instance}"
        self.client: aiomqtt.Client | None = None
        self.pending = asyncio.Event()
        self.dirty_sources: set[str] = set(cfg.sources)
        self.connected = asyncio.Event()
        self.closing = False
        daemon.rt.dispatch.listeners.append(self._on_event)

    def _on_event(self, event) -> None:
        self.pending.set()
        if event.source:
            self.dirty_sources.add(event.source)

    def _state(self, state: str) -> bytes:
        return json.dumps({"state": state, "instance": self.instance,
                           "at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")}).encode()

    async def run(self) -> None:
        attempt = 0
        will = aiomqtt.Will(f"{self.base}/state", self._state("offline"), qos=1, retain=True)
        while not self.closing:
            client = make_client(self.cfg, self.client_id, will=will)
            try:
                async with client:
                    self.client = client
                    attempt = 0
                    log.info("bus.connected", host=self.cfg.host, port=self.cfg.port, base=self.base)
                    await client.subscribe(f"{self.base}/request/+", qos=1)
                    await client.publish(f"{self.base}/state", self._state("online"), qos=1, retain=True)
                    self.connected.set()
                    self.dirty_sources |= set(self.daemon.config.sources)
                    self.pending.set()
                    await _first_failure(self._drain_outbox(client), self._serve_requests(client))
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self.client = None
                if self.closing:
                    return
                attempt += 1
                delay = min(self.cfg.reconnect_max_seconds, 0.5 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
                log.warning("bus.disconnected", error=str(exc), attempt=attempt, retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
                self.client = None

    async def _drain_outbox(self, client: aiomqtt.Client) -> None:
        state = self.daemon.rt.state
        while True:
            batch = await state.outbox_batch(100)
            for seq, kind, source, payload in batch:
                topic = f"{self.base}/event/{source or '_daemon'}/{kind}"
                await client.publish(topic, json.dumps({**payload, "seq": seq}).encode(), qos=1)
                await state.outbox_delete([seq])
            if self.dirty_sources:
                await self._publish_source_states(client)
            if len(batch) < 100:
                self.pending.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.pending.wait(), 5.0)

    async def _publish_source_states(self, client: aiomqtt.Client) -> None:
        rt = self.daemon.rt
        now = dt.datetime.now(dt.UTC)
        names, self.dirty_sources = self.dirty_sources, set()
        for name in sorted(names):
            if name not in self.daemon.config.sources:
                continue
            s = await source_status(self.daemon.config, rt.state, name, 0, now)
            payload = {k: s[k] for k in ("source", "last_loaded_day", "last_status", "next_load", "next_recheck")}
            last = await rt.state.partitions(name)
            loaded = [p.day for p in last if p.generation > 0]
            payload["last_loaded_day"] = max(loaded).isoformat() if loaded else None
            await client.publish(f"{self.base}/source/{name}/state", json.dumps(payload, default=str).encode(),
                                 qos=1, retain=True)

    async def _serve_requests(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            command = str(message.topic).rsplit("/", 1)[-1]
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
            try:
                result = await handle(self.daemon, command, payload, self.cfg.max_payload_bytes)
            except Exception as exc:  # a request must never take the bus down
                log.error("request.failed", command=command, error=repr(exc))
                result = answer("error", error=f"internal error: {type(exc).__name__}")
            log.info("request", command=command, status=result["status"], error=result["error"])
            await self._respond(client, message, command, result)

    async def _respond(self, client: aiomqtt.Client, message: aiomqtt.Message, command: str, result: dict) -> None:
        props_in = message.properties
        topic = getattr(props_in, "ResponseTopic", None) if props_in is not None else None
        props = None
        if topic:
            props = Properties(PacketTypes.PUBLISH)
            corr = getattr(props_in, "CorrelationData", None)
            if corr is not None:
                props.CorrelationData = corr
        await client.publish(topic or f"{self.base}/response/{command}", json.dumps(result, default=str).encode(),
                             qos=1, properties=props)

    async def close(self) -> None:
        """Flush what the outbox holds (briefly), publish offline, and disconnect."""
        self.closing = True
        client = self.client
        if client is not None and self.connected.is_set():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    for seq, kind, source, payload in await self.daemon.rt.state.outbox_batch(1000):
                        await client.publish(f"{self.base}/event/{source or '_daemon'}/{kind}",
                                             json.dumps({**payload, "seq": seq}).encode(), qos=1)
                        await self.daemon.rt.state.outbox_delete([seq])
                    await client.publish(f"{self.base}/state", self._state("offline"), qos=1, retain=True)


async def send_request(bus: BusSection, instance: str, command: str, body: dict[str, Any], *, timeout: float = 10.0,
                       username: str | None = None, password: str | None = None) -> dict:
    """Publish one request and wait for its answer (MQTT 5 response topic + correlation data,
    or `response/<command>` matched on `transaction` under MQTT 3.1.1)."""
    base = base_topic(bus, instance)
    token = f"cli-{socket.gethostname()}-{random.getrandbits(48):012x}"
    body = {**body, "transaction": body.get("transaction", token)}
    client_id = f"ingestd-cli-{random.getrandbits(32):08x}"
    async with make_client(bus, client_id, username=username, password=password) as client:
        props = None
        if bus.protocol == "5":
            reply = f"{base}/response/{command}/{token}"
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply
            props.CorrelationData = token.encode()
        else:
            reply = f"{base}/response/{command}"
        await client.subscribe(reply, qos=1)
        await client.publish(f"{base}/request/{command}", json.dumps(body).encode(), qos=1, properties=props)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                try:
                    result = json.loads(message.payload)
                except ValueError:
                    continue
                if result.get("transaction") == body["transaction"]:
                    return result
    raise TimeoutError


def request_from_cli(args) -> int:
    import os
    import sys

    from ..core.config import load_config
    from ..plugin.manager import load_plugins

    if args.what not in COMMANDS:
        print(f"unknown request {args.what!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    plugins = load_plugins()
    config = load_config(args.config, plugins.registry, plugins.errors())
    body: dict[str, Any] = {}
    if args.source:
        body["source"] = args.source
    if args.first:
        body["from"] = args.first
    if args.last:
        body["to"] = args.last
    if args.day:
        body["day"] = args.day
    if args.backfill_id is not None:
        body["backfill_id"] = args.backfill_id
    if args.request_id:
        body["request_id"] = args.request_id
    try:
        result = asyncio.run(send_request(
            config.bus, config.instance(), args.what, body, timeout=args.timeout,
            username=os.environ.get("INGESTD_BUS_USERNAME"), password=os.environ.get("INGESTD_BUS_PASSWORD")))
    except (TimeoutError, asyncio.TimeoutError):
        print(f"no answer within {args.timeout} s (is the daemon running with [bus] enabled?)", file=sys.stderr)
        return 1
    except aiomqtt.MqttError as exc:
        print(f"cannot reach the broker at {config.bus.host}:{config.bus.port}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0 if result.get("status") == "ok" else 1
