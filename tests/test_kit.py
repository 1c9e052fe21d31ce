"""The conformance kit's end-to-end harness (`ingestd_daemon`) and `ingestd.configured_sink`: the
harness loads into whichever sink the test supplies and reads it back through the Sink contract
only, so the same checks hold for every built-in sink."""

from __future__ import annotations

import ast
import datetime as dt
import importlib
import io
import json
import re
import sys
import tokenize
from pathlib import Path

import pyarrow as pa
import pytest

import ingestd as ingestd_api
from ingestd import SCHEMAS, ConfigErrors, PartitionInfo, Registry, configured_sink
from ingestd.testing.plugin import DaemonHarness

ROOT = Path(__file__).resolve().parent.parent

D = dt.date(2026, 11, 20)

BODY = """
[connections.wh]
type = "duckdb"
path = "warehouse.duckdb"

[sources.orders]
connection = "wh"
kind = "events"
query = "SELECT ts, user_id, event, value, props FROM events_raw WHERE ts >= {start} AND ts < {end}"
schedule = ["0 6 * * *"]

[sources.orders.mapping]
timestamp = "ts"
event_name = "event"
event_value = "value"
ids = { user_id = "user_id" }
metadata_json = "props"
"""

SINKS = {
    "duckdb": 'type = "duckdb"\npath = "store/analytics.duckdb"\nchunk_rows = 50',
    "sqlite": 'type = "sqlite"\npath = "store/analytics.sqlite"',
}


@pytest.fixture(params=sorted(SINKS))
def ingestd_sink(request):
    return SINKS[request.param]


def test_the_harness_reads_any_sink_back_through_the_contract(ingestd_daemon, warehouse):
    h = ingestd_daemon
    h.write_config(BODY)
    assert (h.rows("orders", D), h.generation("orders", D), h.read_generation("orders", D)) == (0, None, None)
    assert h.scan("orders", D).num_rows == 0

    warehouse.add_events(D, 120)
    h.run("load", "orders", "--day", D.isoformat(), check=True)
    warehouse.add_events(D, 30, start_id=500)
    h.run("load", "orders", "--day", D.isoformat(), check=True)

    assert h.read_generation("orders", D) == PartitionInfo(2, 150)
    assert (h.rows("orders", D), h.generation("orders", D)) == (150, 2)
    table = h.scan("orders", D)
    assert table.schema.equals(SCHEMAS["events"]) and table.num_rows == 150
    rows = {r["unit_id"]: r for r in table.to_pylist()}
    assert set(rows) == {f"u{i}" for i in range(120)} | {f"u{i}" for i in range(500, 530)}
    assert {r["generation"] for r in rows.values()} == {2}
    assert json.loads(rows["u7"]["metadata"]) == {"k": 1} and rows["u7"]["event_value"] == "7"
    assert h.rows("orders", D, "metrics") == 0 and h.scan("orders", D, "metrics").schema.equals(SCHEMAS["metrics"])


@pytest.mark.asyncio
async def test_the_harness_reads_from_inside_a_running_event_loop(ingestd_daemon, warehouse):
    ingestd_daemon.write_config(BODY)
    warehouse.add_events(D, 10)
    ingestd_daemon.run("load", "orders", "--day", D.isoformat(), check=True)
    assert ingestd_daemon.rows("orders", D) == 10
    assert isinstance(ingestd_daemon.scan("orders", D), pa.Table)


def test_the_harness_has_no_default_sink(tmp_path):
    with pytest.raises(ValueError, match="ingestd_sink"):
        DaemonHarness(tmp_path).write_config(BODY)
    with pytest.raises(ValueError, match="kind is one of"):
        DaemonHarness(tmp_path, sink=SINKS["sqlite"]).rows("orders", D, "orders")


def test_configured_sink_builds_the_named_sink_as_the_daemon_does(tmp_path, monkeypatch):
    monkeypatch.delenv("INGESTD_DISABLE_PLUGINS", raising=False)
    config = tmp_path / "conf" / "daemon.toml"
    config.parent.mkdir()
    config.write_text('[sinks.first]\ntype = "sqlite"\npath = "a.sqlite"\n\n'
                      '[sinks.second]\ntype = "duckdb"\npath = "/abs/b.duckdb"\n\n'
                      '[connections.wh]\ntype = "no-such-type"\npassword_env = "NOT_SET_HERE"\n')
    first = configured_sink(config)
    assert (type(first).type_name, first.name, str(first.config.path)) == \
        ("sqlite", "first", str(config.parent / "a.sqlite"))
    second = configured_sink(config, "second")
    assert (type(second).type_name, second.name, str(second.config.path)) == ("duckdb", "second", "/abs/b.duckdb")
    with pytest.raises(ConfigErrors, match=r"sinks\.third: no such sink \(configured: first, second\)"):
        configured_sink(config, "third")
    config.write_text('[sinks.bad]\ntype = "sqlite"\npath = "a.sqlite"\nno_such_key = 1\n')
    with pytest.raises(ConfigErrors, match=r"sinks\.bad\.no_such_key"):
        configured_sink(config)


# -- the kit knows the plugins only through the contract ------------------------------------------

KIT = ROOT / "kernel" / "testing"


def builtin_names() -> set[str]:
    """What names a built-in plugin: its folder under plugins/, the types it registers, the
    import path of the built-in plugins, and the warehouses and stores the guide lists."""
    registry = Registry()
    folders = set()
    for folder in sorted((ROOT / "plugins").iterdir()):
        if (folder / "__init__.py").exists():
            folders.add(folder.name)
            importlib.import_module(f"ingestd.plugins.{folder.name}").ingestd_register(registry=registry)
    assert {"duckdb", "duckdb_sink", "sqlite_sink"} <= folders and {"duckdb", "sqlite"} <= set(registry.sinks)
    return (folders | set(registry.connectors) | set(registry.sinks)
            | {"ingestd.plugins", "duckdb", "sqlite", "redshift", "snowflake", "bigquery", "databricks"})


def code_tokens(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every token of a module that is code: comments and docstrings (prose,
    where an example may name a built-in store) are left out; other strings are code."""
    source = path.read_text()
    # a string that is a statement of its own: a module, class or function docstring, or an
    # attribute's docstring after an assignment; never a string that is used
    docstrings = {(node.lineno, node.col_offset) for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                  and isinstance(node.value.value, str)}
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and tok.start in docstrings):
            continue
        if tok.type in (tokenize.NAME, tokenize.STRING):
            out.append((tok.start[0], tok.string))
    return out


def test_the_kit_names_no_builtin_plugin():
    words = builtin_names()
    files = sorted(KIT.rglob("*.py"))
    assert {p.name for p in files} >= {"plugin.py", "sink_suite.py", "connector_suite.py"}
    found = [f"{path.relative_to(ROOT)}:{line}: {text}"
             for path in files for line, text in code_tokens(path)
             if any(re.search(rf"(?<![a-z0-9]){re.escape(w)}(?![a-z0-9])", text.lower()) for w in words)]
    assert not found, ("kernel/testing must reach plugins through the contracts only, never name a "
                       "built-in one (only its docstrings and comments may, as examples):\n" + "\n".join(found))


@pytest.mark.parametrize("source, bad", [
    ("import duckdb", True),
    ("x = 'type = \"sqlite\"'", True),
    ("from ingestd.plugins.duckdb_sink.sink import DuckDBSink", True),
    ("def f():\n    '''Reads a DuckDB file, for example.'''\n    return 1  # or a SQLite one", False),
    ("SINK = 'main'\n'''An example: type = \"duckdb\".'''", False),
    ("partitions = 1  # duckdb_sink's table", False),
])
def test_the_builtin_name_check_tells_code_from_prose(tmp_path, source, bad):
    path = tmp_path / "sample.py"
    path.write_text(source + "\n")
    words = builtin_names()
    named = [t for _, t in code_tokens(path)
             if any(re.search(rf"(?<![a-z0-9]){re.escape(w)}(?![a-z0-9])", t.lower()) for w in words)]
    assert bool(named) == bad, named


KIT_MAY_IMPORT = {"pytest", "pyarrow"}


def test_the_kit_imports_only_ingestd_pytest_and_pyarrow():
    public = set(ingestd_api.__all__)
    bad = []
    for path in sorted(KIT.rglob("*.py")):
        where = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # the kit's own modules
                    continue
                modules = [(node.module or "", [a.name for a in node.names])]
            else:
                continue
            for module, names in modules:
                top = module.split(".")[0]
                if module == "ingestd":
                    bad += [f"{where}:{node.lineno}: ingestd.{n} is not public" for n in names or [] if n not in public]
                elif module.startswith("ingestd.testing") or top in KIT_MAY_IMPORT or top in sys.stdlib_module_names:
                    continue
                else:
                    bad.append(f"{where}:{node.lineno}: imports {module}")
    assert not bad, ("the kit imports only ingestd (its public names), pytest, pyarrow and the standard library:\n"
                     + "\n".join(bad))
