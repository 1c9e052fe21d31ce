"""Fetch one day as K slices on K connections, in K worker processes, merged into one stream.

A source with `slices = K` (K > 1) has its day fetched as K disjoint parts at once. A driver that
decodes rows in Python (redshift-connector, for one) is bound by one core per stream; K worker
processes give it K interpreters. The parts are merged, in the order they arrive, into the one
stream the load's map and sink stages consume, so the sink still replaces the day with one
generation, atomically, exactly as for an unsliced load.

How a day is cut (`Job.slice_queries`, built by `ingestd.core.query.day_queries` from the
connector instance's capabilities, like every other day query):

- by time (the default): `[start, end)` of the day is split into K half-open sub-ranges of equal
  length, and the source's query is rendered once per sub-range, with `{start}`/`{end}` bound to
  the sub-range (`{day}` keeps the day). A row at a sub-range's bound belongs to exactly one
  slice. The query must filter on `{start}`/`{end}` (or have no placeholder and a mapped
  timestamp column, which the kernel filters on the same way).
- by column (`slice_column = "user_id"`): the day query is wrapped K times as
  `SELECT * FROM (<day query>) ingestd_s WHERE COALESCE(ABS(MOD(ingestd_s."user_id", K)), 0) = i`,
  the column quoted with the connection's own quote (none where Snowflake folds names).
  The column must be an integer column of the query's result; ABS keeps negative values and
  COALESCE puts NULLs in slice 0, so every row is in exactly one slice.

Workers: each slice runs in a process of its own, started with multiprocessing's "forkserver"
context ("spawn" where there is none), never "fork": the daemon has threads and an event loop. A
worker re-creates the connector from the plugin registry (`load_plugins()`) with the
connection's validated config (a picklable dataclass), runs `connector.fetch` on its query, and
streams the record batches back over a pipe as Arrow IPC messages. The pipe holds little and a
worker waits while it is full; the parent reads a slice only when the merged queue has room, so
memory holds a few batches per slice whatever the day's size (backpressure end to end).

Errors: a connector error in a worker comes back as the same class (`TransientError` or
`PermanentError`) with its message and code, so the kernel retries or fails the load exactly as
for an unsliced one; any other exception comes back pickled when it can be, else as a
`PermanentError` naming it. A worker that dies without a word (killed, out of memory) is a
`TransientError`. Closing the merged stream (the load failed elsewhere, was cancelled, or ended)
sends SIGTERM to the workers still running, which close their fetch the connector's way
(cancelling the query on the warehouse), and SIGKILL after a grace period. A worker also exits by
itself when its parent process dies.

The probe is not sliced: it stays one `COUNT(*)` over the whole day.

A connector whose own engine reads several queries at once on several connections (the Redshift
connector's connectorx engine: Rust threads) takes the K slice queries itself through
`Connector.fetch_slices`; the worker processes are for connectors that return None there.

Start-up: the forkserver starts with the first sliced load of a process (~0.5 s) and each worker
then takes ~0.2 s to import the plugins and connect, so slices pay off on days that take more than
a few seconds. As with any multiprocessing start method but "fork", each worker imports the
parent's `__main__` module: a program that embeds the kernel and runs sliced loads must guard its
entry point with `if __name__ == "__main__":` (the `ingestd` command does).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import Any, TypeAlias

import pyarrow as pa

from ..core import logs
from ..core.contracts import Connector, SourceInfo, aclosing_stream
from ..core.errors import ConnectorError, PermanentError, TransientError
from ..core.memory import use_system_memory_pool
from ..core.query import DayQuery
from .job import Job

log = logs.get("ingestd.slices")
_Context: TypeAlias = ForkServerContext | SpawnContext
_Outgoing: TypeAlias = "bytes | pa.Buffer | None"  # a worker's messages to send_bytes; None ends its sender

QUEUE_DEPTH = 2
"""Merged batches waiting for the map stage; each slice's reader holds one more at most."""
SEND_AHEAD = 1
"""Batches a worker serializes ahead of the one it is sending."""
STOP_GRACE_SECONDS = 10.0
"""How long stopped workers get to close their fetch before they are killed."""


# -- what a worker is given -----------------------------------------------------------------------

@dataclass(frozen=True)
class SliceTask:
    """Everything a worker needs, picklable: the connector type (and its class, should the worker's
    registry lack it), the connection's validated config, and the slice's query."""

    index: int
    slices: int
    connector_type: str
    connector_class: tuple[str, str]  # (module, qualname)
    connection: str
    config: Any
    query: DayQuery
    batch_rows: int
    source: SourceInfo
    log_level: str = "info"
    secrets: tuple[str, ...] = ()


def tasks_for(job: Job, day: dt.date) -> list[SliceTask]:
    """The slice tasks of one day of a job's source."""
    cls = type(job.connector)
    queries = job.slice_queries(day)
    return [SliceTask(i, len(queries), job.connection_type, (cls.__module__, cls.__qualname__), job.connection,
                      job.connection_config, q, job.batch_rows, job.info, job.daemon.log_level, job.secrets)
            for i, q in enumerate(queries)]


async def fetch_slices(job: Job, day: dt.date, *,
                       preload: list[str] | None = None) -> AsyncGenerator[pa.RecordBatch, None]:
    """The day's rows of a sliced source, merged as they arrive: fetched by the connector's own
    engine when it offers to (`Connector.fetch_slices`), else by worker processes."""
    own = job.connector.fetch_slices(job.slice_queries(day), job.batch_rows, job.info)
    if own is not None:
        async with aclosing_stream(own) as stream:
            async for batch in stream:
                yield batch
        return
    async with contextlib.aclosing(stream_slices(tasks_for(job, day), preload=preload)) as stream:
        async for batch in stream:
            yield batch


# -- the parent's side ---------------------------------------------------------------------------

_context: _Context | None = None
_context_lock = threading.Lock()


def _mp_context(preload: list[str]) -> _Context:
    """forkserver (a clean single-threaded process forks the workers, with kernel and plugin
    modules already imported), else spawn. Never fork: this process has threads."""
    global _context
    with _context_lock:
        if _context is None:
            ctx: _Context
            if "forkserver" in mp.get_all_start_methods():
                ctx = mp.get_context("forkserver")
                ctx.set_forkserver_preload(["ingestd.engine.slices", *preload])
            else:
                ctx = mp.get_context("spawn")
            _context = ctx
        return _context


_END = object()
_DONE = object()


class _Worker:
    """One worker process and the reading end of its pipe."""

    def __init__(self, ctx: _Context, task: SliceTask):
        self.task = task
        self.reader, writer = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=worker_main, args=(task, writer), daemon=True,
                                   name=f"ingestd-slice-{task.index + 1}of{task.slices}")
        try:
            self.process.start()
        finally:
            writer.close()  # the worker has its copy: EOF here once it exits
        self.schema: pa.Schema | None = None
        self.rows = 0
        self.started = time.monotonic()

    def receive(self) -> Any:
        """Blocking (a reader thread): the next batch, _END, or an exception to raise."""
        try:
            data = self.reader.recv_bytes()
        except (EOFError, OSError):
            self.process.join(2)
            code = self.process.exitcode
            return TransientError(f"slice {self.task.index + 1} of {self.task.slices}: its worker process ended "
                                  f"(exit code {code}) before sending all its rows")
        if data[:1] == b"\xff":  # an Arrow IPC message (continuation marker): a record batch
            batch = pa.ipc.read_record_batch(pa.py_buffer(data), self.schema)
            self.rows += batch.num_rows
            return batch
        kind, *value = pickle.loads(data)
        if kind == "schema":
            self.schema = pa.ipc.read_schema(pa.py_buffer(value[0]))
            return self.receive()
        if kind == "end":
            if value[0] != self.rows:
                return TransientError(f"slice {self.task.index + 1} of {self.task.slices}: received {self.rows} "
                                      f"rows, its worker sent {value[0]}")
            return _END
        return _rebuild_error(*value)

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                self.process.terminate()


def _start(ctx: _Context, tasks: list[SliceTask], into: list[_Worker]) -> None:
    for task in tasks:
        into.append(_Worker(ctx, task))


def _stop_all(workers: list[_Worker], grace: float) -> None:
    deadline = time.monotonic() + grace
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.process.is_alive():
            log.warning("slices.worker_killed", slice=w.task.index + 1, pid=w.process.pid)
            with contextlib.suppress(Exception):
                w.process.kill()
            w.process.join(5)


async def stream_slices(tasks: list[SliceTask], *, preload: list[str] | None = None,
                        depth: int = QUEUE_DEPTH,
                        grace: float = STOP_GRACE_SECONDS) -> AsyncGenerator[pa.RecordBatch, None]:
    """Run one worker per task and yield their batches as they arrive. Raises the first error a
    worker reports; closing the generator stops every worker still running."""
    loop = asyncio.get_running_loop()
    ctx = _mp_context(list(preload) if preload is not None else sorted({t.connector_class[0] for t in tasks}))
    workers: list[_Worker] = []
    merged: asyncio.Queue[object] = asyncio.Queue(max(1, depth))  # batches, _DONE per slice, or an error
    pool = ThreadPoolExecutor(max(1, len(tasks)), thread_name_prefix="ingestd-slice-read")
    readers: list[asyncio.Task[None]] = []
    started = time.monotonic()

    async def read(w: _Worker) -> None:
        while True:
            item = await loop.run_in_executor(pool, w.receive)
            if item is _END:
                log.debug("slices.slice_done", slice=w.task.index + 1, rows=w.rows,
                          seconds=round(time.monotonic() - w.started, 3))
                await merged.put(_DONE)
                return
            await merged.put(item)
            if isinstance(item, BaseException):
                return

    starting = loop.run_in_executor(pool, _start, ctx, tasks, workers)
    clean = False
    try:
        await asyncio.shield(starting)
        readers = [asyncio.create_task(read(w), name=f"slice-read-{w.task.index + 1}") for w in workers]
        left = len(workers)
        while left:
            item = await merged.get()
            if item is _DONE:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
        clean = True
        log.debug("slices.done", slices=len(tasks), rows=sum(w.rows for w in workers),
                  seconds=round(time.monotonic() - started, 3))
    finally:
        for r in readers:
            r.cancel()
        with contextlib.suppress(BaseException):
            await starting  # a start still running: let it finish, then stop what it started
        if not clean:
            for w in workers:
                w.stop()
        # Joining waits for workers that are done (clean) or closing their fetch (stopped); the
        # readers' threads see EOF once their worker is gone, so the pool then drains.
        await asyncio.shield(loop.run_in_executor(None, _stop_all, workers, grace))
        await asyncio.shield(loop.run_in_executor(None, pool.shutdown, True))
        for w in workers:
            with contextlib.suppress(Exception):
                w.reader.close()
        for r in readers:
            with contextlib.suppress(BaseException):
                await r


def _rebuild_error(kind: str, *value: Any) -> BaseException:
    if kind == "transient":
        return TransientError(value[0], code=value[1])
    if kind == "permanent":
        return PermanentError(value[0], code=value[1])
    blob, text = value
    if blob is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(blob)
            if isinstance(exc, BaseException):
                return exc
    return PermanentError(f"a slice worker failed: {text}")


# -- the worker's side ---------------------------------------------------------------------------

def _control(*message: Any) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _describe(exc: BaseException) -> tuple[str, Any, Any]:
    if isinstance(exc, ConnectorError):
        kind = "transient" if isinstance(exc, TransientError) else "permanent"
        text = str(exc)
        prefix = f"[{exc.code}] " if exc.code else ""
        return (kind, text[len(prefix):] if prefix and text.startswith(prefix) else text, exc.code)
    try:
        blob = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)
    except Exception:
        blob = None
    return ("other", blob, f"{type(exc).__name__}: {exc}")


def _connector_class(task: SliceTask) -> type[Connector]:
    from ..plugin.manager import load_plugins
    cls = load_plugins().registry.connectors.get(task.connector_type)
    if cls is not None and (cls.__module__, cls.__qualname__) == task.connector_class:
        return cls
    module, qualname = task.connector_class
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
        connector: type[Connector] = found  # what tasks_for named: the class of a connector
        return connector
    except (ImportError, AttributeError) as exc:
        if cls is not None:
            return cls
        raise PermanentError(f"slice worker: connector type {task.connector_type!r} is not available "
                             f"({module}.{qualname}: {exc})") from exc


def _exit_with_parent() -> None:
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        mp.connection.wait([parent.sentinel])
        os._exit(3)

    threading.Thread(target=watch, name="ingestd-slice-parent", daemon=True).start()


def worker_main(task: SliceTask, conn: Connection) -> None:
    """A worker process: fetch one slice and send it; exits without waiting for stray threads."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
        _exit_with_parent()
        use_system_memory_pool()
        logs.configure(task.log_level, stream=sys.stderr)
        logs.set_secrets(list(task.secrets))
        code = asyncio.run(_pump(task, conn))
    except asyncio.CancelledError:
        code = 2  # stopped by the parent while reporting an error: it reads no more
    except BaseException as exc:  # outside the pump (logging set-up, say): report it
        code = 1
        with contextlib.suppress(Exception):
            conn.send_bytes(_control("error", *_describe(exc)))
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


async def _pump(task: SliceTask, conn: Connection) -> int:
    """Fetch and send; returns the exit code. One thread sends, one item at a time, so messages
    never interleave on the pipe; the fetch goes on meanwhile (SEND_AHEAD items ahead)."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    loop.add_signal_handler(signal.SIGTERM, me.cancel)
    sender = ThreadPoolExecutor(1, thread_name_prefix="ingestd-slice-send")
    outbox: asyncio.Queue[_Outgoing] = asyncio.Queue(SEND_AHEAD)
    rows = 0

    async def send() -> None:
        while (item := await outbox.get()) is not None:
            await loop.run_in_executor(sender, conn.send_bytes, item)

    sending = asyncio.create_task(send())
    connector = None
    try:
        connector = _connector_class(task)(task.config, name=task.connection)
        schema = None
        async with aclosing_stream(connector.fetch(task.query, task.batch_rows, task.source)) as stream:
            async for batch in stream:
                if schema is None or not batch.schema.equals(schema):
                    schema = batch.schema
                    await _put(outbox, sending, _control("schema", schema.serialize().to_pybytes()))
                await _put(outbox, sending, batch.serialize())
                rows += batch.num_rows
        await _put(outbox, sending, None)
        await sending
        conn.send_bytes(_control("end", rows))
        return 0
    except asyncio.CancelledError:
        return 2  # stopped by the parent, which reads no more: exit at once
    except Exception as exc:
        # Let the send in progress finish (the parent goes on reading until it sees the error),
        # then report the error as the last message.
        sending.cancel()
        with contextlib.suppress(BaseException):
            await sending
        await loop.run_in_executor(None, sender.shutdown, True)
        conn.send_bytes(_control("error", *_describe(exc)))
        return 1
    finally:
        sending.cancel()
        if connector is not None:
            with contextlib.suppress(BaseException):
                await connector.close()


async def _put(outbox: asyncio.Queue[_Outgoing], sending: asyncio.Task[None], item: _Outgoing) -> None:
    """Queue an item for the sender, or raise what stopped it (the parent closed the pipe)."""
    put = asyncio.ensure_future(outbox.put(item))
    done, _ = await asyncio.wait({put, sending}, return_when=asyncio.FIRST_COMPLETED)
    if put not in done:
        put.cancel()
        sending.result()  # raises the sender's error
        raise TransientError("the slice sender stopped")
