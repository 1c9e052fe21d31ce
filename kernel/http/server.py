"""The HTTP listener on aiohttp: the status page, `/metrics`, `/healthz`, `/readyz` and the JSON
control API under `/api/v1/`, which carries out the same requests as the MQTT bus through the
same code (`service.requests.handle`) and answers the same `{status, data, error, transaction}`.

Every response leaves through one middleware (`_guard`), which scrubs configured secrets from
its body and headers and turns errors into answers: nothing the listener sends can carry a
secret, whatever a handler put in it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..core import logs
from ..core.config import HttpSection
from ..core.errors import IngestdError
from ..engine.runtime import Runtime
from ..service.control import Control
from ..service.requests import answer, handle
from .endpoint import new_token, remove_endpoint, write_endpoint
from .metrics import Metrics
from .page import render

log = logs.get("ingestd.http")

WRITES = {"backfill": "backfill", "ready": "ready", "reload": "reload", "load": "reload", "cancel": "cancel",
          "preview": "preview"}
"""POST /api/v1/<name> and the request command each carries out (`load` is `reload`'s alias). They
need the bearer token: `preview` changes nothing, but its answer holds rows of the warehouse."""
ACCEPTED = {"backfill", "ready", "reload"}
"""Commands whose work goes on after the answer: 202 Accepted."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_service(rt: Runtime, control: Control) -> HttpServer | None:
    """The daemon's HTTP listener, when `[http]` is present and enabled (a `ServiceFactory`)."""
    return HttpServer(rt, control) if rt.config.http_enabled() else None


def _scrub_bytes(body: bytes) -> bytes:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return body
    clean = logs.scrub(text)
    return body if clean == text else clean.encode("utf-8")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(data, default=str, indent=1).encode(), status=status,
                        content_type="application/json", headers=headers)


def _strict(body: bytes) -> None:
    """Raise ValueError unless `body` is strict JSON: UTF-8, no NaN or Infinity, no key twice."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    json.loads(body.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)


class HttpServer:
    name = "http"

    def __init__(self, rt: Runtime, control: Control):
        assert rt.config.http is not None
        self.rt = rt
        self.control = control
        self.cfg: HttpSection = rt.config.http
        self.generated = self.cfg.token is None
        self.token = self.cfg.token.reveal() if self.cfg.token is not None else new_token()
        self.metrics = Metrics(rt, control)
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.loop_lag = 0.0
        self.started = time.monotonic()
        self.app = self._app()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listener (the daemon does this before its windows start, so a port in use
        stops the daemon with a clear error) and publish the endpoint file for the CLI."""
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.host, self.cfg.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = None
            raise IngestdError(f"http: cannot listen on {self.cfg.host}:{self.cfg.port}: {exc.strerror or exc} "
                               f"(is another ingestd running? set [http] port)") from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else self.cfg.port
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        self.url = f"http://{host}:{port}"
        write_endpoint(self.rt.config, self.url, self.token if self.generated else None)
        log.info("http.listening", url=self.url + "/", token="generated" if self.generated else "configured")

    async def run(self) -> None:
        if self.runner is None:
            await self.start()
        interval = 0.5
        while True:  # measures the event loop's lag for /healthz
            before = time.monotonic()
            await asyncio.sleep(interval)
            self.loop_lag = max(0.0, time.monotonic() - before - interval)

    async def close(self) -> None:
        remove_endpoint(self.rt.config)
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # -- the application -----------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=self.cfg.max_body_bytes + 1)
        app.router.add_get("/", self.page)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/api/v1/status", self.status)
        app.router.add_get("/api/v1/calendar", self.calendar)
        for name in WRITES:
            app.router.add_post(f"/api/v1/{name}", self.write)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The one place every response leaves through: errors become answers (JSON under
        /api/), and bodies and headers are scrubbed of configured secrets."""
        api = request.path.startswith("/api/")
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if api:
                kept = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
                response = _json(answer("error", error=exc.reason), exc.status, headers=kept)
            else:
                response = web.Response(text=f"{exc.status} {exc.reason}\n", status=exc.status)
        except Exception as exc:
            log.error("http.failed", path=request.path, error=repr(exc))
            response = _json(answer("error", error=f"internal error: {type(exc).__name__}"), 500)
        if isinstance(response, web.Response) and isinstance(response.body, bytes):
            response.body = _scrub_bytes(response.body)
        for key in list(response.headers):
            response.headers[key] = logs.scrub(response.headers[key])
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    async def page(self, request: web.Request) -> web.StreamResponse:
        days = self.cfg.calendar_days
        html = render(await self.control.calendar(days), await self.control.readiness(),
                      refresh_seconds=self.cfg.refresh_seconds, days=days)
        return web.Response(text=html, content_type="text/html", headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"})

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        body, content_type = await self.metrics.render(request.headers.get("Accept"))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        ok = self.loop_lag < 5.0
        return _json({"status": "ok" if ok else "lagging", "loop_lag_ms": round(self.loop_lag * 1000, 1),
                      "uptime_s": round(time.monotonic() - self.started, 1)}, 200 if ok else 503)

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        result = await self.control.readiness()
        return _json({"status": "ready" if result["ready"] else "not ready", **result}, 200 if result["ready"] else 503)

    async def status(self, request: web.Request) -> web.StreamResponse:
        body = {k: request.query[k] for k in request.query}
        if "days" in body:
            return await self._status_days(body)
        result = await handle(self.control, "status", json.dumps(body).encode(), self.cfg.max_body_bytes)
        return _json(result, 200 if result["status"] == "ok" else 400)

    async def _status_days(self, query: dict[str, str]) -> web.StreamResponse:
        """`?days=N` (what `ingestd status --days` asks): not a field of the `status` request."""
        try:
            days = int(query.pop("days"))
            if not 0 <= days <= 3660:
                raise ValueError
        except ValueError:
            return _json(answer("error", error="days must be a whole number 0..3660"), 400)
        unknown = sorted(set(query) - {"source"})
        if unknown:
            return _json(answer("error", error=f"unknown parameter {unknown[0]!r} (status takes source, days)"), 400)
        try:
            data = await self.control.status(query.get("source"), days)
        except IngestdError as exc:
            return _json(answer("error", error=str(exc)), 400)
        return _json(answer("ok", data=data))

    async def calendar(self, request: web.Request) -> web.StreamResponse:
        unknown = sorted(set(request.query) - {"source", "days"})
        if unknown:
            return _json(answer("error", error=f"unknown parameter {unknown[0]!r} (calendar takes source, days)"), 400)
        try:
            days = int(request.query.get("days", self.cfg.calendar_days))
            if not 1 <= days <= 366:
                raise ValueError
        except ValueError:
            return _json(answer("error", error="days must be a whole number 1..366"), 400)
        try:
            data = await self.control.calendar(days, request.query.get("source"))
        except IngestdError as exc:
            return _json(answer("error", error=str(exc)), 400)
        return _json(answer("ok", data=data))

    def _authorised(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="ingestd"'}
        if scheme.lower() != "bearer" or not given.strip():
            return _json(answer("error", error="this endpoint needs Authorization: Bearer <token> ([http] token_env "
                                "or token_file; without one, the daemon's token is in its endpoint file)"), 401,
                         challenge)
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return _json(answer("error", error="wrong bearer token"), 403)
        return None

    async def write(self, request: web.Request) -> web.StreamResponse:
        command = WRITES[request.path.rsplit("/", 1)[-1]]
        if (refused := self._authorised(request)) is not None:
            return refused
        limit = self.cfg.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _json(answer("error", error=f"body of {request.content_length} bytes is larger than {limit}"), 413)
        body = await request.content.read(limit + 1)
        if len(body) > limit:
            return _json(answer("error", error=f"body is larger than {limit} bytes"), 413)
        if request.content_type != "application/json":
            return _json(answer("error", error=f"Content-Type must be application/json, got {request.content_type!r}"),
                         415)
        try:
            _strict(body)
        except (UnicodeDecodeError, ValueError) as exc:
            return _json(answer("error", error=f"body is not strict JSON: {exc}"), 400)
        result = await handle(self.control, command, body, limit)
        log.info("http.request", command=command, status=result["status"], error=result["error"])
        if result["status"] != "ok":  # a request_id reused for another request is a conflict
            return _json(result, 409 if (result["error"] or "").startswith("conflict") else 400)
        return _json(result, 202 if command in ACCEPTED else 200)
