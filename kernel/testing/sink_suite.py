"""The sink half of the conformance kit: `SinkSuite`, and helpers that make canonical rows.

Use it from a test module of your plugin::

    import pytest, pytest_asyncio
    from ingestd.testing import SinkSuite

    class TestMySink(SinkSuite):
        @pytest_asyncio.fixture          # or @pytest.fixture under asyncio_mode = "auto"
        async def sink(self, tmp_path):
            sink = MySink(MySinkConfig(path=str(tmp_path / "store"), chunk_rows=100), name="kit")
            await sink.open()
            yield sink
            await sink.close()

        @pytest.fixture                  # optional: enables the reopen test
        def reopen_sink(self, tmp_path):
            async def reopen():
                sink = MySink(MySinkConfig(path=str(tmp_path / "store"), chunk_rows=100), name="kit")
                await sink.open()
                return sink
            return reopen

`sink` may be a plain fixture or an async one (plain `@pytest.fixture` with pytest-asyncio's
auto mode, `@pytest_asyncio.fixture` in strict mode); it yields an opened sink. Configure the
smallest commit size your sink has, so the failure tests cross its chunk boundaries (the kit
sends `batch_rows`-row batches and fails after `fail_after_batches` of them). The kit may call
`close()` before your fixture does, so `close()` must be safe to call twice.

`reopen_sink` (optional) is a callable, sync or async, returning a new opened sink on the same
storage; without it the reopen test is skipped. Every test uses source names of its own, so a
fixture may share one store between tests.

The suite knows the sink only through the `Sink` contract: it writes with `replace` and reads
back with `read_generation` and `scan`, never through the sink's storage, so it runs unchanged
against any store.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pytest

from ingestd import SCHEMAS, Kind, PartitionInfo, Sink, Target

from .connector_suite import Closable

KINDS: tuple[Kind, ...] = ("events", "metrics")
DAY = dt.date(2026, 11, 20)
WAIT_S = 30.0
NOT_CLOSABLE = "scan returned a {}, which has no aclose(): write scan as an `async def` with `yield`"


class KitFailure(Exception):
    """What the kit's batch iterators raise to play a fetch that fails half way."""


def kit_batch(kind: Kind, source: str, day: dt.date, generation: int, rows: int, *, start: int = 0) -> pa.RecordBatch:
    """`rows` valid rows of the canonical schema of `kind`, unit ids `u{start}`, `u{start+1}`, …"""
    schema = SCHEMAS[kind]
    idx = range(start, start + rows)
    now = dt.datetime.now(dt.UTC)
    units = [f"u{i}" for i in idx]
    common = {
        "source": [source] * rows, "day": [day] * rows, "unit_id": units, "id_type": ["user_id"] * rows,
        "generation": [generation] * rows, "ingested_at": [now] * rows,
    }
    if kind == "events":
        midnight = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        data = {
            **common,
            "timestamp": [midnight + dt.timedelta(microseconds=(i * 7_919_000_123) % 86_400_000_000) for i in idx],
            "event_name": ["kit_event" if i % 3 else "kit_purchase" for i in idx],
            "event_value": [None if i % 5 == 0 else str(i) for i in idx],
            "ids": [json.dumps({"user_id": u}) for u in units],
            "metadata": [json.dumps({"i": i, "kit": True}) for i in idx],
        }
    else:
        ratio = [i % 4 == 0 for i in idx]
        data = {
            **common,
            "metric_name": ["kit_metric" if i % 2 else "kit_ratio" for i in idx],
            "numerator": [float(i) if r else None for i, r in zip(idx, ratio, strict=True)],
            "denominator": [float(i % 7 + 1) if r else None for i, r in zip(idx, ratio, strict=True)],
            "metric_value": [float(i) / (i % 7 + 1) if r else float(i) * 0.5 for i, r in zip(idx, ratio, strict=True)],
        }
    return pa.RecordBatch.from_arrays([pa.array(data[f.name], f.type) for f in schema], schema=schema)


def kit_batches(kind: Kind, source: str, day: dt.date, generation: int, rows: int, *,
                batch_rows: int = 250, start: int = 0) -> list[pa.RecordBatch]:
    """`rows` rows as batches of at most `batch_rows` rows."""
    return [kit_batch(kind, source, day, generation, min(batch_rows, rows - off), start=start + off)
            for off in range(0, rows, batch_rows)]


@dataclass
class Gate:
    """Stops a `feed` before batch `at`, until `go` is set; `reached` is set when it stops."""

    at: int
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)


async def feed(batches: Sequence[pa.RecordBatch], *, fail_after: int | None = None,
               gate: Gate | None = None) -> AsyncIterator[pa.RecordBatch]:
    """Yield `batches` as a connector would, giving the loop a turn between them; raise
    `KitFailure` after `fail_after` batches; wait at `gate`."""
    for i, batch in enumerate(batches):
        if fail_after is not None and i == fail_after:
            raise KitFailure(f"kit: the source failed after {i} batches")
        if gate is not None and i == gate.at:
            gate.reached.set()
            await gate.go.wait()
        await asyncio.sleep(0)
        yield batch
    if fail_after is not None and fail_after >= len(batches):
        raise KitFailure(f"kit: the source failed after {len(batches)} batches")


def rows_of(batches: Sequence[pa.RecordBatch] | pa.Table) -> list[dict[str, Any]]:
    """The rows of `batches` as dicts, in `unit_id` order (the kit's unit ids are unique per write)."""
    table = batches if isinstance(batches, pa.Table) else pa.Table.from_batches(list(batches))
    return table.sort_by("unit_id").to_pylist() if table.num_rows else []


def assert_same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]], what: str) -> None:
    """`got == want`, reported as the row count or the first row that differs (not a 1000-row diff)."""
    assert len(got) == len(want), f"{what}: {len(got)} rows, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"{what}: row {i} (by unit_id) is\n  {g}\nexpected\n  {w}"


ReopenSink = Callable[[], Sink | Awaitable[Sink]]
"""The `reopen_sink` fixture's value: returns a new opened sink on the same storage."""


def _source(tag: str = "") -> str:
    return f"kit_{tag}{uuid.uuid4().hex[:8]}"


def _other(kind: Kind) -> Kind:
    return "metrics" if kind == "events" else "events"


class SinkSuite:
    """Conformance tests every sink must pass; subclass it and provide the `sink` fixture
    (see the module docstring). Each test runs for both kinds, events and metrics, and checks
    that: `replace` returns the rows written and `read_generation` reports (generation, rows);
    a new generation replaces the old one whole; batches that raise half way leave the previous
    generation (or nothing) visible and the error propagates; a retry with the same generation
    writes exactly its rows; a read during a replace sees the previous generation (and is not
    held up by it); other days, sources and kinds are untouched, also by concurrent replaces;
    zero batches make an empty generation; an unknown partition reads as None; a reopened sink
    sees what the closed one wrote. `scan` returns exactly the rows of the visible generation, in
    the canonical schema and in batches of at most `batch_rows` rows: the rows written, nothing
    for an empty generation or an unknown partition, the previous generation's rows after a
    failed replace and during a replace; an abandoned scan leaves the sink usable.

    `kit_batch`, `kit_batches`, `feed`, `Gate` and `KitFailure` in this module help a plugin's
    own tests make canonical rows and misbehaving streams."""

    rows = 1000
    batch_rows = 250
    fail_after_batches = 3
    scan_batch_rows = 300
    """The `batch_rows` the kit passes to `scan` (not a divisor of `rows`, on purpose)."""

    @pytest.fixture
    def reopen_sink(self) -> ReopenSink | None:
        """Override with a callable returning a new opened sink on the same storage."""
        return None

    def batches(self, kind: Kind, source: str, generation: int, rows: int | None = None, *,
                day: dt.date = DAY, start: int = 0) -> list[pa.RecordBatch]:
        rows = self.rows if rows is None else rows
        return kit_batches(kind, source, day, generation, rows, batch_rows=self.batch_rows, start=start)

    async def write(self, sink: Sink, kind: Kind, source: str, generation: int, rows: int | None = None, *,
                    day: dt.date = DAY, start: int = 0, **feed_args: Any) -> int:
        batches = self.batches(kind, source, generation, rows, day=day, start=start)
        return await sink.replace(Target(kind, source, day, generation), feed(batches, **feed_args))

    async def scanned(self, sink: Sink, kind: Kind, source: str, day: dt.date = DAY) -> list[dict[str, Any]]:
        """Every row `scan` yields, checked batch by batch (a RecordBatch, exactly the canonical
        schema, at most `scan_batch_rows` rows), as `rows_of` gives them."""
        schema = SCHEMAS[kind]
        got: list[pa.RecordBatch] = []
        stream = sink.scan(kind, source, day, batch_rows=self.scan_batch_rows)
        assert isinstance(stream, Closable), NOT_CLOSABLE.format(type(stream).__name__)
        async with contextlib.aclosing(stream):
            async for batch in stream:
                assert isinstance(batch, pa.RecordBatch), f"scan yielded {type(batch).__name__}, not a RecordBatch"
                assert batch.schema.equals(schema), f"scan's batch schema is\n{batch.schema}\nexpected\n{schema}"
                assert batch.num_rows <= self.scan_batch_rows, \
                    f"scan yielded {batch.num_rows} rows in one batch, more than batch_rows={self.scan_batch_rows}"
                got.append(batch)
        return rows_of(pa.Table.from_batches(got, schema))

    async def fail(self, sink: Sink, kind: Kind, source: str, generation: int, *, day: dt.date = DAY) -> None:
        """A replace whose batches raise after `fail_after_batches` batches (more than one batch)."""
        with pytest.raises(KitFailure):
            await self.write(sink, kind, source, generation, self.batch_rows * (self.fail_after_batches + 2),
                             day=day, start=50_000, fail_after=self.fail_after_batches)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_replace_returns_rows_written_and_read_generation_counts_them(self, sink: Sink, kind: Kind) -> None:
        source = _source()
        batches = kit_batches(kind, source, DAY, 1, self.rows, batch_rows=self.batch_rows)
        batches.insert(1, kit_batch(kind, source, DAY, 1, 0))
        written = await sink.replace(Target(kind, source, DAY, 1), feed(batches))
        assert written == self.rows
        assert await sink.read_generation(kind, source, DAY) == PartitionInfo(1, self.rows)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_replacing_again_leaves_one_copy_of_the_new_generation(self, sink: Sink, kind: Kind) -> None:
        source = _source()
        await self.write(sink, kind, source, 1)
        assert await self.write(sink, kind, source, 2, self.rows + 7, start=10_000) == self.rows + 7
        assert await sink.read_generation(kind, source, DAY) == PartitionInfo(2, self.rows + 7)
        assert await self.write(sink, kind, source, 3, 3, start=20_000) == 3
        assert await sink.read_generation(kind, source, DAY) == PartitionInfo(3, 3)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_a_failure_mid_way_keeps_the_previous_generation_whole(self, sink: Sink, kind: Kind) -> None:
        source = _source()
        await self.write(sink, kind, source, 1)
        await self.fail(sink, kind, source, 2)
        assert await sink.read_generation(kind, source, DAY) == PartitionInfo(1, self.rows)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_a_failed_first_load_leaves_nothing_visible(self, sink: Sink, kind: Kind) -> None:
        source = _source()
        await self.fail(sink, kind, source, 1)
        assert await sink.read_generation(kind, source, DAY) is None

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_a_retry_with_the_same_generation_writes_exactly_its_rows(self, sink: Sink, kind: Kind) -> None:
        source = _source()
        await self.write(sink, kind, source, 1)
        await self.fail(sink, kind, source, 2)
        assert await self.write(sink, kind, source, 2, self.rows + 11, start=90_000) == self.rows + 11
        assert await sink.read_generation(kind, source, DAY) == PartitionInfo(2, self.rows + 11)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_reads_during_a_replace_see_the_previous_generation(self, sink: Sink, kind: Kind) -> None:
        source = _source()
        await self.write(sink, kind, source, 1)
        gate = Gate(at=self.fail_after_batches)
        task = asyncio.create_task(self.write(sink, kind, source, 2, self.rows + 5, start=10_000, gate=gate))
        try:
            await asyncio.wait_for(gate.reached.wait(), WAIT_S)
            seen = await asyncio.wait_for(sink.read_generation(kind, source, DAY), WAIT_S)
            assert seen == PartitionInfo(1, self.rows), "a read during a replace must see the previous generation"
            scanned = await asyncio.wait_for(self.scanned(sink, kind, source), WAIT_S)
            assert {row["generation"] for row in scanned} == {1}, \
                "a scan during a replace must see the previous generation"
            assert len(scanned) == self.rows
        finally:
            gate.go.set()
            written = await asyncio.wait_for(task, WAIT_S)
        assert written == self.rows + 5
        assert await sink.read_generation(kind, source, DAY) == PartitionInfo(2, self.rows + 5)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_other_partitions_are_untouched(self, sink: Sink, kind: Kind) -> None:
        source, neighbour = _source("a"), _source("b")
        other_day = DAY - dt.timedelta(days=1)
        await self.write(sink, kind, source, 1)
        await self.write(sink, kind, source, 4, self.rows + 1, day=other_day)
        await self.write(sink, kind, neighbour, 1, self.rows + 2)
        await self.write(sink, _other(kind), source, 1, self.rows + 3)

        await self.write(sink, kind, source, 2, 17, start=5_000)
        await self.fail(sink, kind, source, 3)

        assert await sink.read_generation(kind, source, DAY) == PartitionInfo(2, 17)
        assert await sink.read_generation(kind, source, other_day) == PartitionInfo(4, self.rows + 1)
        assert await sink.read_generation(kind, neighbour, DAY) == PartitionInfo(1, self.rows + 2)
        assert await sink.read_generation(_other(kind), source, DAY) == PartitionInfo(1, self.rows + 3)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_concurrent_replaces_of_different_partitions(self, sink: Sink, kind: Kind) -> None:
        source, neighbour = _source("a"), _source("b")
        other_day = DAY - dt.timedelta(days=1)
        await self.write(sink, kind, source, 1)
        results = await asyncio.wait_for(asyncio.gather(
            self.write(sink, kind, source, 2, self.rows + 1, start=10_000),
            self.write(sink, kind, source, 1, self.rows + 2, day=other_day),
            self.write(sink, kind, neighbour, 1, self.rows + 3),
            self.fail(sink, _other(kind), source, 1),
        ), WAIT_S * 4)
        assert list(results[:3]) == [self.rows + 1, self.rows + 2, self.rows + 3]
        assert await sink.read_generation(kind, source, DAY) == PartitionInfo(2, self.rows + 1)
        assert await sink.read_generation(kind, source, other_day) == PartitionInfo(1, self.rows + 2)
        assert await sink.read_generation(kind, neighbour, DAY) == PartitionInfo(1, self.rows + 3)
        assert await sink.read_generation(_other(kind), source, DAY) is None

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_zero_batches_make_an_empty_generation(self, sink: Sink, kind: Kind) -> None:
        source = _source()
        assert await sink.replace(Target(kind, source, DAY, 1), feed([])) == 0
        assert await sink.read_generation(kind, source, DAY) == PartitionInfo(1, 0)
        await self.write(sink, kind, source, 2)
        assert await sink.replace(Target(kind, source, DAY, 3), feed([])) == 0
        assert await sink.read_generation(kind, source, DAY) == PartitionInfo(3, 0)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_an_unknown_partition_reads_as_none(self, sink: Sink, kind: Kind) -> None:
        source = _source()
        assert await sink.read_generation(kind, source, DAY) is None
        await self.write(sink, kind, source, 1)
        assert await sink.read_generation(kind, source, DAY + dt.timedelta(days=1)) is None
        assert await sink.read_generation(kind, _source(), DAY) is None
        assert await sink.read_generation(_other(kind), source, DAY) is None

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_a_reopened_sink_sees_the_same_generation(self, sink: Sink, reopen_sink: ReopenSink | None,
                                                            kind: Kind) -> None:
        if reopen_sink is None:
            pytest.skip("no `reopen_sink` fixture: provide one returning a new opened sink on the same storage")
        source = _source()
        await self.write(sink, kind, source, 1)
        await self.write(sink, kind, source, 2, self.rows + 9, start=10_000)
        await self.fail(sink, kind, source, 3)
        await sink.close()
        again = reopen_sink()
        if inspect.isawaitable(again):
            again = await again
        try:
            assert await again.read_generation(kind, source, DAY) == PartitionInfo(2, self.rows + 9)
            assert len(await self.scanned(again, kind, source)) == self.rows + 9
            assert await self.write(again, kind, source, 3, 21, start=30_000) == 21
            assert await again.read_generation(kind, source, DAY) == PartitionInfo(3, 21)
        finally:
            await again.close()

    # -- scan: reading the rows back --------------------------------------------------------

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_scan_returns_the_rows_written(self, sink: Sink, kind: Kind) -> None:
        source = _source()
        first = self.batches(kind, source, 1)
        first.insert(1, kit_batch(kind, source, DAY, 1, 0))
        await sink.replace(Target(kind, source, DAY, 1), feed(first))
        assert_same_rows(await self.scanned(sink, kind, source), rows_of(first), "scan of generation 1")
        second = self.batches(kind, source, 2, self.rows + 7, start=10_000)
        await sink.replace(Target(kind, source, DAY, 2), feed(second))
        assert_same_rows(await self.scanned(sink, kind, source), rows_of(second), "scan of generation 2")

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_an_empty_generation_scans_to_nothing(self, sink: Sink, kind: Kind) -> None:
        source = _source()
        assert await self.scanned(sink, kind, source) == [], "a partition never written must scan to nothing"
        await self.write(sink, kind, source, 1)
        assert await sink.replace(Target(kind, source, DAY, 2), feed([])) == 0
        assert await self.scanned(sink, kind, source) == [], "an empty generation must scan to nothing"
        assert await self.scanned(sink, kind, source, DAY + dt.timedelta(days=1)) == []
        assert await self.scanned(sink, _other(kind), source) == []

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_a_failed_replace_leaves_the_previous_generations_rows(self, sink: Sink, kind: Kind) -> None:
        source, other = _source("a"), _source("b")
        first = self.batches(kind, source, 1)
        await sink.replace(Target(kind, source, DAY, 1), feed(first))
        await self.fail(sink, kind, source, 2)
        assert_same_rows(await self.scanned(sink, kind, source), rows_of(first), "scan after a failed replace")
        await self.fail(sink, kind, other, 1)
        assert await self.scanned(sink, kind, other) == [], "a failed first load must scan to nothing"

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", KINDS)
    async def test_an_abandoned_scan_leaves_the_sink_usable(self, sink: Sink, kind: Kind) -> None:
        source = _source()
        await self.write(sink, kind, source, 1)
        stream = sink.scan(kind, source, DAY, batch_rows=self.scan_batch_rows)
        assert isinstance(stream, Closable), NOT_CLOSABLE.format(type(stream).__name__)
        first = await asyncio.wait_for(anext(stream), WAIT_S)
        assert 0 < first.num_rows <= self.scan_batch_rows
        await asyncio.wait_for(stream.aclose(), WAIT_S)
        assert await self.write(sink, kind, source, 2, 13, start=10_000) == 13
        assert await sink.read_generation(kind, source, DAY) == PartitionInfo(2, 13)
        assert len(await self.scanned(sink, kind, source)) == 13
