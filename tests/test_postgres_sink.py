"""The PostgreSQL sink on a throw-away cluster (tests/postgres.py): the conformance kit, a day
replaced under concurrent readers, kill -9 mid-swap, fencing against a state store's lease in the
same database, bad configs, and a load through the CLI from a DuckDB warehouse."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from ingestd import (
    ConfigErrors,
    Fence,
    FencedOut,
    PartitionInfo,
    Secret,
    SinkError,
    Target,
    build_model,
    configured_sink,
)
from ingestd.plugins.postgres_sink.config import PostgresSinkConfig
from ingestd.plugins.postgres_sink.sink import PostgresSink
from ingestd.testing import SinkSuite
from ingestd.testing.sink_suite import DAY, Gate, KitFailure, feed, kit_batches, rows_of
from tests.postgres import free_port, postgres_cluster  # noqa: F401  (a fixture, requested by name)
from tests.support import cli_env, ingestd, wait_for, write_config

USER, PASSWORD, DB = "sink_writer", "pg-sink-secret-4f9a", "analytics_db"


@pytest.fixture(scope="module")
def pg(postgres_cluster):  # noqa: F811
    postgres_cluster.create_user(USER, PASSWORD)
    postgres_cluster.create_database(DB, owner=USER)
    return postgres_cluster


def url(pg, *, port=None, user=USER, db=DB) -> str:
    return f"postgresql://{user}@{pg.host}:{port or pg.port}/{db}"


def config(pg, *, schema="analytics", chunk_rows=100, **kw) -> PostgresSinkConfig:
    cfg = PostgresSinkConfig(url=kw.pop("url", None) or url(pg), password=Secret(kw.pop("password", PASSWORD)),
                             schema=schema, chunk_rows=chunk_rows, **kw)
    cfg.validate()
    return cfg


async def opened(pg, **kw) -> PostgresSink:
    sink = PostgresSink(config(pg, **kw), name="kit")
    await sink.open()
    return sink


def sql(pg, statement, params=None):
    return pg.execute(statement, params, dbname=DB)


class TestPostgresSink(SinkSuite):
    @pytest.fixture
    async def sink(self, pg):
        sink = await opened(pg)
        yield sink
        await sink.close()

    @pytest.fixture
    def reopen_sink(self, pg):
        return lambda: opened(pg)


def events(source, generation, rows, *, start=0, batch_rows=500, day=DAY):
    return kit_batches("events", source, day, generation, rows, batch_rows=batch_rows, start=start)


# -- the tables as a SQL client sees them ----------------------------------------------------

async def test_sql_clients_see_the_views_and_the_partitions_row(pg):
    sink = await opened(pg, schema="clients")
    try:
        await sink.replace(Target("events", "views", DAY, 1), feed(events("views", 1, 250)))
        await sink.replace(Target("metrics", "views", DAY, 4),
                           feed(kit_batches("metrics", "views", DAY, 4, 30)))
    finally:
        await sink.close()
    assert sql(pg, "SELECT count(*), min(generation), max(generation) FROM clients.events "
                   "WHERE source = 'views'") == [(250, 1, 1)]
    assert sql(pg, "SELECT count(*) FROM clients.metrics WHERE source = 'views'") == [(30,)]
    assert sql(pg, "SELECT kind, generation, rows FROM clients.partitions WHERE source = 'views' ORDER BY kind") == \
        [("events", 1, 250), ("metrics", 4, 30)]
    # values as PostgreSQL types, usable without casts
    ts, day = sql(pg, "SELECT min(timestamp), min(day) FROM clients.events WHERE source = 'views'")[0]
    assert ts.tzinfo is not None and day == DAY


async def test_three_concurrent_opens_of_a_new_schema_all_succeed(pg):
    """Three daemons starting at once on an empty schema: the advisory lock serialises the DDL."""
    script = textwrap.dedent(f"""
        import asyncio, sys
        from ingestd import Secret
        from ingestd.plugins.postgres_sink.config import PostgresSinkConfig
        from ingestd.plugins.postgres_sink.sink import PostgresSink
        async def main():
            sink = PostgresSink(PostgresSinkConfig(url={url(pg)!r}, password=Secret({PASSWORD!r}),
                                                   schema="racing"), name="race")
            await sink.open()
            await sink.close()
        asyncio.run(main())
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], env=cli_env(), stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    assert sql(pg, "SELECT count(*) FROM pg_tables WHERE schemaname = 'racing'") == [(3,)]


# -- atomic replace under concurrent readers -------------------------------------------------

def read_loop(pg, source, stop: threading.Event, seen: list):
    """A SQL client polling the day: the partitions row and the data rows, in one statement (one
    snapshot), as fast as it can."""
    import psycopg
    with psycopg.connect(pg.dsn(USER, PASSWORD, DB), autocommit=True) as con:
        while not stop.is_set():
            seen.append(con.execute(
                """SELECT (SELECT generation FROM analytics.partitions WHERE kind = 'events' AND source = %(s)s
                           AND day = %(d)s),
                          (SELECT rows FROM analytics.partitions WHERE kind = 'events' AND source = %(s)s
                           AND day = %(d)s),
                          count(*), array_agg(DISTINCT generation)
                   FROM analytics.events WHERE source = %(s)s AND day = %(d)s""",
                {"s": source, "d": DAY}).fetchone())


async def test_readers_see_one_whole_generation_while_days_are_replaced(pg):
    sizes = {1: 4000, 2: 700, 3: 6000, 4: 1, 5: 2500, 6: 3000}
    sink = await opened(pg, chunk_rows=1000)
    source = "atomic"
    await sink.replace(Target("events", source, DAY, 1), feed(events(source, 1, sizes[1])))
    stop, seen = threading.Event(), [[], []]
    readers = [threading.Thread(target=read_loop, args=(pg, source, stop, out), daemon=True) for out in seen]
    for r in readers:
        r.start()
    try:
        for generation in range(2, 7):
            await sink.replace(Target("events", source, DAY, generation),
                               feed(events(source, generation, sizes[generation], start=generation * 10_000)))
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        for r in readers:
            r.join(10)
        await sink.close()
    observations = [o for per_reader in seen for o in per_reader]
    assert len(observations) > 50, "the readers hardly ran"
    for generation, rows, count, generations in observations:
        assert generations == [generation], f"a mix or a gap: partition says {generation}, rows of {generations}"
        assert count == rows == sizes[generation], (generation, rows, count)
    assert len({o[0] for o in observations}) >= 3, "the readers saw too few of the generations"


async def test_two_sinks_replacing_one_partition_take_turns_at_the_swap(pg):
    """Two daemons' sinks (two connections) replacing the same day: each swap takes the
    partition's advisory lock, so one commits after the other and the day holds one whole
    generation. The test holds that lock itself first: both replaces stage and then wait."""
    from ingestd.plugins.postgres_sink import ddl
    first, second = await opened(pg), await opened(pg)
    source = "turns"
    try:
        await first.replace(Target("events", source, DAY, 1), feed(events(source, 1, 300)))
        with pg.connect(USER, PASSWORD, DB) as holder:
            holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))",
                           (ddl.partition_lock_key("analytics", "events", source, DAY),))
            a = asyncio.create_task(first.replace(Target("events", source, DAY, 2),
                                                  feed(events(source, 2, 1200, start=10_000))))
            b = asyncio.create_task(second.replace(Target("events", source, DAY, 3),
                                                   feed(events(source, 3, 800, start=20_000))))
            await asyncio.sleep(1.5)
            assert not a.done() and not b.done(), "a swap did not wait for the partition's lock"
            assert await first.read_generation("events", source, DAY) == PartitionInfo(1, 300)
            holder.execute("SELECT pg_advisory_unlock_all()")
            assert sorted(await asyncio.wait_for(asyncio.gather(a, b), 30)) == [800, 1200]
        info = await first.read_generation("events", source, DAY)
        assert info in (PartitionInfo(2, 1200), PartitionInfo(3, 800))
        assert sql(pg, "SELECT count(*), array_agg(DISTINCT generation) FROM analytics.events WHERE source = %s",
                   (source,)) == [(info.rows, [info.generation])]
    finally:
        await first.close()
        await second.close()


# -- kill -9 mid-swap ------------------------------------------------------------------------

KILLED_REPLACE = """
import asyncio, sys, pathlib
from ingestd import Secret, Target
from ingestd.plugins.postgres_sink.config import PostgresSinkConfig
from ingestd.plugins.postgres_sink.sink import PostgresSink
from ingestd.testing.sink_suite import kit_batches

url, password, marker = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
DAY = __import__("datetime").date(2026, 11, 20)

async def batches():
    for i in range(40):                       # 200,000 rows in 40 batches
        for batch in kit_batches("events", "killed", DAY, 2, 5000, batch_rows=5000, start=100_000 + i * 5000):
            yield batch
        if i == 30:
            marker.write_text("staged")       # 155,000 rows in the open transaction: the parent kills now
            await asyncio.sleep(3600)

async def main():
    sink = PostgresSink(PostgresSinkConfig(url=url, password=Secret(password), chunk_rows=5000), name="doomed")
    await sink.open()
    await sink.replace(Target("events", "killed", DAY, 2), batches())

asyncio.run(main())
"""


async def test_kill_9_mid_swap_keeps_the_previous_generation(pg, tmp_path):
    sink = await opened(pg)
    first = events("killed", 1, 3000)
    await sink.replace(Target("events", "killed", DAY, 1), feed(first))
    await sink.close()

    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_REPLACE, url(pg), PASSWORD, str(marker)], env=cli_env(),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the replace never staged its rows"
            await asyncio.sleep(0.05)
        # the victim's transaction is open, with its staged rows, when it dies
        open_tx = sql(pg, "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND xact_start IS NOT NULL",
                      (USER,))
        assert open_tx[0][0] == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    again = await opened(pg)
    try:
        assert await again.read_generation("events", "killed", DAY) == PartitionInfo(1, 3000)
        scanned = [b async for b in again.scan("events", "killed", DAY, batch_rows=1000)]
        assert rows_of(scanned) == rows_of(first)
        assert await again.replace(Target("events", "killed", DAY, 2),
                                   feed(events("killed", 2, 1234, start=70_000))) == 1234
        assert await again.read_generation("events", "killed", DAY) == PartitionInfo(2, 1234)
    finally:
        await again.close()
    assert sql(pg, "SELECT count(*), array_agg(DISTINCT generation) FROM analytics.events_data "
                   "WHERE source = 'killed'") == [(1234, [2])]


# -- fencing -----------------------------------------------------------------------------------

CHECK_SQL = ("SELECT 1 FROM fence_state.leases WHERE source = $1::text AND day = $2::text AND replica = $3::text "
             "AND token = $4::bigint AND expires_at > now() FOR UPDATE")
"""The check the PostgreSQL state store hands out (kernel/engine/state/leases.py on its branch):
its `leases.day` is ISO text, so the fence's parameters are cast in the SQL."""


@pytest.fixture(scope="module")
def state_store(pg):
    """What a PostgreSQL state store keeps in the sink's database: its id, and leases."""
    sql(pg, "CREATE SCHEMA fence_state")
    sql(pg, "CREATE TABLE fence_state.meta (key text PRIMARY KEY, value text NOT NULL)")
    sql(pg, "INSERT INTO fence_state.meta VALUES ('store_id', 'store-7f3')")
    sql(pg, "CREATE TABLE fence_state.leases (source text NOT NULL, day text NOT NULL, replica text NOT NULL, "
            "token bigint NOT NULL, expires_at timestamptz NOT NULL, PRIMARY KEY (source, day))")
    sql(pg, "CREATE TABLE fence_state.partitions (source text, day text, status text, generation bigint)")
    sql(pg, "GRANT USAGE ON SCHEMA fence_state TO sink_writer")
    sql(pg, "GRANT SELECT, UPDATE ON ALL TABLES IN SCHEMA fence_state TO sink_writer")
    sql(pg, "INSERT INTO fence_state.leases VALUES ('fenced', %s, 'replica-b', 3, now() + interval '1 hour'), "
            "('fenced', %s, 'replica-a', 2, now() - interval '1 minute')",
        (DAY.isoformat(), (DAY - dt.timedelta(days=1)).isoformat()))
    return "store-7f3"


def fence(replica, token, day=DAY, store_id="store-7f3"):
    return Fence(token=token, replica=replica, store_id=store_id, schema="fence_state", check_sql=CHECK_SQL,
                 params=("fenced", day.isoformat(), replica, token))


async def test_a_replace_under_a_valid_lease_commits_and_a_stale_one_is_fenced_out(pg, state_store):
    sink = await opened(pg)
    try:
        await sink.replace(Target("events", "fenced", DAY, 2), feed(events("fenced", 2, 600)))
        # replica-b holds the lease with token 3: its write commits
        assert await sink.replace(Target("events", "fenced", DAY, 3, fence("replica-b", 3)),
                                  feed(events("fenced", 3, 800, start=5000))) == 800
        assert await sink.read_generation("events", "fenced", DAY) == PartitionInfo(3, 800)
        # replica-a woke up with the old token 2: refused, generation 3 stays whole
        with pytest.raises(FencedOut, match="replica-a"):
            await sink.replace(Target("events", "fenced", DAY, 4, fence("replica-a", 2)),
                               feed(events("fenced", 4, 900, start=9000)))
        assert await sink.read_generation("events", "fenced", DAY) == PartitionInfo(3, 800)
        assert {r["generation"] for b in [b async for b in sink.scan("events", "fenced", DAY)]
                for r in b.to_pylist()} == {3}
        # a lease that expired is no lease either
        other = DAY - dt.timedelta(days=1)
        with pytest.raises(FencedOut):
            await sink.replace(Target("events", "fenced", other, 2, fence("replica-a", 2, day=other)),
                               feed(events("fenced", 2, 10, day=other)))
        assert await sink.read_generation("events", "fenced", other) is None
    finally:
        await sink.close()


async def test_a_fence_of_another_state_store_is_not_checked_here(pg, state_store):
    """The sink's database is not that store's (its store_id differs): the kernel fences its own
    commit; the sink cannot check a lease it does not hold, and writes."""
    sink = await opened(pg)
    try:
        stale = fence("replica-a", 2, store_id="some-other-store")
        assert await sink.replace(Target("events", "elsewhere", DAY, 1, stale),
                                  feed(events("elsewhere", 1, 40))) == 40
    finally:
        await sink.close()


async def test_a_schema_whose_partitions_table_is_not_the_sinks_is_refused(pg, state_store):
    """`schema` pointed at the state store's schema: its `partitions` is another table, which
    CREATE TABLE IF NOT EXISTS would keep; the sink refuses to write it."""
    sink = PostgresSink(config(pg, schema="fence_state"), name="confused")
    with pytest.raises(SinkError, match="fence_state.*not this sink's"):
        await sink.open()
    await sink.close()
    assert sql(pg, "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'fence_state' "
                   "AND table_name = 'partitions'") == [(4,)]


# -- config and connection errors --------------------------------------------------------------

def test_a_password_in_the_url_is_a_config_error_naming_the_key_not_the_password():
    with pytest.raises(ConfigErrors) as info:
        build_model(PostgresSinkConfig, {"url": "postgresql://writer:hunter2-secret@db.example:5432/a"},
                    "sinks.pg")
    text = str(info.value)
    assert "sinks.pg.url" in text and "password" in text
    assert "hunter2-secret" not in text


def test_config_keys_and_secret_values(monkeypatch):
    monkeypatch.setenv("PG_SINK_PW", PASSWORD)
    cfg = build_model(PostgresSinkConfig, {"url": "postgresql://w@h/db", "password_env": "PG_SINK_PW",
                                           "sslmode": "require"}, "sinks.pg")
    assert cfg.schema == "analytics" and cfg.password.reveal() == PASSWORD
    assert PostgresSink.secret_values(cfg) == [PASSWORD]
    assert "sslmode=require" in cfg.adbc_uri()
    with_options = build_model(PostgresSinkConfig, {"url": "postgresql://w@h/db?options=-c%20work_mem%3D64MB"},
                               "sinks.pg")
    assert with_options.psycopg_kwargs()["options"] == "-c work_mem=64MB -c timezone=UTC"
    for bad, key in (({"url": "mysql://h/db"}, "url"), ({"url": "postgresql://h/db", "schema": "a;drop"}, "schema"),
                     ({"url": "postgresql://h/db", "sslmode": "maybe"}, "sslmode")):
        with pytest.raises(ConfigErrors, match=f"sinks.pg.{key}"):
            build_model(PostgresSinkConfig, bad, "sinks.pg")


async def test_an_unreachable_server_names_the_sink_and_host_and_never_the_password(pg):
    sink = PostgresSink(config(pg, url=url(pg, port=free_port())), name="warehouse_copy")
    with pytest.raises(SinkError) as info:
        await sink.open()
    text = str(info.value)
    assert "warehouse_copy" in text and "127.0.0.1" in text and "open" in text
    assert PASSWORD not in text
    with pytest.raises(SinkError) as info:
        await sink.replace(Target("events", "x", DAY, 1), feed(events("x", 1, 10)))
    assert "warehouse_copy" in str(info.value) and PASSWORD not in str(info.value)
    await sink.close()


async def test_a_wrong_password_is_an_error_without_it(pg):
    sink = PostgresSink(config(pg, password="not-the-password-77"), name="pw")
    with pytest.raises(SinkError, match="pw") as info:
        await sink.open()
    assert "not-the-password-77" not in str(info.value) and "authentication" in str(info.value)


async def test_a_failed_stream_rolls_back_and_the_connection_count_returns(pg):
    """A replace whose batches raise leaves no open session behind (its connection is closed)."""
    sink = await opened(pg)
    try:
        def sessions():
            return sql(pg, "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (USER,))[0][0]
        wait_for(lambda: sessions() == 0, timeout=15, what="earlier tests' sessions to end")
        for _ in range(3):
            with pytest.raises(KitFailure):
                await sink.replace(Target("events", "leak", DAY, 1), feed(events("leak", 1, 2000), fail_after=2))
        # a closed connection's backend leaves pg_stat_activity a moment later: wait for it, not for ever
        wait_for(lambda: sessions() == 0, timeout=15, what="the failed replaces' sessions to end")
        assert await sink.read_generation("events", "leak", DAY) is None
    finally:
        await sink.close()


async def test_a_cancelled_replace_keeps_the_previous_generation(pg):
    sink = await opened(pg)
    try:
        await sink.replace(Target("events", "cancel", DAY, 1), feed(events("cancel", 1, 100)))
        gate = Gate(at=3)
        task = asyncio.create_task(sink.replace(Target("events", "cancel", DAY, 2),
                                                feed(events("cancel", 2, 3000, start=5000), gate=gate)))
        await asyncio.wait_for(gate.reached.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await sink.read_generation("events", "cancel", DAY) == PartitionInfo(1, 100)
        assert await sink.replace(Target("events", "cancel", DAY, 2), feed(events("cancel", 2, 7))) == 7
    finally:
        await sink.close()


# -- end to end: ingestd load from a DuckDB warehouse into PostgreSQL --------------------------

async def test_ingestd_load_from_duckdb_into_postgres(pg, tmp_path, warehouse, monkeypatch):
    day = dt.date(2026, 11, 20)
    warehouse.add_events(day, 1500)
    sink = textwrap.dedent(f"""\
        type = "postgres"
        url = "{url(pg)}"
        password_env = "PG_SINK_PASSWORD"
        schema = "e2e"
        chunk_rows = 400""")
    cfg = write_config(tmp_path, sink=sink)
    env = cli_env(PG_SINK_PASSWORD=PASSWORD)
    out = ingestd("load", "orders", "--day", day.isoformat(), config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    assert sql(pg, "SELECT generation, rows FROM e2e.partitions WHERE source = 'orders' AND day = %s",
               (day,)) == [(1, 1500)]
    assert sql(pg, "SELECT count(*), count(DISTINCT unit_id) FROM e2e.events WHERE source = 'orders'") == \
        [(1500, 1500)]
    warehouse.add_events(day, 20, start_id=9000)
    out = ingestd("load", "orders", "--day", day.isoformat(), config=cfg, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sql(pg, "SELECT generation, rows FROM e2e.partitions WHERE source = 'orders'") == [(2, 1520)]
    assert sql(pg, "SELECT count(*), min(generation), max(generation) FROM e2e.events") == [(1520, 2, 2)]
    # read back as tools and the kit's harness do: the sink built from daemon.toml, through the contract
    monkeypatch.setenv("PG_SINK_PASSWORD", PASSWORD)
    sink = configured_sink(cfg)
    await sink.open()
    try:
        assert await sink.read_generation("events", "orders", day) == PartitionInfo(2, 1520)
        scanned = rows_of([b async for b in sink.scan("events", "orders", day, batch_rows=500)])
    finally:
        await sink.close()
    assert len(scanned) == 1520 and {r["generation"] for r in scanned} == {2}
    assert {r["event_name"] for r in scanned} == {"click"} and json.loads(scanned[0]["metadata"]) == {"k": 1}


def test_without_the_postgres_extra_the_plugin_loads_and_the_sink_says_what_to_install():
    """The drivers are imported when the sink first needs them: the plugin list stays clean for
    users without the extra, and a config using the sink gets one clear error."""
    script = textwrap.dedent("""
        import asyncio, sys
        sys.modules["psycopg"] = None                 # as if not installed: importing them raises
        sys.modules["adbc_driver_postgresql"] = None
        sys.modules["adbc_driver_manager"] = None
        from ingestd import SinkError
        from ingestd.plugin.manager import load_plugins
        loaded = load_plugins()
        assert "postgres" in loaded.registry.sinks, "the plugin did not register"
        cls = loaded.registry.sinks["postgres"]
        sink = cls(cls.config_model(url="postgresql://u@127.0.0.1:1/db"), name="x")
        try:
            asyncio.run(sink.open())
        except SinkError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'ingestd[postgres]'" in out.stdout
