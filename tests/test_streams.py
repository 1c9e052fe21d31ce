"""The blocking-driver helpers of the public API (kernel/core/streams.py), with real threads:
ThreadStream (a producer thread to an async iterator), ThreadSession (one connection, one
thread) and the re-chunker."""

from __future__ import annotations

import asyncio
import threading
import time

import pyarrow as pa
import pytest

from ingestd import Outlet, PermanentError, Rechunker, ThreadSession, ThreadStream, TransientError, rechunk


def alive(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


class Driver:
    """A stand-in for a blocking driver call: `block()` waits until `interrupt()` (or `release()`)."""

    def __init__(self):
        self.interrupts = 0
        self.entered = threading.Event()
        self._wake = threading.Event()

    def block(self, seconds: float = 30.0) -> None:
        self.entered.set()
        if not self._wake.wait(seconds):
            raise AssertionError("never interrupted")
        raise RuntimeError("the query was cancelled")

    def interrupt(self) -> None:
        self.interrupts += 1
        self._wake.set()


# -- ThreadStream ---------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1, 2, 5])
async def test_the_producer_is_at_most_depth_items_ahead(depth):
    produced = []

    def produce(out: Outlet) -> None:
        for i in range(40):
            if not out.put(i):
                return
            produced.append(i)

    got = []
    async with ThreadStream(produce, depth=depth, name="t-depth") as stream:
        async for item in stream:
            got.append(item)
            await asyncio.sleep(0.01)  # a slow consumer: the thread runs ahead as far as it may
            assert len(produced) - len(got) <= depth
    assert got == list(range(40))
    assert alive("t-depth") == []


async def test_a_consumer_that_stops_early_stops_the_thread_without_interrupting_a_waiting_put():
    driver = Driver()
    finished = threading.Event()

    def produce(out: Outlet) -> None:
        try:
            i = 0
            while out.put(i):
                i += 1
        finally:
            finished.set()  # the producer's own clean-up runs in its thread

    stream = ThreadStream(produce, depth=2, interrupt=driver.interrupt, name="t-early")
    async with stream:
        assert await anext(stream) == 0
        assert await anext(stream) == 1
    assert finished.is_set() and alive("t-early") == []
    assert driver.interrupts == 0, "a producer waiting in put() stops by itself"
    assert stream.stopped


async def test_aclose_interrupts_a_producer_blocked_in_its_driver():
    driver = Driver()
    finished = threading.Event()

    def produce(out: Outlet) -> None:
        try:
            out.put("first")
            driver.block()  # e.g. waiting for the next page of a long query
        finally:
            finished.set()

    stream = ThreadStream(produce, interrupt=driver.interrupt, name="t-interrupt")
    assert await anext(stream) == "first"
    await asyncio.to_thread(driver.entered.wait, 5)
    started = time.monotonic()
    await stream.aclose()
    assert driver.interrupts == 1
    assert finished.is_set() and alive("t-interrupt") == []
    assert time.monotonic() - started < 2
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_the_drivers_error_surfaces_in_the_consumer_after_the_items_before_it():
    class DriverError(Exception):
        pass

    def produce(out: Outlet) -> None:
        out.put(1)
        out.put(2)
        try:
            raise DriverError("connection reset")
        except DriverError as exc:
            raise TransientError(f"translated: {exc}") from exc

    got = []
    with pytest.raises(TransientError, match="translated: connection reset") as raised:
        async with ThreadStream(produce, name="t-error") as stream:
            async for item in stream:
                got.append(item)
    assert got == [1, 2]
    assert isinstance(raised.value.__cause__, DriverError)
    assert alive("t-error") == []


async def test_cancelling_the_consuming_task_stops_and_interrupts_the_thread():
    driver = Driver()

    def produce(out: Outlet) -> None:
        driver.block()

    async def consume():
        async with ThreadStream(produce, interrupt=driver.interrupt, name="t-cancel") as stream:
            async for _ in stream:
                pass

    task = asyncio.create_task(consume())
    await asyncio.to_thread(driver.entered.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert driver.interrupts == 1 and alive("t-cancel") == []


async def test_closing_never_blocks_the_event_loop():
    """A producer that ignores the interrupt for a while: aclose waits for it off the loop, and
    gives up after join_seconds."""
    release = threading.Event()

    def produce(out: Outlet) -> None:
        release.wait(10)

    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    stream = ThreadStream(produce, interrupt=lambda: None, name="t-loop", interrupt_after=0.05, join_seconds=0.6)
    await stream.__aenter__()
    tick = asyncio.create_task(ticker())
    started = time.monotonic()
    await stream.aclose()
    waited = time.monotonic() - started
    tick.cancel()
    assert 0.5 < waited < 2, "bounded by join_seconds"
    assert ticks > 20, "the event loop kept running while the thread was waited for"
    assert alive("t-loop") == ["t-loop"]  # left to end on its own
    release.set()
    await asyncio.to_thread(lambda: [t.join(5) for t in threading.enumerate() if t.name == "t-loop"])


async def test_stop_from_elsewhere_is_an_error_for_a_consumer_still_reading():
    def produce(out: Outlet) -> None:
        i = 0
        while out.put(i):
            i += 1

    stream = ThreadStream(produce, depth=1, name="t-stop")
    async with stream:
        assert await anext(stream) == 0
        stream.stop()  # e.g. the connector's close() while a fetch still runs
        with pytest.raises(TransientError, match="stopped before its end"):
            async for _ in stream:
                pass
    assert alive("t-stop") == []


async def test_put_all_closes_the_producers_generator_when_the_stream_stops():
    closed = threading.Event()

    def pages():
        try:
            yield from range(1000)
        finally:
            closed.set()  # a generator's clean-up: close the result stream

    def produce(out: Outlet) -> None:
        assert out.put_all(pages()) is False

    async with ThreadStream(produce, depth=1, name="t-gen") as stream:
        assert await anext(stream) == 0
    assert closed.is_set() and alive("t-gen") == []


async def test_an_empty_producer_ends_the_stream_and_a_stream_never_started_closes_quietly():
    async with ThreadStream(lambda out: None, name="t-empty") as stream:
        assert [x async for x in stream] == []
    never = ThreadStream(lambda out: out.put(1), name="t-never")
    await never.aclose()
    assert alive("t-empty") == alive("t-never") == []
    with pytest.raises(ValueError):
        ThreadStream(lambda out: None, depth=0)


async def test_a_stream_dropped_without_closing_stops_its_producer():
    import gc
    stopped = threading.Event()

    def produce(out: Outlet) -> None:
        while out.put(0):
            pass
        stopped.set()

    stream = ThreadStream(produce, depth=1, name="t-dropped")
    assert await anext(stream) == 0
    del stream
    gc.collect()
    assert await asyncio.to_thread(stopped.wait, 5)


# -- ThreadSession --------------------------------------------------------------------------------

class Connection:
    def __init__(self, log: list):
        self.log = log
        self.thread = threading.current_thread().name
        self.driver = Driver()
        self.ignore_interrupts = 0

    def interrupt(self) -> None:
        if self.ignore_interrupts:  # like DuckDB, which forgets an interrupt before its query starts
            self.ignore_interrupts -= 1
            return
        self.driver.interrupt()

    def close(self) -> None:
        self.log.append(("close", threading.current_thread().name))


async def test_a_session_connects_once_and_runs_every_call_on_its_own_thread():
    log: list = []
    connects = []

    def connect():
        connects.append(threading.current_thread().name)
        return Connection(log)

    async with ThreadSession(connect, name="s-one") as session:
        names = [await session.call(lambda con: (con.thread, threading.current_thread().name)) for _ in range(3)]
        session.on_close(lambda: log.append(("reader closed", threading.current_thread().name)))
    assert connects == ["s-one"] and set(names) == {("s-one", "s-one")}
    assert log == [("reader closed", "s-one"), ("close", "s-one")]
    assert alive("s-one") == []
    with pytest.raises(TransientError, match="closed"):
        await session.call(lambda con: 1)


async def test_a_failed_connect_is_the_calls_error_and_the_next_call_connects_again():
    attempts = []

    def connect():
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("refused")
        return Connection([])

    async with ThreadSession(connect, name="s-retry") as session:
        with pytest.raises(OSError, match="refused"):
            await session.call(lambda con: 1)
        assert await session.call(lambda con: 2) == 2
        with pytest.raises(ZeroDivisionError):
            await session.call(lambda con: 1 / 0)
        assert await session.call(lambda con: 3) == 3
    assert len(attempts) == 2


async def test_closing_a_session_interrupts_the_running_call_until_it_stops():
    log: list = []
    con = Connection(log)
    con.ignore_interrupts = 3  # the first interrupts come "before the query started"

    async def call():
        async with ThreadSession(lambda: con, interrupt=Connection.interrupt, name="s-cancel") as session:
            await session.call(lambda c: c.driver.block())

    task = asyncio.create_task(call())
    await asyncio.to_thread(con.driver.entered.wait, 5)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 2
    assert con.ignore_interrupts == 0 and con.driver.interrupts == 1, "interrupted again until it stopped"
    assert log == [("close", "s-cancel")] and alive("s-cancel") == []


async def test_a_session_closed_without_a_call_starts_no_thread_and_close_works_from_a_thread():
    session = ThreadSession(lambda: Connection([]), name="s-idle")
    await session.aclose()
    other = ThreadSession(lambda: Connection([]), name="s-sync")
    assert await other.call(lambda con: 5) == 5
    await asyncio.to_thread(other.close)
    assert alive("s-idle") == alive("s-sync") == []


# -- Rechunker ------------------------------------------------------------------------------------

def numbered(start: int, n: int, int_type=pa.int64()) -> pa.Table:
    return pa.table({"i": pa.array(range(start, start + n), int_type),
                     "s": pa.array([f"r{k}" for k in range(start, start + n)])})


@pytest.mark.parametrize("sizes, batch_rows", [
    ([1, 7, 250, 3, 0, 1000, 2], 100),
    ([5000], 64),
    ([1] * 37, 10),
    ([3, 3, 3], 9),
    ([0, 0], 5),
    ([99, 1, 100, 101], 100),
    ([100, 0, 100], 100),
    ([1], 1),
])
def test_the_rechunker_gives_full_batches_in_order_whatever_the_input_sizes(sizes, batch_rows):
    rechunker = Rechunker(batch_rows)
    out, start = [], 0
    for n in sizes:
        out += list(rechunker.push(numbered(start, n)))
        start += n
    out += list(rechunker.flush())
    assert all(isinstance(b, pa.RecordBatch) and b.num_rows for b in out)
    assert [b.num_rows for b in out[:-1]] == [batch_rows] * (len(out) - 1)
    assert (out[-1].num_rows if out else 0) == ((start - 1) % batch_rows + 1 if start else 0)
    assert [v for b in out for v in b.column("i").to_pylist()] == list(range(start))
    assert len({b.schema for b in out}) <= 1


def test_the_rechunker_reads_multi_chunk_tables_and_conforms_later_schemas():
    table = pa.concat_tables([numbered(0, 30), numbered(30, 45)])
    assert table.column("i").num_chunks == 2
    rechunker = Rechunker(50)
    out = list(rechunker.push(table)) + list(rechunker.push(numbered(75, 10, pa.int32()))) + list(rechunker.flush())
    assert [b.num_rows for b in out] == [50, 35]
    assert all(b.schema == table.schema for b in out)
    assert [v for b in out for v in b.column("i").to_pylist()] == list(range(85))
    with pytest.raises(PermanentError, match="changed type between chunks"):
        list(rechunker.push(pa.table({"i": pa.array(["x"]), "s": pa.array(["y"])})))
    with pytest.raises(ValueError):
        Rechunker(0)


def test_the_schema_stays_the_first_ones_also_when_only_metadata_differs():
    first = numbered(0, 3).replace_schema_metadata({"origin": "page 1"})
    second = numbered(3, 4)
    out = list(rechunk([first, second], 5))
    assert [b.num_rows for b in out] == [5, 2]
    assert all(b.schema.equals(first.schema, check_metadata=True) for b in out)


def test_rechunk_takes_a_record_batch_reader_and_big_batches_are_sliced_without_copying():
    big = pa.RecordBatch.from_arrays([pa.array(range(10))], names=["n"])
    reader = pa.RecordBatchReader.from_batches(big.schema, [big, big.slice(0, 0), big.slice(0, 3)])
    out = list(rechunk(reader, 5))
    assert [b.num_rows for b in out] == [5, 5, 3]
    assert out[0].column(0).buffers()[1].address == big.column(0).buffers()[1].address
    assert list(rechunk(iter([]), 5)) == [] and list(rechunk([big.slice(0, 0)], 5)) == []
