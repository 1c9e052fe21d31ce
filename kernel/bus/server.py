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
from collections.abc import Coroutine
from typing import Any

import aiomqtt

from ..core import logs
from ..core.events import Event
from ..engine.runtime import Runtime
from ..service.control import Control
from ..service.requests import answer, handle
from ..service.views import retained_source_state
from .mqtt import base_topic, make_client, publish_properties

log = logs.get("ingestd.bus")


async def _first_failure(*coros: Coroutine[Any, Any, None]) -> None:
    """Run coroutines together; when one fails, cancel the others and raise its error."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if (exc := t.exception()) is not None:
                raise exc
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def bus_service(rt: Runtime, control: Control) -> Bus | None:
    """The daemon's bus, when `[bus] enabled = true` (a `ServiceFactory`)."""
    return Bus(rt, control) if rt.config.bus.enabled else None


class Bus:
    name = "bus"

    def __init__(self, rt: Runtime, control: Control):
        self.rt = rt
        self.control = control
        cfg = rt.config
        self.cfg = cfg.bus
        self.instance = cfg.instance()
        self.base = base_topic(cfg.bus, self.instance)
        self.client_id = cfg.bus.client_id or f"ingestd-{self.instance}"
        self.client: aiomqtt.Client | None = None
        self.pending = asyncio.Event()
        self.dirty_sources: set[str] = set(cfg.sources)
        self.connected = asyncio.Event()
        self.closing = False
        rt.dispatch.listeners.append(self._on_event)

    def _on_event(self, event: Event) -> None:
        self.pending.set()
        if event.source:
            self.dirty_sources.add(event.source)

    def _closing(self) -> bool:
        """Whether close() began: it runs while run() awaits, so read the flag afresh."""
        return self.closing

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
                    self.dirty_sources |= set(self.rt.config.sources)
                    self.pending.set()
                    await _first_failure(self._drain_outbox(client), self._serve_requests(client))
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self.client = None
                if self._closing():
                    return
                attempt += 1
                delay = min(self.cfg.reconnect_max_seconds, 0.5 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
                log.warning("bus.disconnected", error=str(exc), attempt=attempt, retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
                self.client = None

    async def _drain_outbox(self, client: aiomqtt.Client) -> None:
        state = self.rt.state
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
        now = dt.datetime.now(dt.UTC)
        names, self.dirty_sources = self.dirty_sources, set()
        for name in sorted(names):
            if name not in self.rt.config.sources:
                continue
            payload = await retained_source_state(self.rt.config, self.rt.state, name, now)
            await client.publish(f"{self.base}/source/{name}/state", json.dumps(payload, default=str).encode(),
                                 qos=1, retain=True)

    async def _serve_requests(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            command = str(message.topic).rsplit("/", 1)[-1]
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
            try:
                result = await handle(self.control, command, payload, self.cfg.max_payload_bytes)
            except Exception as exc:  # a request must never take the bus down
                log.error("request.failed", command=command, error=repr(exc))
                result = answer("error", error=f"internal error: {type(exc).__name__}")
            log.info("request", command=command, status=result["status"], error=result["error"])
            await self._respond(client, message, command, result)

    async def _respond(self, client: aiomqtt.Client, message: aiomqtt.Message, command: str,
                       result: dict[str, Any]) -> None:
        props_in = message.properties
        topic = getattr(props_in, "ResponseTopic", None) if props_in is not None else None
        props = None
        if topic:
            props = publish_properties()
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
                    for seq, kind, source, payload in await self.rt.state.outbox_batch(1000):
                        await client.publish(f"{self.base}/event/{source or '_daemon'}/{kind}",
                                             json.dumps({**payload, "seq": seq}).encode(), qos=1)
                        await self.rt.state.outbox_delete([seq])
                    await client.publish(f"{self.base}/state", self._state("offline"), qos=1, retain=True)


