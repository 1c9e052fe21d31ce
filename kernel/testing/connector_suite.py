"""The connector half of the conformance kit.

A connector author subclasses `ConnectorSuite` in a test module and provides two fixtures (a third
is optional):

    from ingestd.testing import ConnectorSuite

    class TestMyWarehouse(ConnectorSuite):
        batch_rows = 100                      # optional

        @pytest.fixture
        async def connector(self):            # an opened connector on a real (test) warehouse
            c = MyConnector(MyConfig(...), name="kit")
            yield c
            await c.close()

        @pytest.fixture
        async def kit_table(self, connector): # a KitTable over an EMPTY table
            ...                               # ts TIMESTAMP, user_id VARCHAR, event VARCHAR, value DOUBLE

        @pytest.fixture                       # optional: enables the unreachable-warehouse test
        def broken_connector(self):           # a connector whose warehouse cannot be used
            return MyConnector(MyConfig(host="127.0.0.1", port=1), name="kit-broken")

The suite then checks what the kernel relies on: probe and fetch agree on a half-open day
window, batches are bounded Arrow record batches, an empty day yields nothing, day values
are bound parameters (never SQL text), fingerprints are stable and see a changed value at
equal count, errors are sorted into the kernel's classes (bad SQL is permanent; an unreachable
warehouse raises `TransientError` or `PermanentError`, never a driver's own exception), and an
abandoned fetch leaves the connector usable; a connector that can limit a query (`limited`) reads at most
that many rows of the day, and one that tells a result's schema without rows (`result_schema`)
tells the schema its fetch yields. The tests are marked `asyncio`, so they run in
pytest-asyncio's strict mode too (the author's async fixtures then need
`@pytest_asyncio.fixture`). The pytest plugin `ingestd.testing.plugin` marks them `ingestd_kit`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import ClassVar, Literal, Protocol, runtime_checkable

import pyarrow as pa
import pytest

from ingestd import (
    Connector,
    ConnectorError,
    DayQuery,
    DayWindow,
    PermanentError,
    ProbeResult,
    TransientError,
    day_query,
)

DAY = dt.date(2026, 3, 10)


def kit_day_query(connector: Connector, sql: str, day: dt.date = DAY, timezone: str = "UTC", *,
                  filter_column: str | None = None,
                  filter_kind: Literal["timestamp", "date"] = "timestamp") -> DayQuery:
    """`sql` bound to `day` exactly as the kernel binds a source query for this connector: its
    `{day}`, `{start}`, `{end}` become the connector's parameter markers (a query without them is
    wrapped and filtered on `filter_column`). For a plugin's own tests."""
    return day_query(sql, DayWindow.of(day, timezone), connector.capabilities, filter_column=filter_column,
                     filter_kind=filter_kind)


@runtime_checkable
class Closable(Protocol):
    """A stream with `aclose()`, as an async generator has: how the kernel stops a fetch or scan
    it abandons, so the kit requires it of both."""

    def aclose(self) -> Awaitable[object]: ...


@runtime_checkable
class KitTable(Protocol):
    """A table in the author's warehouse that the suite fills through the author's own code."""

    name: str
    """How SQL refers to the table (qualified and quoted as the warehouse needs)."""

    async def insert(self, rows: list[tuple[dt.datetime, str, str, float]]) -> None:
        """Insert rows of (ts as naive UTC datetime, user_id, event, value)."""

    async def update_value(self, user_id: str, value: float) -> None:
        """Set `value` of the row(s) of `user_id` in place: the row count does not change."""


def day_rows(day: dt.date, n: int, prefix: str = "u") -> list[tuple[dt.datetime, str, str, float]]:
    """`n` rows spread over `day`, the first one exactly at its start (midnight UTC)."""
    start = dt.datetime(day.year, day.month, day.day)
    step = 86_399 / max(n, 1)
    return [(start + dt.timedelta(seconds=int(i * step)), f"{prefix}{day:%m%d}-{i:05d}", "click", float(i))
            for i in range(n)]


def neighbour_rows(day: dt.date) -> list[tuple[dt.datetime, str, str, float]]:
    """Rows just outside the day: before its start, exactly at its end (excluded: the window is
    half-open) and inside the next day."""
    start = dt.datetime(day.year, day.month, day.day)
    end = start + dt.timedelta(days=1)
    return [
        (start - dt.timedelta(seconds=1), "before-1", "click", 1.0),
        (start - dt.timedelta(hours=6), "before-2", "click", 2.0),
        (end, "at-end", "click", 3.0),
        (end + dt.timedelta(hours=6), "after-1", "click", 4.0),
    ]


HOSTILE = [
    "{date}' OR '1'='1",
    "{date} 00:00:00' OR 1=1 --",
    "{date}'; DELETE FROM {table}; --",
    "{date}') OR ('1'='1",
]


def hostile_values(names: tuple[str, ...], table: str) -> list[dict[str, str]]:
    """Day values carrying SQL, one placeholder at a time and all at once. Their date part
    makes a lenient warehouse that parses only a prefix read nothing either: far future for
    `day` and `start`, far past for `end`."""
    dates = {"day": "2999-01-01", "start": "2999-01-01", "end": "1999-01-01"}
    out: list[dict[str, str]] = []
    for text in HOSTILE:
        one = {n: text.format(date=dates[n], table=table) for n in names}
        out += [{n: v} for n, v in one.items()] + [one]
    return out


class ConnectorSuite:
    """Mixin of conformance tests; subclass it as `Test...` and provide the fixtures
    `connector` and `kit_table` (see the module docstring)."""

    batch_rows: ClassVar[int] = 100

    @pytest.fixture
    def broken_connector(self) -> Connector | None:
        """Override with a connector whose warehouse cannot be reached or refuses it (a closed
        port, bad credentials, a missing file or folder); without it that test is skipped."""
        return None

    # -- helpers -----------------------------------------------------------------------------

    def day_query(self, connector: Connector, table: KitTable, day: dt.date = DAY,
                  where: str = "ts >= {start} AND ts < {end}", columns: str = "ts, user_id, event, value") -> DayQuery:
        return kit_day_query(connector, f"SELECT {columns} FROM {table.name} WHERE {where}", day)

    async def fetch_all(self, connector: Connector, query: DayQuery) -> list[pa.RecordBatch]:
        return [b async for b in connector.fetch(query, self.batch_rows)]

    def day_size(self) -> int:
        return self.batch_rows * 5 // 2

    async def fill(self, table: KitTable) -> int:
        """DAY with 2.5 x batch_rows rows, plus rows around it; returns the day's row count."""
        n = self.day_size()
        await table.insert(day_rows(DAY, n) + neighbour_rows(DAY))
        return n

    async def counts(self, connector: Connector, table: KitTable) -> list[int]:
        days = [DAY - dt.timedelta(days=1), DAY, DAY + dt.timedelta(days=1)]
        return [(await connector.probe(self.day_query(connector, table, d))).rows for d in days]

    # -- the tests -----------------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_check_succeeds(self, connector: Connector, kit_table: KitTable) -> None:
        await connector.check()
        await connector.check(self.day_query(connector, kit_table))

    @pytest.mark.asyncio
    async def test_probe_count_equals_rows_fetched_in_a_half_open_day(
            self, connector: Connector, kit_table: KitTable) -> None:
        n = await self.fill(kit_table)
        query = self.day_query(connector, kit_table)
        probed = await connector.probe(query)
        assert isinstance(probed, ProbeResult)
        assert probed.rows == n, "the probe must count the rows of [start, end) only"
        batches = await self.fetch_all(connector, query)
        assert sum(b.num_rows for b in batches) == n
        names = [c.lower() for c in batches[0].schema.names]
        assert names == ["ts", "user_id", "event", "value"]
        users: set[str] = set()
        for b in batches:
            column = b.column(names.index("user_id")).to_pylist()
            users.update(column)
        assert users == {u for _, u, _, _ in day_rows(DAY, n)}, "fetch returned rows outside the day or lost some"

    @pytest.mark.asyncio
    async def test_batches_are_record_batches_of_at_most_batch_rows(
            self, connector: Connector, kit_table: KitTable) -> None:
        await self.fill(kit_table)
        batches = await self.fetch_all(connector, self.day_query(connector, kit_table))
        assert len(batches) >= 3
        for b in batches:
            assert isinstance(b, pa.RecordBatch), f"fetch yielded {type(b).__name__}, not a pyarrow.RecordBatch"
            assert 0 < b.num_rows <= self.batch_rows

    @pytest.mark.asyncio
    async def test_an_empty_day_probes_zero_and_fetches_no_batch(
            self, connector: Connector, kit_table: KitTable) -> None:
        await kit_table.insert(neighbour_rows(DAY))
        query = self.day_query(connector, kit_table)
        assert (await connector.probe(query)).rows == 0
        assert await self.fetch_all(connector, query) == []

    @pytest.mark.asyncio
    async def test_day_values_carrying_sql_cannot_change_the_query(
            self, connector: Connector, kit_table: KitTable) -> None:
        n = await self.fill(kit_table)
        before = await self.counts(connector, kit_table)
        assert before[1] == n
        queries = [
            self.day_query(connector, kit_table),
            self.day_query(connector, kit_table, where="CAST(ts AS DATE) = {day}"),
        ]
        for base in queries:
            for values in hostile_values(base.names, kit_table.name):
                try:
                    query = base.with_values(**values)
                except TypeError:
                    # The literal style writes only date, datetime and int objects into SQL.
                    assert connector.capabilities.paramstyle == "literal", "with_values refused a day value"
                    continue
                try:
                    probed = await connector.probe(query)
                    fetched = sum(b.num_rows for b in await self.fetch_all(connector, query))
                except ConnectorError:
                    continue
                assert probed.rows == 0 and fetched == 0, f"values {values} changed what the query reads"
        assert await self.counts(connector, kit_table) == before, "a day value changed the table"

    @pytest.mark.asyncio
    async def test_fingerprint_is_stable_and_sees_a_changed_value_at_equal_count(
            self, connector: Connector, kit_table: KitTable) -> None:
        if not connector.capabilities.fingerprint:
            pytest.skip("the connector declares no fingerprint capability")
        await self.fill(kit_table)
        query = self.day_query(connector, kit_table)
        first = await connector.probe(query)
        second = await connector.probe(query)
        assert first.fingerprint is not None
        assert second == first, "two probes of unchanged data must give the same fingerprint"
        user = day_rows(DAY, self.day_size())[7][1]
        await kit_table.update_value(user, 123456.5)
        changed = await connector.probe(query)
        assert changed.rows == first.rows
        assert changed.fingerprint != first.fingerprint, "a changed value at equal count must change the fingerprint"

    @pytest.mark.asyncio
    async def test_bad_sql_is_a_permanent_error(self, connector: Connector, kit_table: KitTable) -> None:
        await self.fill(kit_table)
        caps = connector.capabilities
        window = DayWindow.of(DAY)
        bad = [
            "SELECT ts FROM ingestd_kit_no_such_table WHERE ts >= {start} AND ts < {end}",
            f"SELECT no_such_column FROM {kit_table.name} WHERE ts >= {{start}} AND ts < {{end}}",
            f"SELEC ts FROM {kit_table.name} WHERE ts >= {{start}} AND ts < {{end}}",
        ]
        for sql in bad:
            query = day_query(sql, window, caps)
            with pytest.raises(PermanentError):
                await connector.check(query)
            with pytest.raises(PermanentError):
                await connector.probe(query)
            with pytest.raises(PermanentError):
                await self.fetch_all(connector, query)

    @pytest.mark.asyncio
    async def test_an_unreachable_warehouse_raises_the_kernels_error_classes(
            self, broken_connector: Connector | None) -> None:
        if broken_connector is None:
            pytest.skip("no `broken_connector` fixture: provide one whose warehouse cannot be used")
        caps = broken_connector.capabilities
        query = day_query("SELECT 1 AS x WHERE {day} IS NOT NULL", DayWindow.of(DAY), caps)
        calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("check()", broken_connector.check), ("check(query)", lambda: broken_connector.check(query)),
            ("probe", lambda: broken_connector.probe(query)),
            ("fetch", lambda: self.fetch_all(broken_connector, query))]
        for what, call in calls:
            try:
                await call()
            except (TransientError, PermanentError):
                continue
            except Exception as exc:
                pytest.fail(f"{what} raised {type(exc).__module__}.{type(exc).__name__}: {exc}; sort it into "
                            "ingestd.TransientError (a retry may help) or ingestd.PermanentError (it will not)")
            pytest.fail(f"{what} succeeded on a warehouse that cannot be used")

    @pytest.mark.asyncio
    async def test_an_abandoned_fetch_does_not_break_the_next_probe(
            self, connector: Connector, kit_table: KitTable) -> None:
        n = await self.fill(kit_table)
        query = self.day_query(connector, kit_table)
        stream = connector.fetch(query, self.batch_rows)
        assert isinstance(stream, Closable), \
            f"fetch returned a {type(stream).__name__}, which has no aclose() to stop it with"
        async for batch in stream:
            assert batch.num_rows > 0
            break
        await stream.aclose()
        assert (await connector.probe(query)).rows == n
        assert sum(b.num_rows for b in await self.fetch_all(connector, query)) == n

    @pytest.mark.asyncio
    async def test_a_row_limit_reads_at_most_that_many_rows_of_the_day(
            self, connector: Connector, kit_table: KitTable) -> None:
        n = await self.fill(kit_table)
        query = self.day_query(connector, kit_table)
        if connector.limited(query, 1) is None:
            pytest.skip("the connector cannot limit a query in the warehouse (no `row_limit` capability, "
                        "`limited` returns None): the kernel cuts the stream instead")
        whole = await self.fetch_all(connector, query)
        day_users = {u for b in whole for u in b.column(1).to_pylist()}
        for rows in (1, 7, n + 10):
            limited = connector.limited(query, rows)
            assert limited is not None
            batches = await self.fetch_all(connector, limited)
            assert sum(b.num_rows for b in batches) == min(rows, n), f"LIMIT {rows} read another number of rows"
            assert [c.lower() for c in batches[0].schema.names] == ["ts", "user_id", "event", "value"]
            assert {u for b in batches for u in b.column(1).to_pylist()} <= day_users, "rows outside the day"
        zero = connector.limited(query, 0)
        assert zero is not None
        assert await self.fetch_all(connector, zero) == [], "LIMIT 0 must read no row"

    @pytest.mark.asyncio
    async def test_result_schema_is_the_schema_fetch_yields(self, connector: Connector, kit_table: KitTable) -> None:
        await self.fill(kit_table)
        query = self.day_query(connector, kit_table)
        schema = await connector.result_schema(query)
        if schema is None:
            pytest.skip("the connector cannot tell a result's schema without rows (`result_schema` returns None): "
                        "the kernel reads one row instead")
        assert isinstance(schema, pa.Schema), f"result_schema returned {type(schema).__name__}, not a pyarrow.Schema"
        fetched = (await self.fetch_all(connector, query))[0].schema
        assert [(f.name, f.type) for f in schema] == [(f.name, f.type) for f in fetched], \
            f"result_schema says {schema}, but fetch yields {fetched}"
        empty = await connector.result_schema(self.day_query(connector, kit_table, DAY + dt.timedelta(days=3)))
        if empty is not None:
            assert [(f.name, f.type) for f in empty] == [(f.name, f.type) for f in fetched], \
                f"result_schema of a day without rows says {empty}, but fetch yields {fetched}"
