"""The MQTT bus on aiomqtt 2: lifecycle events out (from the durable outbox), requests in.

Topics under `ingestd/<instance>` (or `[bus].base_topic`):
- `state` (retained): `online` with `since` (connected at) and `heartbeat_at`, refreshed every
  `[bus] heartbeat_seconds` (a minute); `offline` with `at` (when it stopped) after a clean stop.
  A will message is fixed when the connection is made and cannot know when the process will die: after a kill the broker
  publishes `offline` with `reason: "lost"` and no time; the last `heartbeat_at` says when the
  daemon was last alive.
- `event/<source>/<type>` (QoS 1): each outbox row, in order, deleted only after the PUBACK.
  The payload carries `seq`, the outbox sequence number, so subscribers can drop redeliveries.
- `source/<source>/state` (retained): last loaded day, last status, next windows.
- `request/<command>` in, answered on `response/<command>` or the MQTT 5 response topic. A
  retained request is answered with an error and ignored: a restart must never replay one.
- With `[bus] shared` (replicas of one cluster): requests come through the shared subscription
  `$share/<group>/<base>/request/+`, so the broker hands each to one replica, and each replica's
  `state` (and will) is its own, under `replica/<replica_id>/state`.
aiomqtt does not reconnect by itself: `run` reconnects forever with backoff and jitter after any
error, while the daemon keeps ingesting and the outbox keeps the events. Handling one message
never ends the bus: its failure is logged with the traceback and answered with an error.
Everything published passes the secret scrubber.
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
from paho.mqtt.properties import Properties

from ..core import logs
from ..core.events import Event
from ..core.secrets import scrub
from ..engine.runtime import Runtime
from ..service.control import Control
from ..service.requests import answer, handle
from ..service.views import retained_source_state
from .mqtt import base_topic, make_client, publish_properties, send_without_delay

log = logs.get("ingestd.bus")
RETAINED_REQUEST = ("a retained request is ignored: requests are acted on when they are sent, never replayed from "
                    "the broker at a (re)start; publish it without the retain flag")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


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
        self.replica = rt.replica
        self.group = cfg.bus.share_group(self.instance)
        self.client_id = cfg.bus.client_id or f"ingestd-{self.instance}"
        if self.group is not None:  # one session per replica: a shared client id would kick the others off
            self.client_id = f"{self.client_id}-{self.replica}"
        self.state_topic = (f"{self.base}/replica/{self.replica}/state" if self.group is not None
                            else f"{self.base}/state")
        requests = f"{self.base}/request/+"
        self.request_filter = f"$share/{self.group}/{requests}" if self.group is not None else requests
        self.client: aiomqtt.Client | None = None
        self.pending = asyncio.Event()
        self.dirty_sources: set[str] = set(cfg.sources)
        self.connected = asyncio.Event()
        self.closing = False
        self.connected_at: str | None = None
        self._outbox = asyncio.Lock()
        """Held while outbox rows are published and deleted: `close` flushes only after the
        drainer finished its row, so no event goes out twice."""
        rt.dispatch.listeners.append(self._on_event)

    def _on_event(self, event: Event) -> None:
        self.pending.set()
        if event.source:
            self.dirty_sources.add(event.source)

    def health(self) -> tuple[bool, str]:
        """Readiness for `/readyz`: connected to the broker."""
        if self.connected.is_set():
            return True, f"connected to {self.cfg.host}:{self.cfg.port}"
        return False, f"not connected to {self.cfg.host}:{self.cfg.port}"

    def _closing(self) -> bool:
        """Whether close() began: it runs while run() awaits, so read the flag afresh."""
        return self.closing

    async def publish(self, client: aiomqtt.Client, topic: str, payload: Any, *, retain: bool = False,
                      properties: Properties | None = None) -> None:
        """Publish `payload` as JSON, scrubbed of every configured secret, at QoS 1."""
        data = scrub(json.dumps(payload, default=str)).encode()
        await client.publish(topic, data, qos=1, retain=retain, properties=properties)

    def _online(self) -> dict[str, Any]:
        return {"state": "online", "instance": self.instance, **self._replica(), "since": self.connected_at,
                "heartbeat_at": _now()}

    def _replica(self) -> dict[str, str]:
        return {"replica": self.replica} if self.group is not None else {}

    def _will(self) -> aiomqtt.Will:
        lost = {"state": "offline", "instance": self.instance, **self._replica(), "reason": "lost",
                "detail": "the connection ended without a clean stop (killed, crashed or cut off); the last "
                          "online state's heartbeat_at says when the daemon was last alive"}
        return aiomqtt.Will(self.state_topic, scrub(json.dumps(lost)).encode(), qos=1, retain=True)

    async def run(self) -> None:
        attempt = 0
        while not self.closing:
            client = make_client(self.cfg, self.client_id, will=self._will())
            try:
                async with client:
                    send_without_delay(client)
                    self.client = client
                    attempt = 0
                    self.connected_at = _now()
                    log.info("bus.connected", host=self.cfg.host, port=self.cfg.port, base=self.base)
                    await client.subscribe(self.request_filter, qos=1)
                    await self.publish(client, self.state_topic, self._online(), retain=True)
                    self.connected.set()
                    self.dirty_sources |= set(self.rt.config.sources)
                    self.pending.set()
                    await _first_failure(self._drain_outbox(client), self._serve_requests(client),
                                         self._heartbeat(client))
            except Exception as exc:  # any error: reconnect; the outbox keeps the events meanwhile
                self.connected.clear()
                self.client = None
                if self._closing():
                    return
                attempt += 1
                delay = min(self.cfg.reconnect_max_seconds, 0.5 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
                if isinstance(exc, aiomqtt.MqttError):
                    log.warning("bus.disconnected", error=str(exc), attempt=attempt, retry_in_s=round(delay, 2))
                else:
                    log.error("bus.failed", error=repr(exc), attempt=attempt, retry_in_s=round(delay, 2),
                              exc_info=exc)
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
                self.client = None

    async def _heartbeat(self, client: aiomqtt.Client) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_seconds)
            await self.publish(client, self.state_topic, self._online(), retain=True)

    async def _drain_outbox(self, client: aiomqtt.Client) -> None:
        state = self.rt.state
        while True:
            self.pending.clear()  # before reading: a commit after the read sets it again
            async with self._outbox:
                if self.closing:
                    return
                batch = await state.outbox_batch(100)
                for seq, kind, source, payload in batch:
                    topic = f"{self.base}/event/{source or '_daemon'}/{kind}"
                    await self.publish(client, topic, {**payload, "seq": seq})
                    await state.outbox_delete([seq])
            if self.dirty_sources:
                await self._publish_source_states(client)
            if len(batch) < 100:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.pending.wait(), 5.0)

    async def _publish_source_states(self, client: aiomqtt.Client) -> None:
        now = dt.datetime.now(dt.UTC)
        names, self.dirty_sources = self.dirty_sources, set()
        for name in sorted(names):
            if name not in self.rt.config.sources:
                continue
            payload = await retained_source_state(self.rt.config, self.rt.state, name, now)
            await self.publish(client, f"{self.base}/source/{name}/state", payload, retain=True)

    async def _serve_requests(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                await self._handle(client, message)
            except aiomqtt.MqttError:
                raise  # the connection is gone: reconnect
            except Exception as exc:  # one message never takes the bus down
                log.error("request.unanswered", topic=str(message.topic), error=repr(exc), exc_info=exc)

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        command = str(message.topic).rsplit("/", 1)[-1]
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
        if message.retain:
            result = answer("error", error=RETAINED_REQUEST)
        else:
            try:
                result = await handle(self.control, command, payload, self.cfg.max_payload_bytes)
            except Exception as exc:  # a request must never take the bus down
                log.error("request.failed", command=command, error=repr(exc), exc_info=exc)
                result = answer("error", error=f"internal error while handling {command!r} ({type(exc).__name__}); "
                                               "the daemon logged it")
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
        await self.publish(client, topic or f"{self.base}/response/{command}", result, properties=props)

    async def close(self) -> None:
        """Flush what the outbox holds (briefly), publish offline with the stop time, disconnect."""
        self.closing = True
        async with self._outbox:
            client = self.client
            if client is None or not self.connected.is_set():
                return
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    for seq, kind, source, payload in await self.rt.state.outbox_batch(1000):
                        await self.publish(client, f"{self.base}/event/{source or '_daemon'}/{kind}",
                                           {**payload, "seq": seq})
                        await self.rt.state.outbox_delete([seq])
                    await self.publish(client, self.state_topic, {
                        "state": "offline", "instance": self.instance, **self._replica(), "reason": "stopped",
                        "at": _now(),
                        "since": self.connected_at}, retain=True)
