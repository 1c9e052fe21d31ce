"""A CLI command's way to a running daemon: when a daemon holds the config's state database,
commands that would need it (`status`, `backfill`, `load`, `ready`, `cancel`) go through the
daemon's control API instead of failing with "locked", and say so on stderr."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from ..core.config import Config
from ..http.client import Daemon, connect
from .terminal import say


def reach(config: Config, quiet: bool = False) -> Daemon | None:
    daemon = connect(config)
    if daemon is not None and not quiet:
        say(f"ingestd: a daemon (pid {daemon.pid}) holds {config.state_path()}: going through its control API "
            f"at {daemon.url}")
    return daemon


def wait_for_day(daemon: Daemon, source: str, day: dt.date, since: str, *, poll: float = 0.3) -> dict[str, Any]:
    """Poll the daemon's status until `day` of `source` was settled after `since` (an ISO-8601
    UTC time): its last run started then and ended, or it was checked then and nothing loads."""
    days = max(0, min(3660, (dt.datetime.now(dt.UTC).date() - day).days + 1))
    while True:
        answer = daemon.get("status", source=source, days=days)
        if answer["status"] != "ok":
            raise RuntimeError(answer["error"])
        (report,) = answer["data"]["sources"]
        for d in report["days"]:
            if d["day"] != day.isoformat() or d["loading"]:
                continue
            run = d["last_run"]
            if (run and run["started_at"] >= since and run["status"] != "running") or (d["checked_at"] or "") >= since:
                return dict(d)
        time.sleep(poll)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()
