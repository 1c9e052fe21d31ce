"""The daemon's background tasks, by name: windows, loads asked for by requests, backfills and
services. A failed task is logged, never lost silently; shutdown waits for work, then cancels."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from ..core import logs

log = logs.get("ingestd.tasks")


class Tasks:
    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[Any], str] = {}

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks[task] = name
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("task.failed", task=task.get_name(), error=repr(task.exception()))

    def running(self, name: str) -> bool:
        return name in self._tasks.values()

    def __len__(self) -> int:
        return len(self._tasks)

    def all(self) -> list[asyncio.Task[Any]]:
        return list(self._tasks)

    async def settle(self, grace: float, *, keep: tuple[str, ...] = (), abort: asyncio.Event | None = None) -> None:
        """Wait up to `grace` seconds (or until `abort` is set) for every task whose name does not
        start with one of `keep`, then cancel what is left of them and wait for it to end."""
        work = [t for t, n in self._tasks.items() if not n.startswith(keep)] if keep else self.all()
        if not work:
            return
        if abort is None:
            _, pending = await asyncio.wait(work, timeout=grace)
        else:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            aborted = asyncio.ensure_future(abort.wait())
            try:
                while not abort.is_set():
                    left = [t for t in work if not t.done()]
                    remaining = deadline - loop.time()
                    if not left or remaining <= 0:
                        break
                    await asyncio.wait([*left, aborted], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                aborted.cancel()
            pending = {t for t in work if not t.done()}
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def cancel_all(self) -> None:
        tasks = self.all()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
