"""The CLI's side of the control API: a running daemon's `/api/v1/` over plain HTTP (urllib:
the CLI is synchronous), with the bearer token for writes.

`connect(config)` finds the daemon of a config that holds the state lock: the URL and (when
`[http]` configures none) the token come from the endpoint file it wrote at start; a configured
token comes from the config."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from ..core.config import Config
from ..core.errors import IngestdError
from ..engine.state import StateLock
from .endpoint import read_endpoint


class Unreachable(IngestdError):
    """The daemon holds the state database but its control API cannot be used from here."""


@dataclass
class Daemon:
    pid: str
    url: str
    token: str | None
    timeout: float = 30.0

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        return self._send(urllib.request.Request(f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")))

    def post(self, command: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.url}/api/v1/{command}", data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        return self._send(request)

    def _send(self, request: urllib.request.Request) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                answer = json.loads(exc.read())
            except ValueError:
                raise Unreachable(f"the daemon's control API at {self.url} answered {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach the daemon's control API at {self.url}: {reason}") from None
        if not isinstance(answer, dict) or "status" not in answer:
            raise Unreachable(f"the daemon's control API at {self.url} gave an answer that is not one")
        return answer


def daemon_pid(config: Config) -> str | None:
    """The pid of the process that holds this config's state database, or None."""
    return StateLock(config.state_path()).holder()


def connect(config: Config) -> Daemon | None:
    """The running daemon of `config`, when one holds its state database; None when none does.
    Raises `Unreachable` when one does but its control API is off or cannot be found."""
    pid = daemon_pid(config)
    if pid is None:
        return None
    if not config.http_enabled():
        raise Unreachable(f"the state database {config.state_path()} is in use by another ingestd process (pid "
                          f"{pid}), and {config.file} has no [http] listener to send it this command: add [http] "
                          "(and restart the daemon), stop it, or send a request over MQTT with `ingestd request`")
    found = read_endpoint(config)
    if found is None:
        raise Unreachable(f"the state database {config.state_path()} is in use by another ingestd process (pid {pid}),"
                          f" which has not published its control API (yet): is it an `ingestd run` of {config.file}?")
    assert config.http is not None
    token = config.http.token.reveal() if config.http.token is not None else found.get("token")
    return Daemon(pid=str(found.get("pid", pid)), url=found["url"], token=token)
