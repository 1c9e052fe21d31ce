"""Property test: arbitrary payloads at every request command get an answer of the documented
shape, and an error answer changes nothing in the state store. Requests are handled in-process
(the same `handle` the bus calls); the MQTT path itself is covered in test_bus.py."""

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.core.config import load_config
from ingestd.plugin.manager import load_plugins
from ingestd.service.bootstrap import open_runtime
from ingestd.service.control import Control
from ingestd.service.requests import REQUESTS, handle
from ingestd.service.tasks import Tasks
from tests.support import write_config

FIELDS = ["source", "from", "to", "day", "request_id", "backfill_id", "rows", "transaction", "extra"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from(["orders", "*", "2026-01-01", "2026-13-40", "2025-01-01", "ghost"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
payloads = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=6).map(
        lambda d: json.dumps(d).encode()),
)
commands = st.sampled_from(REQUESTS) | st.text(max_size=10)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def control(loop, tmp_path_factory):
    folder = tmp_path_factory.mktemp("requests")
    from tests.support import Warehouse
    Warehouse(folder / "warehouse.duckdb")
    plugins = load_plugins()
    config = load_config(write_config(folder, extra_daemon="max_backfill_days = 30"), plugins.registry)
    rt = loop.run_until_complete(open_runtime(config, plugins))
    yield Control(rt, Tasks())
    loop.run_until_complete(rt.close())


SNAPSHOT = ("SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM backfills),"
            " (SELECT count(*) FROM backfill_days), (SELECT count(*) FROM partitions),"
            " (SELECT group_concat(status) FROM backfills)")


def snapshot(loop, control):
    async def read():
        return list(await control.rt.state._all(SNAPSHOT))[0][:]
    return tuple(loop.run_until_complete(read()))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=commands, payload=payloads)
def test_any_payload_gets_an_answer_and_errors_change_nothing(loop, control, command, payload):
    if control.tasks:
        loop.run_until_complete(asyncio.gather(*control.tasks.all(), return_exceptions=True))
    before = snapshot(loop, control)
    answer = loop.run_until_complete(handle(control, command, payload, 65536))
    assert set(answer) == {"status", "data", "error", "transaction"}
    assert answer["status"] in ("ok", "error")
    json.dumps(answer, default=str)
    if answer["status"] == "error":
        assert isinstance(answer["error"], str) and answer["error"]
        assert answer["data"] is None
        assert snapshot(loop, control) == before
    else:
        assert answer["error"] is None
