"""Issue 16: see before you load. `ingestd preview` (events and metrics, rejects, the result's
columns, writing nothing), the `preview` request through the control layer and over MQTT, bounded
in size; `ingestd check` running the query against the mapping (missing columns, wrong types, text
timestamps, epochs without a unit), unknown placeholders, sinks and the broker; the column rules
and the row-limit wrap. Against DuckDB warehouse files the tests write. The row limit against the
Redshift, Snowflake, BigQuery and Databricks stand-ins is in the conformance kit
(`test_a_row_limit_reads_at_most_that_many_rows_of_the_day`) and in their end-to-end tests."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from ingestd.core.columns import Column, check_columns, compare, family
from ingestd.core.config import load_config
from ingestd.core.errors import ConfigErrors
from ingestd.core.query import DayWindow, limit_query, placeholder_mistakes, render
from ingestd.core.schema import Mapping
from ingestd.plugin.manager import load_plugins
from tests.support import Warehouse, cli_env, ingestd, sink_rows, spawn_ingestd, state_query, wait_for

D = dt.date(2026, 11, 20)
EVENTS_QUERY = ("SELECT ts, user_id, event, value, props, 'web' AS channel FROM events_raw "
                "WHERE ts >= {start} AND ts < {end} ORDER BY ts, user_id")
EVENTS_MAPPING = """
timestamp = "ts"
event_name = "event"
event_value = "value"
ids = { user_id = "user_id" }
metadata_json = "props"
"""


def config(folder: Path, *, query: str = EVENTS_QUERY, mapping: str = EVENTS_MAPPING, kind: str = "events",
           bus: str = "enabled = false", sink: str = 'type = "duckdb"\npath = "analytics.duckdb"',
           extra_source: str = "") -> Path:
    text = textwrap.dedent("""
        [daemon]
        state_path = "state.db"
        batch_rows = 1000
        retry_attempts = 2
        retry_base_seconds = 0.05
        retry_max_seconds = 0.2

        [bus]
        {bus}

        [sinks.main]
        {sink}

        [connections.wh]
        type = "duckdb"
        path = "warehouse.duckdb"

        [sources.orders]
        connection = "wh"
        kind = "{kind}"
        query = "{query}"
        schedule = ["0 6 * * *"]
        lag_days = 1
        {extra_source}

        [sources.orders.recheck]
        schedule = ["0 18 * * *"]
        lookback_days = 3

        [sources.orders.mapping]
        """).format(bus=bus, sink=sink, kind=kind, query=query, extra_source=extra_source) + textwrap.dedent(mapping)
    path = folder / "daemon.toml"
    path.write_text(text)
    return path


def at(day: dt.date, seconds: int) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day) + dt.timedelta(seconds=seconds)


@pytest.fixture
def events(warehouse: Warehouse) -> Warehouse:
    """D with 5 good events (u0..u4) and 3 that break a rule, and one on the day before."""
    warehouse.add_events(D, 5)
    warehouse.execute("INSERT INTO events_raw VALUES (?, NULL, 'click', 'a', '{}'), (?, 'u8', '', 'b', '{}'),"
                      " (?, 'u9', 'buy', 'c', 'not json'), (?, 'old', 'click', 'd', '{}')",
                      [at(D, 80_000), at(D, 80_001), at(D, 80_002), at(D, -5)])
    return warehouse


def preview_json(cfg: Path, *args: str) -> tuple[int, dict]:
    out = ingestd("preview", "orders", *args, "--json", config=cfg)
    assert out.stdout.strip(), out.stderr
    return out.returncode, json.loads(out.stdout)


# -- the column rules and the query text ---------------------------------------------------------


def test_placeholder_mistakes_name_the_unknown_name_and_the_known_ones():
    assert placeholder_mistakes("SELECT * FROM t WHERE ts >= {begin} AND ts < {end}") == [
        "unknown placeholder {begin} (known: {day}, {start}, {end})"]
    assert placeholder_mistakes("SELECT * FROM t WHERE d = { day }") == [
        "placeholder '{ day }' must be written {day}, without spaces"]
    assert placeholder_mistakes("SELECT '{\"k\": 1}', '${var}' FROM t WHERE d = {day}") == []


def test_limit_query_wraps_the_day_query_and_keeps_its_parameters():
    q = render("SELECT * FROM t WHERE d = {day}", DayWindow.of(D), "pyformat")
    limited = limit_query(q, 5)
    assert limited.sql == "SELECT * FROM (\nSELECT * FROM t WHERE d = %(day)s\n) ingestd_l LIMIT 5"
    assert limited.params == q.params and limited.window == q.window
    for bad in (-1, True, "5"):
        with pytest.raises(ValueError):
            limit_query(q, bad)  # type: ignore[arg-type]


def test_types_compare_by_kind_not_width():
    assert family(pa.int32()) == family(pa.int64()) == "integer"
    assert family(pa.timestamp("us", tz="UTC")) == family(pa.timestamp("ns")) == "timestamp"
    assert family(pa.dictionary(pa.int8(), pa.string())) == "string"
    old = [Column("a", "int32", "integer"), Column("b", "string", "string"), Column("c", "null", "null")]
    new = [Column("a", "int64", "integer"), Column("c", "double", "float"), Column("d", "bool", "boolean")]
    change = compare(old, new)
    assert change.as_dict() == {"added": [{"name": "d", "type": "bool"}], "removed": [{"name": "b", "type": "string"}],
                                "retyped": []}
    assert compare(new, [Column("a", "string", "string"), *new[1:]]).summary() == "retyped a (int64 -> string)"


def test_check_columns_errors_and_notes():
    schema = pa.schema([("ts", pa.string()), ("user_id", pa.int64()), ("ev", pa.string()),
                        ("meta", pa.struct([("k", pa.int64())]))])
    m = Mapping(ids={"user_id": "user_id"}, timestamp="ts", event_name="event", metadata_json="meta")
    found = {f.key: f for f in check_columns("events", m, schema, filtered=False)}
    assert found["event_name"].missing and found["event_name"].message == (
        "column 'event' is not in the query's result (columns: ts, user_id, ev, meta)")
    assert found["timestamp"].level == "note" and "is text (string): allowed" in found["timestamp"].message
    assert found["metadata_json"].level == "error" and "not JSON text" in found["metadata_json"].message
    assert "ids.user_id" not in found
    epoch = pa.schema([("ts", pa.int64()), ("user_id", pa.string()), ("event", pa.string())])
    m = Mapping(ids={"user_id": "user_id"}, timestamp="ts", event_name="event")
    [note] = check_columns("events", m, epoch, filtered=False, sample={"ts": 1_763_600_000_000})
    assert note.level == "note" and 'set mapping.timestamp_unit = "ms"' in note.message
    [error] = check_columns("events", m, epoch, filtered=True, sample={"ts": 1_763_600_000})
    assert error.level == "error" and 'set mapping.timestamp_unit = "s"' in error.message
    m.timestamp_unit = "s"
    assert check_columns("events", m, epoch, filtered=True) == []


# -- preview --------------------------------------------------------------------------------------


def test_preview_of_an_events_source_shows_mapped_rows_rejects_and_the_result_columns(tmp_path, events):
    cfg = config(tmp_path)
    code, p = preview_json(cfg, "--day", D.isoformat(), "--rows", "20")
    assert code == 0, p
    assert (p["day"], p["day_chosen"], p["rows_read"], p["mapped"], p["rejected"]) == (D.isoformat(), "given", 8, 5, 3)
    assert p["limit"] == "in the warehouse" and p["ok"] is True and p["problems"] == []
    assert p["columns"] == ["timestamp", "event_name", "event_value", "unit_id", "id_type", "ids", "metadata"]
    assert p["rows"][0] == {"timestamp": "2026-11-20T00:00:00+00:00", "event_name": "click", "event_value": "0",
                            "unit_id": "u0", "id_type": "user_id", "ids": {"user_id": "u0"}, "metadata": {"k": 1}}
    assert [r["unit_id"] for r in p["rows"]] == ["u0", "u1", "u2", "u3", "u4"]
    rejects = {r["reason"]: r for r in p["rejects"]}
    assert {k: r["count"] for k, r in rejects.items()} == {
        "missing_unit_id": 1, "missing_event_name": 1, "bad_metadata_json": 1}
    assert rejects["missing_unit_id"]["sample"] == {"ts": "2026-11-20 22:13:20", "user_id": None, "event": "click",
                                                   "value": "a", "props": "{}", "channel": "web"}
    assert rejects["bad_metadata_json"]["sample"]["props"] == "not json"
    assert [(c["name"], c["feeds"]) for c in p["schema"]] == [
        ("ts", ["timestamp"]), ("user_id", ["ids.user_id"]), ("event", ["event_name"]), ("value", ["event_value"]),
        ("props", ["metadata_json"]), ("channel", [])]
    assert p["unused"] == ["channel"]

    out = ingestd("preview", "orders", "--day", D.isoformat(), "--rows", "3", config=cfg)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("orders (events) 2026-11-20 (given): 3 of 3 rows read (limit in the warehouse), "
                        "3 mapped, 0 rejected")
    assert lines[2].split() == p["columns"]
    assert lines[3].split()[:5] == ["2026-11-20T00:00:00+00:00", "click", "0", "u0", "user_id"]
    assert "  channel  string         (unused)" in out.stdout


def test_preview_of_a_metrics_source_with_values_ratios_and_rejects(tmp_path, warehouse):
    warehouse.execute("INSERT INTO metrics_daily VALUES (?, 'u1', 'revenue', 12.5, NULL, NULL),"
                      " (?, 'u2', 'ctr', NULL, 3, 4), (?, 'u3', 'revenue', NULL, NULL, NULL),"
                      " (?, NULL, 'revenue', 1, NULL, NULL), (?, 'u5', 'revenue', 2, NULL, NULL)",
                      [D, D, D, D, D - dt.timedelta(days=1)])
    cfg = config(tmp_path, kind="metrics", query="SELECT * FROM metrics_daily WHERE ds = {day} ORDER BY user_id",
                 mapping='date = "ds"\nmetric_name = "metric"\nmetric_value = "value"\nnumerator = "num"\n'
                         'denominator = "den"\nids = { user_id = "user_id" }\n')
    code, p = preview_json(cfg, "--day", D.isoformat())
    assert code == 0, p
    assert p["columns"] == ["unit_id", "id_type", "metric_name", "metric_value", "numerator", "denominator"]
    assert p["rows"] == [
        {"unit_id": "u1", "id_type": "user_id", "metric_name": "revenue", "metric_value": 12.5, "numerator": None,
         "denominator": None},
        {"unit_id": "u2", "id_type": "user_id", "metric_name": "ctr", "metric_value": 0.75, "numerator": 3.0,
         "denominator": 4.0}]
    assert {r["reason"]: (r["count"], r["sample"]["user_id"]) for r in p["rejects"]} == {
        "missing_value": (1, "u3"), "missing_unit_id": (1, None)}
    assert p["unused"] == [] and p["rows_read"] == 4


def test_a_preview_writes_nothing(tmp_path, events):
    """A source loaded once: a preview (text, JSON, a broken one) leaves the state store, the sink
    and the warehouse as they were; with no state store yet, it creates none (nor a sink)."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    Warehouse(fresh / "warehouse.duckdb").add_events(D, 3)
    out = ingestd("preview", "orders", "--day", D.isoformat(), config=config(fresh))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in fresh.iterdir()) == ["daemon.toml", "warehouse.duckdb"]

    cfg = config(tmp_path, extra_source="max_reject_pct = 50")
    assert ingestd("load", "orders", "--day", D.isoformat(), config=cfg).returncode == 0

    def snapshot() -> tuple:
        con = sqlite3.connect(f"file:{tmp_path / 'state.db'}?mode=ro", uri=True)
        try:
            dump = "\n".join(con.iterdump())
        finally:
            con.close()
        return dump, (tmp_path / "analytics.duckdb").read_bytes(), (tmp_path / "warehouse.duckdb").read_bytes()

    before = snapshot()
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 5
    outs = [ingestd("preview", "orders", "--day", D.isoformat(), "--rows", "50", config=cfg),
            ingestd("preview", "orders", "--json", config=cfg)]
    broken = config(tmp_path, mapping=EVENTS_MAPPING.replace('"event"', '"evnt"'), extra_source="max_reject_pct = 50")
    outs.append(ingestd("preview", "orders", "--day", D.isoformat(), config=broken))
    assert [o.returncode for o in outs] == [0, 0, 1], [o.stderr for o in outs]
    assert snapshot() == before
    for o in outs:  # nor an event: the CLI's log shows every event of the process
        assert '"load.' not in o.stderr and '"schema.' not in o.stderr, o.stderr


def test_preview_exits_1_when_a_mapped_column_is_missing_or_every_row_is_rejected(tmp_path, events):
    cfg = config(tmp_path, mapping=EVENTS_MAPPING.replace('"event"', '"evnt"'))
    code, p = preview_json(cfg, "--day", D.isoformat())
    assert code == 1 and p["ok"] is False and p["mapped"] == 0 and p["rows"] == []
    assert p["missing"] == [{"key": "mapping.event_name", "column": "evnt"}]
    assert p["problems"] == [f"{cfg}: sources.orders.mapping.event_name: column 'evnt' is not in the query's result "
                             "(columns: ts, user_id, event, value, props, channel); did you mean 'event'?"]
    out = ingestd("preview", "orders", "--day", D.isoformat(), config=cfg)
    assert out.returncode == 1 and "problems (a load would fail or reject every row):" in out.stdout
    assert "event    string         (unused)" in out.stdout

    cfg = config(tmp_path, query="SELECT 'not a time' AS ts, user_id, event, value, props FROM events_raw "
                                 "WHERE ts >= {start} AND ts < {end}")
    code, p = preview_json(cfg, "--day", D.isoformat(), "--rows", "4")
    assert code == 1 and (p["rows_read"], p["mapped"], p["rejected"]) == (4, 0, 4)
    assert p["problems"] == ["every row read (4) was rejected (bad_timestamp: 4)"]
    assert any("mapping.timestamp: column 'ts' is text (string): allowed" in n for n in p["notes"])


def test_preview_picks_the_newest_day_with_rows_in_the_look_back(tmp_path, warehouse):
    cfg = config(tmp_path)
    today = dt.datetime.now(dt.UTC).date()
    code, p = preview_json(cfg)
    assert code == 0 and p["day"] == (today - dt.timedelta(days=1)).isoformat()
    assert p["day_chosen"] == "today - lag_days: no day of the last 3 has rows" and p["rows_read"] == 0
    assert p["notes"] == [f"the query returned no row for {p['day']}: its columns were checked, no row was mapped"]
    warehouse.add_events(today - dt.timedelta(days=3), 4)
    warehouse.add_events(today - dt.timedelta(days=6), 4)
    code, p = preview_json(cfg)
    assert code == 0 and (p["day"], p["day_chosen"], p["mapped"]) == (
        (today - dt.timedelta(days=3)).isoformat(), "the newest day with rows", 4)


# -- the preview request -------------------------------------------------------------------------


async def test_the_preview_request_answers_the_preview_bounded_in_size_and_changes_nothing(tmp_path, warehouse):
    from ingestd.service.bootstrap import open_runtime
    from ingestd.service.control import Control
    from ingestd.service.requests import handle
    from ingestd.service.tasks import Tasks

    warehouse.add_events(D, 3)
    warehouse.execute("INSERT INTO events_raw SELECT ?::TIMESTAMP + to_seconds(i), 'big' || i, 'click', 'v',"
                      " json_object('a', repeat('x', 5000), 'b', repeat('y', 5000), 'c', repeat('z', 5000),"
                      " 'd', repeat('w', 5000), 'e', repeat('v', 5000))::VARCHAR FROM range(100) t(i)", [at(D, 80_000)])
    plugins = load_plugins()
    rt = await open_runtime(load_config(config(tmp_path), plugins.registry), plugins)
    events = []
    rt.dispatch.listeners.append(events.append)
    try:
        control = Control(rt, Tasks())
        snapshot = ("SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM partitions),"
                    " (SELECT count(*) FROM outbox)")
        before = tuple((await rt.state._all(snapshot))[0])

        async def ask(body: dict) -> dict:
            return await handle(control, "preview", json.dumps(body).encode(), 65536)

        small = await ask({"source": "orders", "day": D.isoformat(), "rows": 3, "transaction": "t1"})
        assert small["status"] == "ok" and small["transaction"] == "t1", small
        assert [r["unit_id"] for r in small["data"]["rows"]] == ["u0", "u1", "u2"]
        assert small["data"]["truncated"] is False and small["data"]["limit"] == "in the warehouse"
        big = await ask({"source": "orders", "day": D.isoformat(), "rows": 100})
        assert big["status"] == "ok" and big["data"]["rows_read"] == 100 and big["data"]["mapped"] == 100
        assert len(json.dumps(big["data"]).encode()) <= 65536 and big["data"]["truncated"] is True
        assert 30 < len(big["data"]["rows"]) < 100
        assert all(len(r["metadata"]["a"]) == 200 for r in big["data"]["rows"] if r["unit_id"].startswith("big"))
        for body, error in [
                ({"source": "orders", "rows": 101}, "field 'rows' must be at most 100, got 101"),
                ({"source": "orders", "rows": 0}, "field 'rows' must be between 1 and"),
                ({"source": "ghost"}, "unknown source 'ghost'"),
                ({"source": "orders", "day": "2026-13-01"}, "field 'day' is not a date"),
                ({"source": "orders", "limit": 3}, "unknown field 'limit' (fields of preview: source, day, rows)")]:
            answer = await ask(body)
            assert answer["status"] == "error" and error in answer["error"], answer
        assert tuple((await rt.state._all(snapshot))[0]) == before
        assert events == []
    finally:
        await rt.close()


def test_a_preview_request_over_mqtt_and_ingestd_request_preview(tmp_path, events):
    from tests.broker import Mosquitto

    folder = tmp_path / "broker"
    folder.mkdir()
    broker = Mosquitto(folder).start()
    try:
        cfg = config(tmp_path, bus=f'enabled = true\nport = {broker.port}\nbase_topic = "ingestd/test"',
                     extra_source="enabled = false")
        proc = spawn_ingestd("run", config=cfg)
        try:

            def answered():
                out = ingestd("request", "preview", "orders", "--day", D.isoformat(), "--rows", "2", config=cfg)
                return out if out.returncode == 0 else None

            out = wait_for(answered, timeout=30, interval=0.5, what="a preview answer")
            answer = json.loads(out.stdout)
            assert answer["status"] == "ok" and answer["data"]["rows_read"] == 2
            assert [r["unit_id"] for r in answer["data"]["rows"]] == ["u0", "u1"]
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        broker.stop()
    assert state_query(tmp_path / "state.db", "SELECT count(*) FROM runs") == [(0,)]


# -- check ----------------------------------------------------------------------------------------


def check(cfg: Path, **env: str):
    return ingestd("check", config=cfg, env=cli_env(**env) if env else None)


def test_check_names_a_missing_mapped_column_and_a_wrong_type(tmp_path, events):
    cfg = config(tmp_path, mapping=EVENTS_MAPPING.replace('"event"', '"evnt"'))
    out = check(cfg)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED orders: connection wh (duckdb) reads the query for" in out.stdout
    assert (f"  {cfg}: sources.orders.mapping.event_name: column 'evnt' is not in the query's result (columns: ts, "
            "user_id, event, value, props, channel); did you mean 'event'?") in out.stdout
    assert "ok     sink main (duckdb): opened" in out.stdout

    cfg = config(tmp_path, query="SELECT ts, user_id, event, value, props, ts > ts AS flag FROM events_raw "
                                 "WHERE ts >= {start} AND ts < {end}",
                 mapping=EVENTS_MAPPING.replace('timestamp = "ts"', 'timestamp = "flag"'))
    out = check(cfg)
    assert out.returncode == 1
    assert (f"{cfg}: sources.orders.mapping.timestamp: column 'flag' is booleans (bool): not usable as a timestamp "
            "(map a timestamp, date, ISO-8601 text or integer epoch column)") in out.stdout

    cfg = config(tmp_path, kind="metrics", query="SELECT ds, user_id, metric, ds AS value FROM metrics_daily "
                                                 "WHERE ds = {day}",
                 mapping='date = "ds"\nmetric_name = "metric"\nmetric_value = "value"\nids = { user_id = "user_id" }\n')
    out = check(cfg)
    assert out.returncode == 1
    assert (f"{cfg}: sources.orders.mapping.metric_value: column 'value' is dates (date32[day]): not a number "
            "(map an integer, decimal or floating-point column)") in out.stdout


def test_check_allows_a_text_timestamp_and_names_the_unit_an_epoch_needs(tmp_path, warehouse):
    today = dt.datetime.now(dt.UTC).date()
    warehouse.add_events(today - dt.timedelta(days=1), 3)
    cfg = config(tmp_path, query="SELECT CAST(ts AS VARCHAR) AS ts_text, user_id, event FROM events_raw "
                                 "WHERE ts >= {start} AND ts < {end}",
                 mapping='timestamp = "ts_text"\nevent_name = "event"\nids = { user_id = "user_id" }\n')
    out = check(cfg)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok     orders: connection wh (duckdb) reads the day query" in out.stdout
    assert ("note: " f"{cfg}: sources.orders.mapping.timestamp: column 'ts_text' is text (string): allowed; read as "
            "ISO-8601 times") in out.stdout

    # no placeholders: the query is filtered on the epoch column, which fails without its unit
    cfg = config(tmp_path, query="SELECT epoch_ms(ts) AS ts_ms, user_id, event FROM events_raw",
                 mapping='timestamp = "ts_ms"\nevent_name = "event"\nids = { user_id = "user_id" }\n')
    out = check(cfg)
    assert out.returncode == 1
    assert "FAILED orders: connection wh: the query refers to a column or type it cannot use" in out.stdout
    assert (f"{cfg}: sources.orders.mapping.timestamp: column 'ts_ms' holds integers (int64): an epoch column needs "
            "its unit, as the query has no {day}, {start}, {end} placeholder and is filtered on it; set "
            'mapping.timestamp_unit = "ms" (its values, e.g. ') in out.stdout
    fixed = config(tmp_path, query="SELECT epoch_ms(ts) AS ts_ms, user_id, event FROM events_raw",
                   mapping='timestamp = "ts_ms"\ntimestamp_unit = "ms"\nevent_name = "event"\n'
                           'ids = { user_id = "user_id" }\n')
    assert check(fixed).returncode == 0

    # with placeholders the magnitude decides (auto): allowed, and the unit to say is named
    cfg = config(tmp_path, query="SELECT epoch_ms(ts) AS ts_ms, user_id, event FROM events_raw "
                                 "WHERE ts >= {start} AND ts < {end}",
                 mapping='timestamp = "ts_ms"\nevent_name = "event"\nids = { user_id = "user_id" }\n')
    out = check(cfg)
    assert out.returncode == 0, out.stdout
    assert 'to say it, set mapping.timestamp_unit = "ms" (its values, e.g. 17' in out.stdout


def test_an_unknown_placeholder_is_a_config_error_naming_the_key(tmp_path, warehouse):
    cfg = config(tmp_path, query="SELECT * FROM events_raw WHERE ts >= {begin} AND ts < {end}",
                 extra_source='ready_query = "SELECT count(*) > 0 FROM events_raw WHERE ts >= {Start} AND ts < {end}"')
    with pytest.raises(ConfigErrors) as raised:
        load_config(cfg, load_plugins().registry)
    assert [str(e) for e in raised.value.errors] == [
        f"{cfg}: sources.orders.query: unknown placeholder {{begin}} (known: {{day}}, {{start}}, {{end}})",
        f"{cfg}: sources.orders.ready_query: unknown placeholder {{Start}} (known: {{day}}, {{start}}, {{end}})"]
    out = check(cfg)
    assert out.returncode == 2 and "sources.orders.query: unknown placeholder {begin}" in out.stderr


def test_check_opens_each_sink_and_connects_to_the_broker(tmp_path, events):
    from tests.broker import Mosquitto, free_port

    (tmp_path / "afile").write_text("not a folder")
    port = free_port()
    cfg = config(tmp_path, bus=f"enabled = true\nport = {port}",
                 sink='type = "duckdb"\npath = "afile/analytics.duckdb"')
    out = check(cfg)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ok     orders: connection wh (duckdb) reads the day query")
    assert lines[1].startswith("FAILED sink main (duckdb): ")
    assert lines[2].startswith(f"FAILED bus: cannot connect to the broker at 127.0.0.1:{port} (MQTT 5): ")

    folder = tmp_path / "broker"
    folder.mkdir()
    broker = Mosquitto(folder).start()
    try:
        cfg = config(tmp_path, bus=f"enabled = true\nport = {broker.port}")
        out = check(cfg)
    finally:
        broker.stop()
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[1:] == ["ok     sink main (duckdb): opened",
                                           f"ok     bus: connected to the broker at 127.0.0.1:{broker.port} (MQTT 5)"]
    off = ingestd("check", config=config(tmp_path))
    assert off.stdout.splitlines()[-1] == "-      bus: off ([bus] enabled = false)"


def test_check_says_what_it_could_not_verify_on_an_empty_warehouse(tmp_path, warehouse):
    """DuckDB tells the columns without a row (LIMIT 0), so even an empty warehouse is verified."""
    out = check(config(tmp_path, mapping=EVENTS_MAPPING.replace('"props"', '"propz"')))
    assert out.returncode == 1 and "mapping.metadata_json: column 'propz' is not in the query's result" in out.stdout


def test_preview_and_check_through_a_connector_that_cannot_limit(tmp_path, events):
    """A third-party connector without `row_limit` or `result_schema`: the preview reads the first
    batch of the whole query and says the limit was ingestd's; check learns the columns from one row."""
    from tests.support import plugin_dist

    extra = plugin_dist(tmp_path / "plugins-extra", "plainduck_plugin", '''
        from ingestd import Capabilities, hookimpl
        from ingestd.plugins.duckdb.connector import DuckDBConnector

        INGESTD_API = (2, 2)


        class PlainDuck(DuckDBConnector):
            type_name = "plainduck"
            capabilities = Capabilities(fingerprint=True, paramstyle="qmark")

            async def result_schema(self, query, source=None):
                return None


        @hookimpl
        def ingestd_register(registry):
            registry.add_connector(PlainDuck)
        ''')
    cfg = config(tmp_path)
    cfg.write_text(cfg.read_text().replace('type = "duckdb"\npath = "warehouse',
                                           'type = "plainduck"\npath = "warehouse'))
    env = cli_env([extra])
    out = ingestd("preview", "orders", "--day", D.isoformat(), "--rows", "2", "--json", config=cfg, env=env)
    p = json.loads(out.stdout)
    assert p["limit"] == "by ingestd (the connector cannot limit the query)" and p["rows_read"] == 2, out.stderr
    out = ingestd("check", config=config(tmp_path, mapping=EVENTS_MAPPING.replace('"event"', '"evnt"')), env=env)
    assert "column 'evnt' is not in the query's result" in out.stdout


# -- the state store ------------------------------------------------------------------------------


async def test_a_version_2_state_store_gains_the_result_schemas_table(tmp_path):
    from ingestd.engine.state import StateStore

    path = tmp_path / "state.db"
    store = await StateStore(path).open()
    await store.close()
    con = sqlite3.connect(path)
    con.execute("DROP TABLE result_schemas")
    con.execute("PRAGMA user_version = 2")
    con.commit()
    con.close()
    reader = await StateStore(path, writer=False).open()
    try:
        assert await reader.result_schema("orders") is None  # `ingestd status` before the new daemon ran
    finally:
        await reader.close()
    store = await StateStore(path).open()
    try:
        await store.save_result_schema("orders", [{"name": "ts", "type": "timestamp[us]", "family": "timestamp"}],
                                       "abc", D, "r1")
        stored = await store.result_schema("orders")
        assert stored is not None and (stored.day, stored.columns[0]["name"], stored.seen) == (D, "ts", None)
    finally:
        await store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (4,)

