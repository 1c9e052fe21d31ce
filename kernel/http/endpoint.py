"""Where a running daemon's control API is: `<state_path>.http.json`, written by the listener
when it starts (mode 0600) and removed when it stops, read by the CLI.

It holds the URL the listener bound (the real port, also when `port = 0`), the daemon's pid and,
only when `[http]` configures no token, the random token the daemon made for this run. A
configured token never leaves the process this way: the CLI reads it from the config."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from ..core.config import Config


def endpoint_path(config: Config) -> Path:
    state = config.state_path()
    return state.with_name(state.name + ".http.json")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_endpoint(config: Config, url: str, token: str | None) -> Path:
    path = endpoint_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"url": url, "pid": os.getpid(), **({"token": token} if token else {})}, out)
    os.replace(tmp, path)
    return path


def read_endpoint(config: Config) -> dict[str, Any] | None:
    """The endpoint file of a daemon of `config` that is still alive, else None."""
    try:
        data = json.loads(endpoint_path(config).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        return None
    pid = data.get("pid")
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
    return data


def remove_endpoint(config: Config) -> None:
    try:
        data = json.loads(endpoint_path(config).read_text())
        if data.get("pid") == os.getpid():
            endpoint_path(config).unlink()
    except (OSError, ValueError):
        pass
