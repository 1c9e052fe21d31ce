"""Helpers for connectors on blocking drivers: a producer thread handed to an async iterator
(`ThreadStream`), one connection owned by one thread (`ThreadSession`), and Arrow batches cut
to `batch_rows` (`Rechunker`, `rechunk`).

Almost every warehouse driver blocks. The event loop must never wait on it, a fetch must stream
with bounded memory, and a fetch the kernel abandons (a cancelled load, a failed sink, a daemon
stopping) must stop the driver instead of leaving it running. These helpers do that once, with
real threads, so that a connector only writes the driver calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar, cast

import pyarrow as pa
import structlog

from .errors import PermanentError, TransientError

log = structlog.get_logger("ingestd.streams")

T = TypeVar("T")
C = TypeVar("C")

__all__ = ["Outlet", "ThreadStream", "ThreadSession", "Rechunker", "rechunk"]


# -- a producer thread to an async iterator -------------------------------------------------------

class _End:
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None):
        self.error = error


class Outlet(Generic[T]):
    """The producer thread's end of a `ThreadStream`.

    `put` blocks while `depth` items wait for the consumer; `stopped` is set once the consumer
    is gone (closed the stream, was cancelled, failed) or `ThreadStream.stop()` was called. A
    producer that polls its driver (a query's status) should wait on `stopped` instead of
    sleeping."""

    def __init__(self, depth: int):
        self.stopped = threading.Event()
        self._free = depth
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._items: asyncio.Queue[Any] | None = None

    def put(self, item: T) -> bool:
        """Hand `item` to the consumer, waiting while it is `depth` items behind. False once
        the stream is stopped: the producer should then return (its `finally` blocks run in
        this thread, where its driver objects live)."""
        with self._cond:
            while self._free == 0 and not self.stopped.is_set():
                self._cond.wait()
            if self.stopped.is_set():
                return False
            self._free -= 1
        return self._send(item)

    def put_all(self, items: Iterable[T]) -> bool:
        """`put` each of `items`; False as soon as the stream is stopped. The iterator is closed
        in any case, so a generator's `finally` (closing a cursor, a result stream) runs here."""
        iterator = iter(items)
        try:
            for item in iterator:
                if not self.put(item):
                    return False
            return True
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    # -- the stream's side ----------------------------------------------------------------------

    def _send(self, item: Any) -> bool:
        loop, items = self._loop, self._items
        if loop is None or items is None:  # not started: nothing can listen
            self._stop()
            return False
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
            return True
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._stop()
            return False

    def _taken(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify()

    def _stop(self) -> None:
        with self._cond:
            self.stopped.set()
            self._cond.notify_all()


def _produce(produce: Callable[[Outlet[Any]], None], outlet: Outlet[Any]) -> None:
    error: BaseException | None = None
    try:
        produce(outlet)
    except BaseException as exc:  # raised in the consumer
        error = exc
    outlet._send(_End(error))


class ThreadStream(Generic[T]):
    """An async iterator of what `produce(outlet)` puts, `produce` running in a thread of its own.

    ```python
    def produce(out: Outlet) -> None:          # runs in the thread; may block
        cursor = connection.cursor()
        try:
            cursor.execute(sql, params)
            while rows := cursor.fetchmany(10_000):
                if not out.put(to_batch(rows)):
                    return                     # the consumer is gone
        except driver.Error as exc:
            raise translate(exc) from exc      # surfaces in the consumer
        finally:
            cursor.close()

    async with ThreadStream(produce, interrupt=connection.cancel, name="mydb-fetch") as batches:
        async for batch in batches:
            yield batch
    ```

    - **Back-pressure**: the thread is at most `depth` items ahead of the consumer; memory holds
      those, the one it builds and the one the consumer has, whatever the size of the day.
    - **Errors**: an exception raised by `produce` is raised by the consumer's `async for`, after
      the items put before it, as it is: translate driver errors in `produce`.
    - **Stopping**: leaving the `async with` (the loop ended, `aclose()`, an exception, the task
      cancelled) sets `outlet.stopped` and wakes a `put` that waits, which then returns False.
      When the thread is still running `interrupt_after` seconds later (blocked in the driver),
      `interrupt()` is called once, from a worker thread: cancel the query on the warehouse,
      shut the socket. The thread is then waited for up to `join_seconds` in a worker thread;
      the event loop never blocks. A thread that outlives that is logged and left to end on
      its own (it is a daemon thread, and its next `put` returns False).
    - `stop()` (from any thread, e.g. a connector's `close()`) stops the producer too; a
      consumer still reading then gets a `TransientError` rather than a silently short stream.

    The thread starts on the first `__anext__` (or `__aenter__`). A stream nobody closed is
    stopped when it is garbage-collected.
    """

    def __init__(self, produce: Callable[[Outlet[T]], None], *, depth: int = 2,
                 interrupt: Callable[[], object] | None = None, name: str = "ingestd-stream",
                 interrupt_after: float = 0.2, join_seconds: float = 10.0):
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._produce = produce
        self._outlet: Outlet[T] = Outlet(depth)
        self._interrupt = interrupt
        self._name = name
        self._interrupt_after = interrupt_after
        self._join_seconds = join_seconds
        self._thread: threading.Thread | None = None
        self._ended = False
        self._closed = False
        weakref.finalize(self, self._outlet._stop)

    @property
    def stopped(self) -> bool:
        return self._outlet.stopped.is_set()

    def stop(self) -> None:
        """Tell the producer to stop (thread-safe, returns at once)."""
        self._outlet._stop()

    def _start(self) -> None:
        if self._thread is not None:
            return
        self._outlet._loop = asyncio.get_running_loop()
        self._outlet._items = asyncio.Queue()
        self._thread = threading.Thread(target=_produce, args=(self._produce, self._outlet), name=self._name,
                                        daemon=True)
        self._thread.start()

    def __aiter__(self) -> ThreadStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._ended or self._closed:
            raise StopAsyncIteration
        self._start()
        items = self._outlet._items
        assert items is not None  # _start made it
        item = await items.get()
        if isinstance(item, _End):
            self._ended = True
            if item.error is not None:
                raise item.error
            if self.stopped:
                raise TransientError(f"{self._name}: the stream was stopped before its end")
            raise StopAsyncIteration
        self._outlet._taken()
        return cast(T, item)

    async def __aenter__(self) -> ThreadStream[T]:
        self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the producer and wait (bounded, off the event loop) for its thread to end."""
        self._closed = True
        self.stop()
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        await asyncio.shield(asyncio.to_thread(self._join, thread, not self._ended))

    def _join(self, thread: threading.Thread, interrupt: bool) -> None:
        deadline = time.monotonic() + self._join_seconds
        thread.join(min(self._interrupt_after, self._join_seconds))
        if thread.is_alive() and interrupt and self._interrupt is not None:
            try:
                self._interrupt()
            except Exception as exc:
                log.warning("stream.interrupt_failed", thread=thread.name, error=f"{type(exc).__name__}: {exc}")
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("stream.thread_still_running", thread=thread.name, waited_seconds=self._join_seconds)


# -- one connection, one thread -------------------------------------------------------------------

_CLOSE = object()


class _Worker(Generic[C]):
    """What the session's thread holds (never the session itself, so a session nobody closed can
    still be collected, which closes it)."""

    def __init__(self, connect: Callable[[], C], close: Callable[[C], object]):
        self.connect = connect
        self.close = close
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.con: C | None = None
        self.busy = False
        self.closing = False
        self.on_close: list[Callable[[], object]] = []

    def serve(self) -> None:
        try:
            while (request := self.requests.get()) is not _CLOSE:
                future, work = request
                if not future.set_running_or_notify_cancel():
                    continue
                if self.closing:
                    future.set_exception(TransientError("the call was stopped: its session is closing"))
                    continue
                try:
                    if self.con is None:
                        self.con = self.connect()
                    self.busy = True
                    result = work(self.con)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                finally:
                    self.busy = False
                del request, future, work
        finally:
            for close in reversed(self.on_close):
                with contextlib.suppress(Exception):
                    close()
            self.on_close.clear()
            con, self.con = self.con, None
            if con is not None:
                with contextlib.suppress(Exception):
                    self.close(con)


def _close_connection(con: Any) -> None:
    con.close()


class ThreadSession(Generic[C]):
    """One driver connection, owned by one dedicated thread: every call runs on that thread, one
    at a time, and `aclose()` interrupts what runs.

    ```python
    async with ThreadSession(lambda: duckdb.connect(path, read_only=True),
                             interrupt=lambda con: con.interrupt(), name="duckdb") as session:
        rows = await session.call(lambda con: con.execute(sql, params).fetchall())
    ```

    For drivers whose connection must stay on one thread, or must not be used by two at once.
    `connect()` runs on the thread at the first call (again at the next call if it failed);
    `call(work)` runs `work(connection)` there and returns its result or raises its exception.
    `on_close(fn)` adds a clean-up (a result reader) run on the thread before the connection is
    closed with `close(connection)` (default: `connection.close()`).

    Closing (leaving the `async with`, also when the task was cancelled mid-call) refuses new
    calls, and while a call still runs calls `interrupt(connection)` every `interrupt_every`
    seconds from a worker thread (some drivers drop an interrupt that comes before their query
    starts), then closes on the session's thread and waits for it at most `join_seconds`,
    never blocking the event loop. `close()` does the same from a thread.
    """

    def __init__(self, connect: Callable[[], C], *, close: Callable[[C], object] = _close_connection,
                 interrupt: Callable[[C], object] | None = None, name: str = "ingestd-session",
                 interrupt_every: float = 0.05, join_seconds: float = 10.0):
        self._worker: _Worker[C] = _Worker(connect, close)
        self._interrupt = interrupt
        self._name = name
        self._interrupt_every = interrupt_every
        self._join_seconds = join_seconds
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        weakref.finalize(self, self._worker.requests.put, _CLOSE)

    def on_close(self, fn: Callable[[], object]) -> None:
        """Run `fn()` on the session's thread when it closes, before the connection is closed
        (the last added runs first)."""
        self._worker.on_close.append(fn)

    def _submit(self, work: Callable[[C], T]) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._worker.closing:
                raise TransientError("the call was stopped: its session is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker.serve, name=self._name, daemon=True)
                self._thread.start()
            future: concurrent.futures.Future[T] = concurrent.futures.Future()
            self._worker.requests.put((future, work))
            return future

    async def call(self, work: Callable[[C], T]) -> T:
        """`work(connection)` on the session's thread."""
        return await asyncio.wrap_future(self._submit(work))

    async def __aenter__(self) -> ThreadSession[C]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with self._lock:
            self._worker.closing = True
            thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.shield(asyncio.to_thread(self.close))

    def close(self) -> None:
        """Blocking `aclose()`, for a thread (never the session's own)."""
        with self._lock:
            self._worker.closing = True
            thread = self._thread
        if thread is None:
            return
        self._worker.requests.put(_CLOSE)
        deadline = time.monotonic() + self._join_seconds
        while thread.is_alive() and time.monotonic() < deadline:
            con = self._worker.con
            if self._worker.busy and con is not None and self._interrupt is not None:
                with contextlib.suppress(Exception):
                    self._interrupt(con)
            thread.join(self._interrupt_every)
        if thread.is_alive():
            log.warning("session.thread_still_running", thread=thread.name, waited_seconds=self._join_seconds)


# -- Arrow batches of batch_rows ------------------------------------------------------------------

class Rechunker:
    """Cuts and joins Arrow record batches and tables of any sizes into record batches of exactly
    `batch_rows` rows (the last one of a stream may have fewer; none is empty).

    Big inputs are sliced without copying; small ones are held until a batch is full and then
    joined into one contiguous batch. Every output batch has the schema of the first non-empty
    input: a later input with other types is cast to it (int32 to int64, say), and one that
    cannot be cast is a `PermanentError`. Feed it in the thread that reads the driver: joining
    copies, which does not belong on the event loop."""

    def __init__(self, batch_rows: int):
        if batch_rows < 1:
            raise ValueError("batch_rows must be at least 1")
        self.batch_rows = batch_rows
        self.schema: pa.Schema | None = None
        self._pending: list[pa.RecordBatch] = []
        self._rows = 0

    def push(self, data: pa.RecordBatch | pa.Table) -> Iterator[pa.RecordBatch]:
        """The full batches `data` completes."""
        for batch in data.to_batches() if isinstance(data, pa.Table) else [data]:
            if batch.num_rows == 0:
                continue
            batch = self._conform(batch)
            offset = 0
            while offset < batch.num_rows:
                take = min(self.batch_rows - self._rows, batch.num_rows - offset)
                piece = batch.slice(offset, take)
                offset += take
                if not self._pending and take == self.batch_rows:
                    yield piece
                    continue
                self._pending.append(piece)
                self._rows += take
                if self._rows == self.batch_rows:
                    yield self._drain()

    def flush(self) -> Iterator[pa.RecordBatch]:
        """The last, partial batch, if rows are held."""
        if self._rows:
            yield self._drain()

    def _drain(self) -> pa.RecordBatch:
        pending, self._pending, self._rows = self._pending, [], 0
        if len(pending) == 1:
            return pending[0]
        table = pa.Table.from_batches(pending).combine_chunks()
        return table.to_batches(max_chunksize=table.num_rows)[0]

    def _conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.schema is None:
            self.schema = batch.schema
            return batch
        if batch.schema.equals(self.schema, check_metadata=False):
            return batch if batch.schema.equals(self.schema, check_metadata=True) else \
                pa.RecordBatch.from_arrays(batch.columns, schema=self.schema)
        try:
            return batch.cast(self.schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, TypeError) as exc:
            raise PermanentError(f"the result's columns changed type between chunks ({self.schema} then "
                                 f"{batch.schema}): {exc}") from None


def rechunk(data: Iterable[pa.RecordBatch | pa.Table], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """`data` (e.g. a driver's pages, a `pyarrow.RecordBatchReader`) as record batches of exactly
    `batch_rows` rows, the last one fewer, none empty, one schema (see `Rechunker`)."""
    rechunker = Rechunker(batch_rows)
    for item in data:
        yield from rechunker.push(item)
    yield from rechunker.flush()
