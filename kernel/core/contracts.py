"""What a connector and a sink are, and the registry plugins add them to.

Connectors and sinks are classes with async methods (pluggy hooks are synchronous, so hooks
only register factories). Blocking driver calls belong in `asyncio.to_thread` or a worker
thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

import pyarrow as pa

from .errors import PluginError
from .events import Event
from .query import DayQuery, ParamStyle, limit_query

Kind = Literal["events", "metrics"]

T = TypeVar("T")


@runtime_checkable
class Closable(Protocol):
    """A stream with `aclose()`, as an async generator has: how an abandoned stream is stopped."""

    def aclose(self) -> Awaitable[object]: ...


@contextlib.asynccontextmanager
async def aclosing_stream(stream: AsyncIterator[T]) -> AsyncGenerator[AsyncIterator[T], None]:
    """`contextlib.aclosing` for what `fetch` and `scan` return: an async iterator, closed on exit
    with its `aclose()` when it is `Closable`, so an abandoned stream stops."""
    try:
        yield stream
    finally:
        if isinstance(stream, Closable):
            await stream.aclose()


@dataclass(frozen=True)
class Capabilities:
    """What a connector can do. `fingerprint`: its probe returns a content fingerprint.
    `paramstyle`: how it marks bound parameters (`literal`: it has none, and the kernel writes
    the day values into the SQL as typed literals, see `ingestd.core.query.sql_literal`).
    `quote`: its identifier quote character.
    `row_limit`: its warehouse runs `SELECT * FROM (<day query>) ingestd_l LIMIT n`, so a preview,
    `ingestd check` and schema probes read only the rows they show (see `Connector.limited`;
    since API 2, additive: False by default)."""

    fingerprint: bool = False
    paramstyle: ParamStyle = "qmark"
    quote: str = '"'
    row_limit: bool = False


@dataclass(frozen=True)
class ProbeResult:
    rows: int
    fingerprint: str | None = None


@dataclass(frozen=True)
class SourceInfo:
    """What a connector knows of the source it serves: name and time zone, for tags and labels."""

    name: str
    timezone: str = "UTC"


class Connector(ABC):
    """Talks to one warehouse connection (a `[connections.NAME]` table).

    Subclasses set `type_name`, `config_model` (a dataclass, see `kernel.build_model`) and
    `capabilities`, and implement the async methods below. Failures are raised as
    `TransientError` (retried with backoff) or `PermanentError` (the run fails with the message).
    """

    type_name: ClassVar[str]
    config_model: ClassVar[type]
    capabilities: Capabilities = Capabilities()  # per instance: capabilities_for(config)

    def __init__(self, config: Any, *, name: str):
        self.config = config
        self.name = name
        self.capabilities = self.capabilities_for(config)

    @classmethod
    def secret_values(cls, config: Any) -> list[str]:
        """Secret values inside this config beyond its `Secret` fields, for the kernel to scrub
        from every output: the fields of a structured secret such as a private key or a
        service-account file the config names (each one, and each line of a PEM body). Called
        once when the config is read. Since API version 2."""
        return []

    @classmethod
    def capabilities_for(cls, config: Any) -> Capabilities:
        """The capabilities of a connection with this config: `capabilities` unless the config
        changes them (e.g. a `fingerprint = false` key). The kernel checks sources against this
        when it reads the config, before any connector exists. Since API version 1."""
        return cls.capabilities

    @abstractmethod
    async def check(self, query: DayQuery | None = None) -> None:
        """Prove the connection works (and, given a day query, that it may read what it uses)."""

    @abstractmethod
    async def probe(self, query: DayQuery, source: SourceInfo | None = None) -> ProbeResult:
        """The day's row count (and fingerprint if capable), without downloading rows."""

    @abstractmethod
    def fetch(self, query: DayQuery, batch_rows: int,
              source: SourceInfo | None = None) -> AsyncIterator[pa.RecordBatch]:
        """Stream the day's rows as RecordBatches of at most `batch_rows` rows, memory bounded."""

    def fetch_slices(self, queries: list[DayQuery], batch_rows: int,
                     source: SourceInfo | None = None) -> AsyncIterator[pa.RecordBatch] | None:
        """A source with `slices = K`: the K disjoint slice queries of one day fetched at once by
        the connector itself (K connections in its own engine's threads), merged into one stream
        of batches of at most `batch_rows` rows; or None (the default), and the kernel runs each
        slice's `fetch` in a worker process of its own (kernel/engine/slices.py). Since API
        version 2 (additive)."""
        return None

    def limited(self, query: DayQuery, rows: int) -> DayQuery | None:
        """`query` limited to its first `rows` rows (0 or more) in the warehouse, for a preview,
        `ingestd check` and schema probes; None when this connector cannot limit it, and the
        kernel then reads the unlimited query's first batch and closes the stream (as an abandoned
        fetch). Default: `SELECT * FROM (<day query>) ingestd_l LIMIT n` when
        `capabilities.row_limit` is set, else None. Override it for a dialect that says it
        otherwise (`SELECT TOP n`, `FETCH FIRST n ROWS ONLY`). Since API version 2 (additive)."""
        return limit_query(query, rows) if self.capabilities.row_limit else None

    async def result_schema(self, query: DayQuery, source: SourceInfo | None = None) -> pa.Schema | None:
        """The Arrow schema `fetch(query)` yields, learnt without reading rows (a dry run, the
        day query with `LIMIT 0`), or None when the connector cannot tell without rows: the
        default. The kernel asks it where it needs a result's columns and no row came back (an
        empty day), and before reading a row for them (`ingestd check`, schema probes at re-check
        windows); with None it reads one row. Since API version 2 (additive)."""
        return None

    async def close(self) -> None:  # noqa: B027  (optional: nothing to release by default)
        """Release connections."""


@dataclass(frozen=True)
class Fence:
    """The lease a `replace` runs under when replicas share a PostgreSQL state store
    (`[daemon] state_url`): replica `replica` holds `(source, day)` with fencing token `token`
    (the generation it writes).

    A sink that writes into that same PostgreSQL database checks the lease in the transaction that
    makes the new rows visible, so a replica whose lease was taken over (it stalled or was thought
    dead) cannot publish its rows: inside that transaction, run `check_sql` with `params`
    (PostgreSQL `$1`-style placeholders; it locks the lease row until the commit); no row back
    means the lease is lost: roll back and raise `FencedOut`. The sink's database is the state
    store's when `SELECT value FROM <schema>.meta WHERE key = 'store_id'` there returns `store_id`;
    elsewhere a sink cannot fence its rows, and the kernel's own fenced commit of the state is what
    stops a stale generation from being recorded. Since API version 2 (additive)."""

    token: int
    replica: str
    store_id: str
    schema: str
    check_sql: str
    params: tuple[Any, ...]


@dataclass(frozen=True)
class Target:
    """The partition a sink replaces, and the generation it writes; `fence`, the lease the write
    runs under when replicas share a state store (None otherwise)."""

    kind: Kind
    source: str
    day: dt.date
    generation: int
    fence: Fence | None = None


@dataclass(frozen=True)
class PartitionInfo:
    """What a sink holds for (kind, source, day): the visible generation and its row count."""

    generation: int
    rows: int


class Sink(ABC):
    """Stores rows of the canonical schemas (`ingestd.EVENTS_SCHEMA`, `ingestd.METRICS_SCHEMA`).

    `replace` must be atomic per partition: readers see the previous generation or the new one,
    never a mix, and a failure (an exception from `batches` included) leaves the previous one.
    `read_generation` and `scan` are those readers, and the only way the conformance kit reads
    a sink back.
    """

    type_name: ClassVar[str]
    config_model: ClassVar[type]

    def __init__(self, config: Any, *, name: str):
        self.config = config
        self.name = name

    @classmethod
    def secret_values(cls, config: Any) -> list[str]:
        """As `Connector.secret_values`: secrets inside this config beyond its `Secret` fields.
        Since API version 2."""
        return []

    async def open(self) -> None:  # noqa: B027  (optional: nothing to create by default)
        """Create tables and recover from a crash (drop rows of generations never made visible)."""

    @abstractmethod
    async def replace(self, target: Target, batches: AsyncIterator[pa.RecordBatch]) -> int:
        """Make `target.generation` the partition's only visible rows; return rows written."""

    @abstractmethod
    async def read_generation(self, kind: Kind, source: str, day: dt.date) -> PartitionInfo | None:
        """The visible generation of a partition and its row count, or None if never written."""

    @abstractmethod
    def scan(self, kind: Kind, source: str, day: dt.date, *,
             batch_rows: int = 10_000) -> AsyncIterator[pa.RecordBatch]:
        """Stream the rows of the partition's visible generation; implement it as an `async def`
        with `yield`. Required since API version 2.

        Every batch has exactly the canonical schema `SCHEMAS[kind]` (its `generation` column is
        the visible generation) and at most `batch_rows` rows; memory must not grow with the
        partition. The rows are those of one generation, never a mix, even while a `replace` of
        the partition runs (it sees the generation visible when the scan began). A partition
        never written, and an empty generation, yield no rows. Row order is not specified.
        The kernel does not call it: the conformance kit and tools read a sink back with it."""

    async def close(self) -> None:  # noqa: B027  (optional: nothing to flush by default)
        """Flush and release the store."""


OUTCOMES = ("delivered", "retried", "failed", "dropped")


class ObserverStats:
    """What an observer did with the events it was given, by outcome: `delivered`, `retried` (an
    attempt failed and will be tried again), `failed` (given up after its retries) and `dropped`
    (refused: the queue was full, or the observer was closing). The daemon shows them in
    `/metrics` as `ingestd_observer_deliveries_total{observer, outcome}`."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)

    def count(self, outcome: str, n: int = 1) -> None:
        if outcome not in self.counts:
            raise ValueError(f"unknown outcome {outcome!r} (outcomes: {', '.join(OUTCOMES)})")
        self.counts[outcome] += n


class Observer(ABC):
    """Tells something outside the daemon about its events (a webhook, a chat channel, an audit
    log): one instance per `[observers.NAME]` table, made and opened when the process starts.

    `observe` is called in the event loop for every committed event, so it must return at once:
    queue the event and deliver it from a task or a thread that `open` starts. A slow or dead
    endpoint must never delay a load. Count what happens to each event in `self.stats`. Since API
    version 2 (additive)."""

    type_name: ClassVar[str]
    config_model: ClassVar[type]

    def __init__(self, config: Any, *, name: str):
        self.config = config
        self.name = name
        self.stats = ObserverStats()

    @classmethod
    def secret_values(cls, config: Any) -> list[str]:
        """As `Connector.secret_values`: secrets inside this config beyond its `Secret` fields."""
        return []

    async def open(self) -> None:  # noqa: B027  (optional: nothing to start by default)
        """Start delivering (a task, a thread, a session)."""

    @abstractmethod
    def observe(self, event: Event) -> None:
        """Take one event: synchronous, non-blocking (queue it; never do I/O here)."""

    async def close(self) -> None:  # noqa: B027  (optional: nothing to flush by default)
        """Deliver what is queued within a bounded time (a few seconds), then stop."""


@dataclass
class Registry:
    """Passed to `ingestd_register`: plugins add connector, sink and observer classes by type name."""

    connectors: dict[str, type[Connector]] = field(default_factory=dict)
    sinks: dict[str, type[Sink]] = field(default_factory=dict)
    observers: dict[str, type[Observer]] = field(default_factory=dict)
    provided_by: dict[tuple[str, str], str] = field(default_factory=dict)
    _current_plugin: str = "?"

    def add_connector(self, cls: type[Connector]) -> None:
        self._add("connector", self.connectors, cls, Connector)

    def add_sink(self, cls: type[Sink]) -> None:
        self._add("sink", self.sinks, cls, Sink)

    def add_observer(self, cls: type[Observer]) -> None:
        self._add("observer", self.observers, cls, Observer)

    def _add(self, what: str, table: dict[str, Any], cls: type, base: type) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"{what} {cls!r} is not a subclass of kernel.{base.__name__}")
        name = getattr(cls, "type_name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"{what} {cls.__name__} has no type_name")
        if not hasattr(cls, "config_model"):
            raise PluginError(f"{what} {name} has no config_model")
        if name in table:
            other = self.provided_by.get((what, name), "?")
            raise PluginError(f"{what} type {name!r} is already provided by plugin {other}")
        table[name] = cls
        self.provided_by[(what, name)] = self._current_plugin
