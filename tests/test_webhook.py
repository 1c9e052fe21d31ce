"""The webhook observer against a local HTTP server (aiohttp, in a thread of the test): the
signature verified, retries after 500s, no retry after a 400, and a hanging endpoint that does
not slow a load (the load completes while the endpoint hangs), its failures in /metrics and in
the log at error level."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import threading
import time

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.http_support import RunningDaemon
from tests.support import cli_env, ingestd, state_query, wait_for, write_config

D = dt.date(2026, 11, 20)
SECRET = "hook-secret-0123456789"


class HookServer:
    """Records every request; answers with the next status of `answers` (the last repeats), or
    hangs for `hang` seconds."""

    def __init__(self, answers=(200,), hang: float = 0.0):
        self.answers = list(answers)
        self.hang = hang
        self.requests: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            self.requests.append({"headers": dict(request.headers), "body": body, "at": time.monotonic(),
                                  "answered": False})
            if self.hang:
                await asyncio.sleep(self.hang)
            status = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            self.requests[-1]["answered"] = True
            return web.Response(status=status, text="ok" if status < 300 else "no")

        async def start() -> None:
            app = web.Application()
            app.router.add_post("/hook", hook)
            self.runner = web.AppRunner(app, shutdown_timeout=0.5)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        async def stop() -> None:
            await self.runner.cleanup()
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in left:  # a handler still hanging
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def hooks():
    made: list[HookServer] = []

    def make(**kw) -> HookServer:
        made.append(HookServer(**kw))
        return made[-1]

    yield make
    for server in made:
        server.close()


def observer(url: str, **keys) -> str:
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    return f'\n[observers.hook]\ntype = "webhook"\nurl = "{url}"\n{body}'


def test_signed_events_are_retried_after_500s(tmp_path, warehouse, hooks):
    warehouse.add_events(D, 25)
    server = hooks(answers=[500, 503, 200])
    cfg = write_config(tmp_path, extra=observer(server.url, events=["load.succeeded", "load.started"],
                                                secret_env="HOOK_SECRET", retry_base_seconds=0.05))
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg, env=cli_env(HOOK_SECRET=SECRET))
    assert out.returncode == 0, out.stderr
    # load.started: 500, 503, then 200; load.succeeded: 200 at once (the last answer repeats)
    assert len(server.requests) == 4, server.requests
    first, *_, last = server.requests
    started = [r for r in server.requests if r["headers"]["X-Ingestd-Event"] == "load.started"]
    assert len(started) == 3 and len({r["headers"]["X-Ingestd-Delivery"] for r in started}) == 1
    for r in server.requests:
        want = "sha256=" + hmac.new(SECRET.encode(), r["body"], hashlib.sha256).hexdigest()
        assert hmac.compare_digest(r["headers"]["X-Ingestd-Signature-256"], want)
        assert r["headers"]["Content-Type"] == "application/json"
        assert r["headers"]["User-Agent"].startswith("ingestd/")
        assert SECRET.encode() not in r["body"]
    event = json.loads(last["body"])
    assert event["type"] == "load.succeeded" and event["source"] == "orders" and event["day"] == D.isoformat()
    assert event["data"]["rows"] == 25
    assert out.stderr.count("webhook.retry") == 2 and "warning" in out.stderr


def test_a_400_is_not_retried_and_is_logged_as_an_error(tmp_path, warehouse, hooks):
    warehouse.add_events(D, 5)
    server = hooks(answers=[400])
    cfg = write_config(tmp_path, extra=observer(server.url, events=["load.succeeded"], retry_base_seconds=0.05))
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg)
    assert out.returncode == 0, out.stderr
    assert len(server.requests) == 1 and "X-Ingestd-Signature-256" not in server.requests[0]["headers"]
    assert "webhook.failed" in out.stderr and "HTTP 400" in out.stderr and "error" in out.stderr


def test_a_hanging_endpoint_does_not_slow_a_load(tmp_path, warehouse, hooks):
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    warehouse.add_events(yesterday, 2000)
    server = hooks(hang=30)
    daemon = RunningDaemon(tmp_path, schedule='["0 0 * * *"]', recheck="[]", lookback=1,
                           extra=observer(server.url, events=["*"], timeout_seconds=2.0, retries=1,
                                          retry_base_seconds=0.05, close_timeout_seconds=0.5))
    try:
        daemon.wait_listening()
        wait_for(lambda: state_query(tmp_path / "state.db", "SELECT status FROM runs") == [("succeeded",)],
                 what="the load")
        (took,), = state_query(tmp_path / "state.db", "SELECT duration_ms FROM runs")
        assert took < 2000, f"the load took {took} ms: the hanging endpoint slowed it"
        assert server.requests and not any(r["answered"] for r in server.requests), "the endpoint answered"

        def deliveries():
            status, text, _ = daemon.get("/metrics")
            return {s.labels["outcome"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "ingestd_observer_deliveries_total" and s.labels["observer"] == "hook"}

        wait_for(lambda: deliveries().get("failed", 0) >= 1, timeout=30, what="a failed delivery in /metrics")
        counts = deliveries()
        assert counts["retried"] >= 1 and counts["delivered"] == 0
        status, text, _ = daemon.get("/metrics")
        assert 'ingestd_observer_deliveries_total{observer="hook",outcome="failed",type="webhook"}' in text
    finally:
        daemon.stop()
    log = daemon.log()
    assert '"event": "webhook.failed"' in log and '"level": "error"' in log
    assert '"event": "webhook.retry"' in log and '"level": "warning"' in log


def test_failure_events_are_logged_above_info(tmp_path, warehouse):
    warehouse.add_events(D, 20, event="y" * 200)  # every row rejected: the load fails
    out = ingestd("load", "orders", "--day", D.isoformat(), config=write_config(tmp_path))
    assert out.returncode == 1
    failed = [json.loads(line) for line in out.stderr.splitlines() if '"load.failed"' in line]
    assert failed and failed[0]["level"] == "error"
