"""`[observers.NAME] type = "webhook"`: each chosen event is queued by `observe` (in the event
loop, without waiting) and POSTed by a delivery task of its own, in order, with retries.

The request: `POST url`, body the event's JSON (`{type, source, day, at, run_id, data}`, scrubbed
of configured secrets), headers `Content-Type: application/json`, `User-Agent: ingestd/VERSION`,
`X-Ingestd-Event: <type>`, `X-Ingestd-Delivery: <id>` (the same for every attempt of one event),
and, with `secret`, `X-Ingestd-Signature-256: sha256=<hex HMAC-SHA256 of the body with the
secret>`. A 2xx answer delivers; a 5xx, 408, 429, a timeout or a refused connection is tried
again after a backoff (doubling from `retry_base_seconds`, at most `retry_max_seconds`, with
jitter) up to `retries` times; any other answer fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import uuid
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from urllib.parse import urlsplit

import aiohttp

from ingestd import ConfigError, Event, Observer, Secret, get_logger, scrub

log = get_logger("ingestd.webhook")
RETRY_STATUS = {408, 429}


@dataclass
class WebhookConfig:
    url: str
    events: list[str] = field(default_factory=lambda: ["load.failed", "check.held", "backfill.done"])
    sources: list[str] = field(default_factory=list)
    secret: Secret | None = None
    timeout_seconds: float = 10.0
    retries: int = 5
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    queue_size: int = 1000
    close_timeout_seconds: float = 5.0
    headers: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("url", f"must be an http:// or https:// URL, got {self.url!r}")
        for i, name in enumerate(self.events):
            if name != "*" and "." not in name:
                raise ConfigError(f"events[{i}]", f"not an event type (e.g. 'load.failed', or '*' for all): {name!r}")
        for key in ("timeout_seconds", "retry_base_seconds", "retry_max_seconds", "close_timeout_seconds"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be more than 0")
        if self.retries < 0:
            raise ConfigError("retries", "must not be negative")
        if self.queue_size < 1:
            raise ConfigError("queue_size", "must be at least 1")


def signature(secret: str, body: bytes) -> str:
    """The `X-Ingestd-Signature-256` header's value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _version() -> str:
    try:
        return version("ingestd")
    except PackageNotFoundError:
        return "unknown"


class _Retry(Exception):
    """An attempt failed in a way worth trying again."""


class WebhookObserver(Observer):
    type_name = "webhook"
    config_model = WebhookConfig

    def __init__(self, config: WebhookConfig, *, name: str):
        super().__init__(config, name=name)
        self.config: WebhookConfig = config
        self.queue: asyncio.Queue[tuple[str, str, bytes]] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.worker: asyncio.Task[None] | None = None
        self.closing = False
        self.inflight = False

    def wants(self, event: Event) -> bool:
        c = self.config
        return ("*" in c.events or event.type in c.events) and (not c.sources or event.source in c.sources)

    async def open(self) -> None:
        self.queue = asyncio.Queue(self.config.queue_size)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
                                             headers={"User-Agent": f"ingestd/{_version()}"})
        self.worker = asyncio.create_task(self._deliver_all(), name=f"webhook-{self.name}")

    def observe(self, event: Event) -> None:
        if not self.wants(event):
            return
        if self.queue is None or self.closing:
            self.stats.count("dropped")
            return
        body = scrub(json.dumps(event.to_json(), default=str)).encode()
        try:
            self.queue.put_nowait((event.type, uuid.uuid4().hex, body))
        except asyncio.QueueFull:
            self.stats.count("dropped")
            log.warning("webhook.dropped", observer=self.name, event_type=event.type,
                        reason=f"queue full ({self.config.queue_size} events waiting)")

    async def _deliver_all(self) -> None:
        assert self.queue is not None
        while True:
            kind, delivery, body = await self.queue.get()
            self.inflight = True
            try:
                await self._deliver(kind, delivery, body)
            finally:
                self.inflight = False
                self.queue.task_done()

    async def _deliver(self, kind: str, delivery: str, body: bytes) -> None:
        c = self.config
        headers = {**c.headers, "Content-Type": "application/json", "X-Ingestd-Event": kind,
                   "X-Ingestd-Delivery": delivery}
        if c.secret is not None:
            headers["X-Ingestd-Signature-256"] = signature(c.secret.reveal(), body)
        for attempt in range(1, c.retries + 2):
            try:
                await self._post(body, headers)
                self.stats.count("delivered")
                return
            except _Retry as exc:
                if attempt > c.retries:
                    self.stats.count("failed")
                    log.error("webhook.failed", observer=self.name, event_type=kind, delivery=delivery,
                              attempts=attempt, error=scrub(str(exc)))
                    return
                delay = min(c.retry_max_seconds, c.retry_base_seconds * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                self.stats.count("retried")
                log.warning("webhook.retry", observer=self.name, event_type=kind, delivery=delivery, attempt=attempt,
                            retry_in_s=round(delay, 2), error=scrub(str(exc)))
                await asyncio.sleep(delay)
            except _Refused as exc:
                self.stats.count("failed")
                log.error("webhook.failed", observer=self.name, event_type=kind, delivery=delivery,
                          attempts=attempt, error=scrub(str(exc)))
                return

    async def _post(self, body: bytes, headers: dict[str, str]) -> None:
        assert self.session is not None
        try:
            async with self.session.post(self.config.url, data=body, headers=headers) as response:
                await response.read()
                if 200 <= response.status < 300:
                    return
                what = f"HTTP {response.status} {response.reason or ''}".strip()
                if response.status >= 500 or response.status in RETRY_STATUS:
                    raise _Retry(what)
                raise _Refused(what)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None

    async def close(self) -> None:
        """Deliver what is queued for up to `close_timeout_seconds`; drop the rest."""
        self.closing = True
        if self.queue is not None and self.worker is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.queue.join(), self.config.close_timeout_seconds)
            left = self.queue.qsize() + (1 if self.inflight else 0)
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker
            if left:
                self.stats.count("dropped", left)
                log.warning("webhook.dropped", observer=self.name, events=left,
                            reason=f"not delivered within close_timeout_seconds ({self.config.close_timeout_seconds})")
        if self.session is not None:
            await self.session.close()
            self.session = None


class _Refused(Exception):
    """The endpoint refused the event (a 4xx other than 408 and 429): no retry."""
