"""The state store on both backends, one suite: SQLite (a file; several test "replicas" open it
without the lock file) and PostgreSQL (a throw-away cluster from tests/postgres.py, one schema per
test). Records as the engine uses them, then what replicas need: heartbeats, partition leases with
fencing tokens, fenced commits, window and backfill-day claims, outbox adoption, migrations.
Concurrency is real: several stores (replica ids) against one database, `asyncio.gather`."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import sys
import uuid
from pathlib import Path

import pytest

from ingestd.core.errors import ConfigErrors, FencedOut, StateError
from ingestd.core.events import LoadStarted, LoadSucceeded
from ingestd.core.secrets import SECRETS
from ingestd.engine.state import SCHEMA_VERSION, StateStore
from tests.postgres import postgres_cluster  # noqa: F401  (a fixture)
from tests.support import write_config

D1, D2, D3 = dt.date(2026, 3, 1), dt.date(2026, 3, 2), dt.date(2026, 3, 3)
PG_USER, PG_PASSWORD = "ingestd_state", "state-store-password-7Q"


@pytest.fixture(scope="module")
def pg(postgres_cluster):  # noqa: F811
    """A login role owning database `state` (not a superuser: it creates its schema as the owner)."""
    postgres_cluster.create_user(PG_USER, PG_PASSWORD)
    postgres_cluster.create_database("state", owner=PG_USER)
    return postgres_cluster


def pg_url(cluster) -> str:
    return f"postgresql://{PG_USER}@{cluster.host}:{cluster.port}/state"


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request):
    return request.param


@pytest.fixture
async def make(backend, tmp_path, request):
    """`await make(replica, **kw)`: an open store on this test's database, as replica `replica`."""
    opened: list[StateStore] = []
    where: dict = {"exclusive": False}
    if backend == "postgres":
        cluster = request.getfixturevalue("pg")
        where = {"url": pg_url(cluster), "password": PG_PASSWORD, "schema": f"t_{uuid.uuid4().hex[:10]}"}

    async def make_store(replica: str = "r1", **kw) -> StateStore:
        store = StateStore(tmp_path / "state.db", replica=replica, **{**where, **kw})
        await store.open()
        opened.append(store)
        return store

    yield make_store
    for store in opened:
        await store.close()


async def q(store: StateStore, sql: str, params=()) -> list[tuple]:
    """Rows read straight from the store's database."""
    return [tuple(r) for r in await store._all(sql, params)]


async def loaded(store: StateStore, day: dt.date, token: int | None = None, *, rows: int = 10,
                 events: list | None = None) -> str:
    """A load of (s, day) start to finish, as the engine records one."""
    run_id = await store.start_run("s", day, "scheduled", token or 1, None, lambda rid: [
        LoadStarted(source="s", day=day, run_id=rid)], first_load=True)
    await store.finish_run(run_id, status="succeeded", rows_fetched=rows, rows_written=rows, duration_ms=5,
                           partition={"status": "succeeded", "generation": token or 1, "rows": rows},
                           events=events if events is not None else [LoadSucceeded(source="s", day=day, run_id=run_id)],
                           fence_token=token)
    return run_id


# -- records as the engine uses them ------------------------------------------------------------

async def test_runs_and_partitions_are_recorded_together(make):
    delivered: list[str] = []
    store = await make(outbox=True, on_events=lambda events: delivered.extend(e.type for e in events))
    run_id = await store.start_run("s", D1, "scheduled", 1, None, lambda rid: [], first_load=True)
    assert [r.run_id for r in await store.running_runs()] == [run_id]
    await store.progress(run_id, 7)
    await store.finish_run(run_id, status="succeeded", rows_fetched=12, rows_written=10, rows_rejected=2,
                           rejects={"bad_ts": 2}, samples=[{"reason": "bad_ts", "row": {"ts": "x"}}] * 2,
                           duration_ms=30, partition={"status": "succeeded", "generation": 1, "rows": 10},
                           events=[LoadSucceeded(source="s", day=D1, run_id=run_id)])
    part = await store.partition("s", D1)
    assert part is not None and (part.status, part.generation, part.rows, part.last_run_id) == (
        "succeeded", 1, 10, run_id)
    assert await store.running_runs() == []
    last = await store.last_run("s")
    assert last is not None and (last.status, last.rows_written, last.first_load, last.replica) == (
        "succeeded", 10, True, "r1")
    assert (await store.latest_runs("s", D1, D2))[D1].run_id == run_id
    assert [r.run_id for r in (await store.runs_of("s", D1, D1))[D1]] == [run_id]
    rejects = await store.run_rejects([run_id], per_run=1)
    assert rejects[run_id] == {"reasons": {"bad_ts": 2}, "samples": [{"reason": "bad_ts", "row": {"ts": "x"}}]}
    assert await store.partition_counts() == {("s", "succeeded"): 1}
    assert await store.last_loaded_day("s") == D1
    assert "s" in await store.last_loaded_at()
    usage = await store.usage()
    assert [(u["source"], u["day"], u["trigger"], u["load"], u["rows"], u["loads"]) for u in usage] == [
        ("s", D1.isoformat(), "scheduled", "first", 10, 1)]
    finished = (await store.last_run("s")).finished_at
    assert [(u["month"], u["rows"]) for u in await store.usage(by="month")] == [(finished[:7], 10)]
    await store.set_partition("s", D2, status="held", held_rows=4)
    assert [p.day for p in await store.partitions("s")] == [D1, D2]
    assert delivered == ["load.succeeded"]
    assert await q(store, "SELECT type, replica FROM outbox") == [("load.succeeded", "r1")]


async def test_a_failed_transaction_writes_nothing_and_delivers_nothing(make):
    delivered: list = []
    store = await make(outbox=True, on_events=delivered.extend)
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.upsert_partition("s", D1.isoformat(), status="succeeded", generation=3)
            tx.emit(LoadSucceeded(source="s", day=D1))
            raise RuntimeError("boom")
    assert await store.partition("s", D1) is None
    assert await q(store, "SELECT COUNT(*) FROM outbox") == [(0,)]
    assert delivered == []


async def test_secrets_are_scrubbed_from_what_the_store_writes(make):
    SECRETS.add(["sekrit-token-123"])
    try:
        store = await make()
        run_id = await store.start_run("s", D1, "scheduled", 1, None, lambda rid: [])
        await store.finish_run(run_id, status="failed", reason="auth failed with sekrit-token-123")
        assert await q(store, "SELECT reason FROM runs") == [("auth failed with ***",)]
    finally:
        SECRETS.clear()


async def test_outbox_batches_and_deletes(make):
    store = await make(outbox=True)
    await store.emit([LoadSucceeded(source="s", day=D1), LoadSucceeded(source="s", day=D2)])
    batch = await store.outbox_batch()
    assert [(t, s, p["day"]) for _, t, s, p in batch] == [("load.succeeded", "s", "2026-03-01"),
                                                         ("load.succeeded", "s", "2026-03-02")]
    assert await store.outbox_depth() == 2
    await store.outbox_delete([batch[0][0]])
    assert [p["day"] for _, _, _, p in await store.outbox_batch()] == ["2026-03-02"]


async def test_backfills_days_and_progress(make):
    store = await make()
    b, created = await store.create_backfill(["a", "b"], D1, D3, request_id="req-1", origin="cli",
                                             events=lambda b, n: [], only=lambda s, d: (s, d) != ("b", D2))
    assert created and (b.sources, b.day_from, b.day_to, b.status, b.skipped) == (["a", "b"], D1, D3, "running", 1)
    again, created_again = await store.create_backfill(["a"], D1, D1, request_id="req-1", origin="cli",
                                                       events=lambda b, n: [])
    assert (again.id, created_again) == (b.id, False)
    assert len(await store.backfill_days(b.id, "pending")) == 5
    seen: list[tuple[int, int]] = []
    await store.finish_backfill_day(b.id, "a", D1, "succeeded", None, lambda done, total: seen.append((done, total))
                                    or [])
    assert seen == [(1, 5)]
    assert (await store.find_backfill(["a", "b"], D1, D3)).id == b.id
    progress = await store.backfill_progress(b.id)
    assert (progress["total"], progress["done"], progress["pending"]) == (5, 1, 4)
    await store.finish_backfill(b.id, "cancelled")
    assert {s for _, _, s in await store.backfill_days(b.id)} == {"succeeded", "cancelled"}
    assert [x.status for x in await store.backfills()] == ["cancelled"]


async def test_windows_and_result_schemas(make):
    store = await make()
    at = dt.datetime(2026, 3, 1, 6, tzinfo=dt.UTC)
    assert await store.window_seen("s", "load") is None
    await store.mark_window("s", "load", at)
    await store.mark_window("s", "load", at - dt.timedelta(hours=1))  # never moves back
    assert await store.window_seen("s", "load") == at
    columns = [{"name": "ts", "type": "timestamp", "family": "timestamp"}]
    await store.save_result_schema("s", columns, "h1", D1, "run1")
    await store.note_schema_seen("s", [{"name": "ts", "type": "text", "family": "string"}], {"summary": "ts"})
    stored = await store.result_schema("s")
    assert stored is not None and stored.columns == columns and stored.seen and stored.change == {"summary": "ts"}
    await store.save_result_schema("s", columns, "h2", D2, "run2")
    stored = await store.result_schema("s")
    assert stored is not None and stored.seen is None and stored.query_hash == "h2"


# -- replicas and leases ------------------------------------------------------------------------

async def test_heartbeats_say_who_is_alive(make):
    a = await make("a")
    b = await make("b", lease_seconds=0.5)
    await a.heartbeat()
    assert {r.replica for r in await b.live_replicas()} == {"a", "b"}
    assert all(r.pid > 0 and r.seen_at >= r.started_at for r in await b.live_replicas())
    await asyncio.sleep(0.7)
    await b.heartbeat()
    assert [r.replica for r in await b.live_replicas()] == ["b"]
    assert await b.forget_replicas(0.5) == 1
    assert await q(b, "SELECT replica FROM replicas") == [("b",)]


async def test_a_broken_postgres_connection_is_made_again(pg):
    store = await StateStore(Path("unused"), url=pg_url(pg), password=PG_PASSWORD,
                             schema=f"t_{uuid.uuid4().hex[:10]}", replica="a").open()
    try:
        await store.set_partition("s", D1, status="succeeded", generation=1)
        assert pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ingestd a'") == [(2,)]
        pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (PG_USER,))
        assert (await store.partition("s", D1)).generation == 1  # a read: tried again on a new connection
        with pytest.raises(StateError, match="the connection was lost"):
            await store.set_partition("s", D2, status="succeeded", generation=1)
        await store.set_partition("s", D2, status="succeeded", generation=2)  # the next one reconnects
        assert (await store.partition("s", D2)).generation == 2
    finally:
        await store.close()


async def test_a_partition_lease_is_held_by_one_replica_and_taken_over_when_it_expires(make):
    a, b = await make("a"), await make("b")
    token = await a.claim_partition("s", D1, 0.5)
    assert token == 1
    assert await b.claim_partition("s", D1, 0.5) is None
    assert await a.claim_partition("s", D1, 0.5) == 2  # again by its holder: a new token
    assert await a.renew_partition("s", D1, 2, 0.5)
    assert not await a.renew_partition("s", D1, 1, 0.5)  # an old token is no longer the lease
    await asyncio.sleep(0.7)
    assert not await a.renew_partition("s", D1, 2, 0.5)  # expired: not renewed
    taken = await b.claim_partition("s", D1, 30)
    assert taken == 3
    assert await q(a, "SELECT replica, token FROM leases") == [("b", 3)]
    assert await a.claim_partition("s", D1, 30) is None


async def test_tokens_stay_above_the_generation_and_a_released_token(make):
    a, b = await make("a"), await make("b")
    await a.set_partition("s", D1, status="succeeded", generation=7)
    token = await a.claim_partition("s", D1)
    assert token == 8
    await a.release_partition("s", D1, token)
    assert await b.claim_partition("s", D1) == 9


async def test_one_claimer_wins_a_partition_among_many(make):
    stores = [await make(f"r{i}") for i in range(5)]
    tokens = await asyncio.gather(*(s.claim_partition("s", D1, 30) for s in stores))
    assert sorted(tokens, key=str) == [1, None, None, None, None]


async def test_a_fenced_commit_is_refused_after_a_takeover_and_writes_nothing(make):
    a = await make("a", outbox=True)
    b = await make("b", outbox=True)
    token = await a.claim_partition("s", D1, 0.5)
    run_a = await a.start_run("s", D1, "scheduled", token, None, lambda rid: [])
    await asyncio.sleep(0.7)  # a stalls past its lease
    token_b = await b.claim_partition("s", D1, 30)
    assert token_b == 2
    await loaded(b, D1, token_b, rows=20)
    outbox_before = await q(a, "SELECT COUNT(*) FROM outbox")
    with pytest.raises(FencedOut):
        await a.finish_run(run_a, status="succeeded", rows_written=10, samples=[{"reason": "r", "row": {}}],
                           partition={"status": "succeeded", "generation": token, "rows": 10},
                           events=[LoadSucceeded(source="s", day=D1, run_id=run_a)], fence_token=token)
    part = await a.partition("s", D1)
    assert part is not None and (part.generation, part.rows) == (2, 20)
    assert await q(a, "SELECT status FROM runs WHERE run_id = ?", (run_a,)) == [("running",)]
    assert await q(a, "SELECT COUNT(*) FROM rejects") == [(0,)]
    assert await q(a, "SELECT COUNT(*) FROM outbox") == outbox_before


async def test_a_fenced_commit_with_the_live_lease_succeeds(make):
    a = await make("a")
    token = await a.claim_partition("s", D1)
    await loaded(a, D1, token)
    assert (await a.partition("s", D1)).generation == token


async def test_the_fence_a_postgres_sink_checks(make, backend):
    a, b = await make("a"), await make("b")
    token = await a.claim_partition("s", D1, 0.5)
    fence = a.fence("s", D1, token)
    if backend == "sqlite":
        assert fence is None
        return
    assert fence is not None and (fence.token, fence.replica, fence.schema) == (token, "a", a.backend.schema)
    assert await q(a, "SELECT value FROM meta WHERE key = 'store_id'") == [(fence.store_id,)]
    import psycopg

    async def holds() -> bool:
        # As a sink runs it: `$n` placeholders (a raw cursor), inside its own transaction.
        async with await psycopg.AsyncConnection.connect(a.backend.url, password=PG_PASSWORD) as con:
            async with con.transaction():
                cur = psycopg.AsyncRawCursor(con)
                await cur.execute(fence.check_sql, fence.params)
                return bool(await cur.fetchall())

    assert await holds()
    await asyncio.sleep(0.7)
    assert await b.claim_partition("s", D1) == token + 1
    assert not await holds()


async def test_each_window_fires_once_among_concurrent_claimers(make):
    stores = [await make(f"r{i}") for i in range(4)]
    due = dt.datetime(2026, 3, 1, 6, tzinfo=dt.UTC)
    won = await asyncio.gather(*(s.claim_window("s", "load", due, 30) for s in stores))
    assert won.count(True) == 1
    winner = stores[won.index(True)]
    assert await winner.claim_window("s", "load", due, 30)  # its own claim, asked again
    await winner.mark_window("s", "load", due)
    assert not any(await asyncio.gather(*(s.claim_window("s", "load", due, 30) for s in stores)))
    later = due + dt.timedelta(hours=6)
    won = await asyncio.gather(*(s.claim_window("s", "load", later, 30) for s in stores))
    assert won.count(True) == 1
    assert await stores[0].window_seen("s", "load") == due


async def test_an_unfinished_window_claim_expires_to_another(make):
    a, b = await make("a"), await make("b")
    due = dt.datetime(2026, 3, 1, 6, tzinfo=dt.UTC)
    assert await a.claim_window("s", "recheck", due, 0.4)
    assert not await b.claim_window("s", "recheck", due, 0.4)
    assert await a.window_seen("s", "recheck") is None
    await asyncio.sleep(0.6)
    assert await b.claim_window("s", "recheck", due, 30)
    assert not await a.claim_window("s", "recheck", due, 30)


async def test_backfill_days_are_each_claimed_once_among_concurrent_claimers(make):
    stores = [await make(f"r{i}") for i in range(4)]
    b, _ = await stores[0].create_backfill(["a", "b"], D1, D1 + dt.timedelta(days=9), request_id=None,
                                           origin="test", events=lambda b, n: [])
    assert await stores[0].claim_backfill_day(b.id) == ("a", D1)  # the oldest first
    claimed: dict[str, list] = {}

    async def work(store: StateStore) -> None:
        for _ in range(40):  # bounded: a claim handed out twice would otherwise loop for ever
            if (day := await store.claim_backfill_day(b.id, 30)) is None:
                return
            claimed.setdefault(store.replica, []).append(day)
            await asyncio.sleep(0)

    await asyncio.gather(*(work(s) for s in stores))
    every = [d for days in claimed.values() for d in days]
    assert len(every) == len(set(every)) == 19
    owners = await q(stores[0], "SELECT claimed_by, COUNT(*) FROM backfill_days GROUP BY claimed_by")
    assert sum(n for _, n in owners) == 20 and None not in {o for o, _ in owners}
    await stores[1].finish_backfill_day(b.id, "a", D1, "succeeded", None, lambda d, t: [])
    assert await q(stores[0], "SELECT claimed_by, status FROM backfill_days WHERE source = 'a' AND day = ?",
                   (D1.isoformat(),)) == [(None, "succeeded")]


async def test_an_expired_backfill_day_claim_is_taken_by_another(make):
    a, b = await make("a"), await make("b")
    bf, _ = await a.create_backfill(["s"], D1, D1, request_id=None, origin="test", events=lambda b, n: [])
    assert await a.claim_backfill_day(bf.id, 0.4) == ("s", D1)
    assert await b.claim_backfill_day(bf.id, 0.4) is None
    await asyncio.sleep(0.6)
    assert await b.claim_backfill_day(bf.id, 30) == ("s", D1)


async def test_a_dead_replicas_outbox_is_adopted_once(make):
    dead = await make("dead", outbox=True)
    await dead.emit([LoadSucceeded(source="s", day=D1 + dt.timedelta(days=i)) for i in range(12)])
    adopters = [await make(f"live{i}", outbox=True) for i in range(3)]
    assert await adopters[0].outbox_batch() == []  # not theirs while its owner lives
    assert await adopters[0].adopt_outbox(30) == 0
    await asyncio.sleep(0.6)
    counts = await asyncio.gather(*(s.adopt_outbox(0.5) for s in adopters))
    assert sorted(counts) == [0, 0, 12]
    owner = adopters[counts.index(12)]
    assert len(await owner.outbox_batch()) == 12
    assert await q(owner, "SELECT DISTINCT replica FROM outbox") == [(owner.replica,)]
    assert await dead.outbox_batch() == []


async def test_running_runs_a_start_up_may_settle(make, backend):
    a = await make("a")
    b = await make("b", lease_seconds=0.5)
    run_a = await a.start_run("s", D1, "scheduled", 1, None, lambda rid: [])
    run_b = await b.start_run("s", D2, "scheduled", 1, None, lambda rid: [])
    assert await q(b, "SELECT replica FROM runs ORDER BY day") == [("a",), ("b",)]
    mine = {r.run_id for r in await b.running_runs()}
    assert mine == ({run_a, run_b} if backend == "sqlite" else {run_b})
    await asyncio.sleep(0.7)  # a is not seen for longer than b's lease
    assert {r.run_id for r in await b.running_runs()} == {run_a, run_b}


# -- opening, migrating, configuring ------------------------------------------------------------

V3_SCHEMA = """
CREATE TABLE result_schemas (source TEXT PRIMARY KEY, columns TEXT NOT NULL, query_hash TEXT NOT NULL,
    day TEXT NOT NULL, run_id TEXT, stored_at TEXT NOT NULL, seen TEXT, change TEXT, changed_at TEXT);
CREATE TABLE partitions (source TEXT NOT NULL, day TEXT NOT NULL, status TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0, rows INTEGER, source_rows INTEGER, fingerprint TEXT,
    loaded_at TEXT, checked_at TEXT, last_run_id TEXT, error TEXT, ready_at TEXT, held_rows INTEGER,
    PRIMARY KEY (source, day));
CREATE TABLE runs (run_id TEXT PRIMARY KEY, source TEXT NOT NULL, day TEXT NOT NULL, trigger TEXT NOT NULL,
    status TEXT NOT NULL, reason TEXT, generation INTEGER, rows_fetched INTEGER, rows_written INTEGER,
    rows_rejected INTEGER, rejects TEXT, fingerprint TEXT, started_at TEXT NOT NULL, finished_at TEXT,
    duration_ms INTEGER, backfill_id INTEGER, pid INTEGER, first_load INTEGER);
CREATE INDEX runs_by_partition ON runs (source, day);
CREATE INDEX runs_by_status ON runs (status);
CREATE TABLE rejects (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, source TEXT NOT NULL, day TEXT NOT NULL,
    reason TEXT NOT NULL, row TEXT NOT NULL, at TEXT NOT NULL);
CREATE TABLE backfills (id INTEGER PRIMARY KEY, request_id TEXT UNIQUE, sources TEXT NOT NULL,
    day_from TEXT NOT NULL, day_to TEXT NOT NULL, status TEXT NOT NULL, origin TEXT, created_at TEXT NOT NULL,
    finished_at TEXT, missing INTEGER NOT NULL DEFAULT 0, skipped INTEGER NOT NULL DEFAULT 0);
CREATE TABLE backfill_days (backfill_id INTEGER NOT NULL, source TEXT NOT NULL, day TEXT NOT NULL,
    status TEXT NOT NULL, run_id TEXT, PRIMARY KEY (backfill_id, source, day));
CREATE TABLE windows (source TEXT NOT NULL, kind TEXT NOT NULL, last_at TEXT NOT NULL, PRIMARY KEY (source, kind));
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL, source TEXT,
    payload TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE VIEW usage AS
    SELECT source, day, trigger, CASE WHEN first_load THEN 'first' ELSE 'reload' END AS load,
           substr(finished_at, 1, 10) AS ran_on, SUM(rows_written) AS rows, COUNT(*) AS loads
    FROM runs WHERE status = 'succeeded' GROUP BY source, day, trigger, load, ran_on;
INSERT INTO partitions (source, day, status, generation, rows) VALUES ('s', '2026-03-01', 'succeeded', 4, 10);
INSERT INTO runs (run_id, source, day, trigger, status, generation, rows_written, started_at, finished_at, first_load)
    VALUES ('old', 's', '2026-03-01', 'scheduled', 'succeeded', 4, 10, '2026-03-02T06:00:00+00:00',
            '2026-03-02T06:00:01+00:00', 1);
INSERT INTO backfills (request_id, sources, day_from, day_to, status, created_at)
    VALUES ('r', '["s"]', '2026-03-01', '2026-03-02', 'running', '2026-03-02T06:00:00+00:00');
INSERT INTO backfill_days (backfill_id, source, day, status) VALUES (1, 's', '2026-03-01', 'pending'),
    (1, 's', '2026-03-02', 'pending');
INSERT INTO windows VALUES ('s', 'load', '2026-03-02T06:00:00+00:00');
INSERT INTO outbox (type, source, payload, created_at) VALUES ('load.succeeded', 's', '{"type": "load.succeeded"}',
    '2026-03-02T06:00:01+00:00');
PRAGMA user_version = 3;
"""
"""A version-3 file as ingestd 3's DDL made it (copied from kernel/engine/state.py of that
version), with a few rows."""


async def test_a_version_3_sqlite_file_migrates_in_place(tmp_path):
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as con:
        con.executescript(V3_SCHEMA)
    store = await StateStore(path, replica="new", outbox=True).open()
    try:
        assert await q(store, "PRAGMA user_version") == [(SCHEMA_VERSION,)] and SCHEMA_VERSION == 4
        meta = dict(await q(store, "SELECT key, value FROM meta"))
        assert meta["schema_version"] == "4" and len(meta["store_id"]) == 32 and store.store_id == meta["store_id"]
        assert (await store.partition("s", D1)).generation == 4
        assert (await store.last_run("s")).run_id == "old"
        assert [u["load"] for u in await store.usage()] == ["first"]
        assert await store.window_seen("s", "load") == dt.datetime(2026, 3, 2, 6, tzinfo=dt.UTC)
        assert [t for _, t, _, _ in await store.outbox_batch()] == ["load.succeeded"]  # adopted by the new owner
        assert await store.claim_partition("s", D1) == 5
        assert await store.claim_backfill_day(1) == ("s", D1)
        assert await store.claim_window("s", "load", dt.datetime(2026, 3, 3, 6, tzinfo=dt.UTC))
        assert [r.replica for r in await store.live_replicas()] == ["new"]
    finally:
        await store.close()
    store = await StateStore(path, replica="again").open()  # opened again: nothing to do, same store id
    try:
        assert store.store_id == meta["store_id"]
    finally:
        await store.close()


async def test_a_version_3_file_is_read_before_a_daemon_migrates_it(tmp_path):
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as con:
        con.executescript(V3_SCHEMA)
        con.execute("INSERT INTO runs (run_id, source, day, trigger, status, started_at) VALUES"
                    " ('now', 's', '2026-03-02', 'manual', 'running', '2026-03-03T06:00:00+00:00')")
    reader = await StateStore(path, writer=False).open()  # `ingestd status` beside an older daemon
    try:
        assert [(r.run_id, r.replica) for r in await reader.running_runs()] == [("now", None)]
        assert (await reader.last_run("s")).run_id == "old"
        assert set(await reader.latest_runs("s", D1, D2)) == {D1, D2}
        assert await reader.window_seen("s", "load") == dt.datetime(2026, 3, 2, 6, tzinfo=dt.UTC)
    finally:
        await reader.close()
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA user_version").fetchone() == (3,)


async def test_the_sqlite_lock_keeps_one_writer(tmp_path):
    first = await StateStore(tmp_path / "state.db").open()
    try:
        with pytest.raises(StateError, match="in use by another ingestd process"):
            await StateStore(tmp_path / "state.db").open()
    finally:
        await first.close()


async def test_replicas_starting_together_migrate_once(pg):
    schema = f"t_{uuid.uuid4().hex[:10]}"
    stores = [StateStore(Path("unused"), url=pg_url(pg), password=PG_PASSWORD, schema=schema, replica=f"r{i}")
              for i in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert len({s.store_id for s in stores}) == 1 and stores[0].store_id
        assert await q(stores[0], "SELECT value FROM meta WHERE key = 'schema_version'") == [("4",)]
        reader = await StateStore(Path("unused"), url=pg_url(pg), password=PG_PASSWORD, schema=schema,
                                  writer=False).open()
        assert reader.store_id == stores[0].store_id
        await reader.close()
    finally:
        for s in stores:
            await s.close()


async def test_a_reader_of_a_schema_never_made_says_so(pg):
    with pytest.raises(StateError, match="no state store in .*schema nothing_here.*has the daemon run yet"):
        await StateStore(Path("unused"), url=pg_url(pg), password=PG_PASSWORD, schema="nothing_here",
                         writer=False).open()


async def test_a_wrong_postgres_password_is_a_clear_error_without_it(pg):
    wrong = "not-the-password-5541"
    with pytest.raises(StateError) as caught:
        await StateStore(Path("unused"), url=pg_url(pg), password=wrong).open()
    text = str(caught.value)
    assert "password authentication failed" in text and f"{PG_USER}@" in text and wrong not in text


async def test_a_password_in_a_url_given_to_the_store_never_shows(pg):
    url = f"postgresql://{PG_USER}:pw-in-url-3312@{pg.host}:1/state"  # nothing listens on port 1
    with pytest.raises(StateError) as caught:
        await StateStore(Path("unused"), url=url).open()
    assert "pw-in-url-3312" not in str(caught.value) and f"{PG_USER}:***@" in str(caught.value)


async def test_without_psycopg_the_error_names_the_extra(pg, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(StateError, match=r"ingestd\[postgres\]"):
        await StateStore(Path("unused"), url=pg_url(pg), password=PG_PASSWORD).open()


def config_error(tmp_path, daemon: str) -> str:
    from ingestd.core.config import load_config
    from ingestd.plugin.manager import load_plugins
    cfg = write_config(tmp_path, extra_daemon=daemon)
    with pytest.raises(ConfigErrors) as caught:
        load_config(cfg, load_plugins().registry)
    return str(caught.value)


def test_a_password_in_state_url_is_refused_without_repeating_it(tmp_path):
    text = config_error(tmp_path, 'state_url = "postgresql://ingestd:pw-in-url-991@db.example:5432/state"')
    assert "daemon.state_url: holds a password: give it with state_password_env or state_password_file" in text
    assert "pw-in-url-991" not in text
    text = config_error(tmp_path, 'state_url = "postgresql://ingestd@db/state?password=pw-in-url-991"')
    assert "daemon.state_url: holds a password" in text and "pw-in-url-991" not in text


@pytest.mark.parametrize("daemon, error", [
    ('state_url = "mysql://db/state"', "daemon.state_url: expected a postgresql://"),
    ('state_url = "postgresql://db/state"\nlease_seconds = 2', "daemon.lease_seconds: must be at least 5"),
    ('state_schema = "Bad-Name"', "daemon.state_schema: expected a plain lower-case PostgreSQL name"),
    ('replica_id = "a/b"', "daemon.replica_id: expected 1..64 letters"),
    ('state_password_env = "HOME"', "daemon.state_password: is set but state_url is not"),
])
def test_state_store_keys_are_checked(tmp_path, daemon, error):
    assert error in config_error(tmp_path, daemon)


def test_the_state_password_is_a_registered_secret(tmp_path, monkeypatch):
    from ingestd.core.config import load_config
    from ingestd.plugin.manager import load_plugins
    monkeypatch.setenv("INGESTD_TEST_STATE_PW", "state-pw-from-env-77")
    cfg = write_config(tmp_path, extra_daemon='state_url = "postgresql://ingestd@db/state"\n'
                                              'state_password_env = "INGESTD_TEST_STATE_PW"\nreplica_id = "web-1"')
    config = load_config(cfg, load_plugins().registry)
    assert "state-pw-from-env-77" in config.secrets()
    assert config.redacted()["daemon"]["state_password"] == "***"
    assert config.replica_id() == "web-1"
