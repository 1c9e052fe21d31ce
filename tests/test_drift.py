"""Issue 16, schema drift: each successful load stores the query's result schema; a later load or
a re-check window's schema probe that sees another one sends `schema.changed` (added, removed,
retyped columns) once and shows it in `status`; a removed mapped column fails every load, a
retyped one the automatic loads, before any row is written; an added column only informs.
Against a DuckDB warehouse file the tests change with ALTER TABLE between loads."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from ingestd.core.config import load_config
from ingestd.engine.ingest import load_day
from ingestd.engine.planner import run_recheck_window
from ingestd.plugin.manager import load_plugins
from ingestd.service.bootstrap import open_runtime
from ingestd.service.control import Control
from ingestd.service.tasks import Tasks
from tests.support import ingestd, sink_rows, write_config

D = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=2)  # within the days `status` shows
ALL_COLUMNS = "SELECT * FROM events_raw WHERE ts >= {start} AND ts < {end}"


def star_config(folder: Path, query: str = ALL_COLUMNS) -> Path:
    cfg = write_config(folder)
    text = cfg.read_text()
    cfg.write_text(text.replace('query = "SELECT ts, user_id, event, value, props FROM events_raw WHERE ts >= {start} '
                                'AND ts < {end}"', f'query = "{query}"'))
    return cfg


class Daemon:
    """The runtime and control layer in this process, with every event it sends."""

    def __init__(self, cfg: Path):
        self.cfg = cfg
        self.events: list = []

    async def __aenter__(self) -> Daemon:
        plugins = load_plugins()
        self.rt = await open_runtime(load_config(self.cfg, plugins.registry), plugins)
        self.rt.dispatch.listeners.append(self.events.append)
        self.control = Control(self.rt, Tasks())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.rt.close()

    def changes(self) -> list[dict]:
        return [{**e.data, "day": e.day, "run_id": e.run_id} for e in self.events if e.type == "schema.changed"]

    async def load(self, trigger: str = "scheduled"):
        return await load_day(self.rt, "orders", D, trigger)

    async def schema_status(self) -> dict:
        return (await self.control.status("orders"))["sources"][0]["schema"]

    async def served(self) -> tuple[int, int]:
        info = await self.rt.sink_of("orders").read_generation("events", "orders", D)
        assert info is not None
        return info.generation, info.rows


async def test_a_column_added_dropped_and_retyped_between_loads(tmp_path, warehouse):
    warehouse.add_events(D, 10)
    async with Daemon(star_config(tmp_path)) as d:
        first = await d.load()
        assert first.status == "succeeded" and d.changes() == []
        stored = await d.schema_status()
        assert [c["name"] for c in stored["columns"]] == ["ts", "user_id", "event", "value", "props"]
        assert stored["change"] is None and stored["day"] == D.isoformat()

        # an added column only informs: the load goes on and takes the new schema
        warehouse.execute("ALTER TABLE events_raw ADD COLUMN channel VARCHAR DEFAULT 'web'")
        out = await d.load()
        assert out.status == "succeeded" and out.generation == 2
        [added] = d.changes()
        assert (added["added"], added["removed"], added["retyped"]) == ([{"name": "channel", "type": "string"}], [], [])
        assert (added["blocking"], added["mapped"], added["seen_by"], added["since_day"]) == (
            False, [], "load", D.isoformat())
        assert added["run_id"] == out.run_id and added["day"] == D
        change = (await d.schema_status())["change"]
        assert change["summary"] == "added channel (string)" and change["pending"] is False

        # an unmapped column dropped: informs too
        warehouse.execute("ALTER TABLE events_raw DROP COLUMN channel")
        assert (await d.load()).status == "succeeded"
        assert d.changes()[-1]["removed"] == [{"name": "channel", "type": "string"}]

        # a mapped column retyped: the daemon's own loads fail before writing a row, once reported
        warehouse.execute("ALTER TABLE events_raw ALTER value TYPE INTEGER")
        served = await d.served()
        failed = await d.load()
        assert failed.status == "failed"
        assert failed.reason.startswith("schema changed: column 'value' (mapping.event_value) from string to int32 "
                                        f"was retyped since the load of {D}; automatic loads stop"), failed.reason
        assert f"`ingestd load orders --day {D}`" in failed.reason
        assert await d.served() == served
        retyped = d.changes()[-1]
        assert (retyped["retyped"], retyped["mapped"], retyped["blocking"]) == (
            [{"name": "value", "from": "string", "to": "int32"}], ["mapping.event_value"], True)
        status = await d.control.status("orders")
        assert status["sources"][0]["schema"]["change"]["pending"] is True
        assert status["sources"][0]["days"][0]["summary"].startswith(
            "serving gen 3, 10 rows; last attempt failed: schema changed: column 'value'")
        assert (await d.load()).status == "failed" and len(d.changes()) == 3, "reported once"
        # a load the user starts is the confirmation: it takes the new schema
        confirmed = await d.load("manual")
        assert confirmed.status == "succeeded" and confirmed.rows == 10
        schema = await d.schema_status()
        assert {c["name"]: c["type"] for c in schema["columns"]}["value"] == "int32"
        assert schema["change"]["pending"] is False
        assert (await d.load()).status == "succeeded"

        # a mapped column dropped: every load fails, the user's too, and the sink keeps what it has
        warehouse.execute("ALTER TABLE events_raw DROP COLUMN props")
        served = await d.served()
        for trigger in ("scheduled", "manual"):
            out = await d.load(trigger)
            assert out.status == "failed"
            assert out.reason == ("schema changed: column 'props' (mapping.metadata_json) was removed from the "
                                  f"query's result since the load of {D} (columns now: ts, user_id, event, value); "
                                  "map another column or fix the query")
        assert await d.served() == served
        removed = d.changes()[-1]
        assert removed["removed"] == [{"name": "props", "type": "string"}] and removed["blocking"] is True
        assert len(d.changes()) == 4
        assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 10


async def test_a_re_check_windows_schema_probe_sees_a_change_before_any_load(tmp_path, warehouse):
    warehouse.add_events(D, 10)
    async with Daemon(star_config(tmp_path)) as d:
        assert (await d.load()).status == "succeeded"
        warehouse.execute("ALTER TABLE events_raw ALTER value TYPE INTEGER")
        now = dt.datetime(D.year, D.month, D.day, 19, tzinfo=dt.UTC) + dt.timedelta(days=1)
        done = await run_recheck_window(d.rt, "orders", now)
        assert done == {D - dt.timedelta(days=2): "empty", D - dt.timedelta(days=1): "empty", D: "unchanged"}
        [probe] = d.changes()
        assert (probe["seen_by"], probe["blocking"], probe["run_id"]) == ("probe", True, None)
        assert probe["retyped"] == [{"name": "value", "from": "string", "to": "int32"}]
        await run_recheck_window(d.rt, "orders", now + dt.timedelta(days=1))
        assert len(d.changes()) == 1, "the same schema is reported once"
        # back as it was: nothing pending any more
        warehouse.execute("ALTER TABLE events_raw ALTER value TYPE VARCHAR")
        await run_recheck_window(d.rt, "orders", now + dt.timedelta(days=2))
        assert (await d.schema_status())["change"]["pending"] is False and len(d.changes()) == 1


async def test_a_query_edited_in_the_config_takes_a_retyped_column_without_confirmation(tmp_path, warehouse):
    warehouse.add_events(D, 5)
    async with Daemon(star_config(tmp_path)) as d:
        assert (await d.load()).status == "succeeded"
    cfg = star_config(tmp_path, "SELECT ts, user_id, event, length(value) AS value, props FROM events_raw "
                                "WHERE ts >= {start} AND ts < {end}")
    async with Daemon(cfg) as d:
        out = await d.load()
        assert out.status == "succeeded", out.reason
        [change] = d.changes()
        assert change["query_edited"] is True and change["blocking"] is False
        assert change["retyped"] == [{"name": "value", "from": "string", "to": "int64"}]


def test_a_column_renamed_in_the_warehouse_between_loads_through_the_cli(tmp_path, warehouse):
    warehouse.add_events(D, 5)
    cfg = star_config(tmp_path)
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg)
    assert out.returncode == 0, out.stderr
    warehouse.execute("ALTER TABLE events_raw RENAME COLUMN event TO event_type")
    out = ingestd("load", "orders", "--day", D.isoformat(), config=cfg)
    assert out.returncode == 1
    assert out.stdout.strip() == (
        f"orders {D}: failed: schema changed: column 'event' (mapping.event_name) was removed from the query's "
        f"result since the load of {D} (columns now: ts, user_id, event_type, value, props); map another column "
        "or fix the query")
    logged = [json.loads(line) for line in out.stderr.splitlines() if '"schema.changed"' in line]
    assert [(e["added"], e["removed"], e["blocking"]) for e in logged] == [
        ([{"name": "event_type", "type": "string"}], [{"name": "event", "type": "string"}], True)]
    status = ingestd("status", "--days", "30", config=cfg)
    assert (f"  schema changed (seen by a load of {D}): added event_type (string); removed event (string); "
            "mapping.event_name: loads fail until the mapping names another column or the query is fixed"
            ) in status.stdout, status.stdout
    report = json.loads(ingestd("status", "--json", config=cfg).stdout)
    assert report["sources"][0]["schema"]["change"]["mapped"] == ["mapping.event_name"]
    # the preview says the same before any load is tried
    p = json.loads(ingestd("preview", "orders", "--day", D.isoformat(), "--json", config=cfg).stdout)
    assert p["missing"] == [{"key": "mapping.event_name", "column": "event"}] and p["unused"] == ["event_type"]
    assert sink_rows(tmp_path / "analytics.duckdb", "orders", D) == 5

