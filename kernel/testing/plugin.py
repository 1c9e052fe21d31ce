"""The conformance kit's pytest plugin (entry point `pytest11`, name `ingestd`).

Installing ingestd registers it, so every pytest run in that environment has it; where plugin
autoloading is off (`PYTEST_DISABLE_PLUGIN_AUTOLOAD`), add `-p ingestd.testing.plugin` or
`pytest_plugins = ["ingestd.testing.plugin"]` in a conftest.py. It needs pytest-asyncio (the
kit's tests are async): `pip install pytest pytest-asyncio`.

A connector author's whole conformance test (the suite is `ingestd.testing.ConnectorSuite`):

    import pytest_asyncio
    from ingestd.testing import ConnectorSuite

    class TestMyWarehouse(ConnectorSuite):
        @pytest_asyncio.fixture
        async def connector(self):                  # an opened connector on a test warehouse
            c = MyConnector(MyConfig(dsn=...), name="kit")
            yield c
            await c.close()

        @pytest_asyncio.fixture
        async def kit_table(self, connector):      # an empty table the kit fills (a KitTable)
            return MyKitTable(...)                 # name, insert(rows), update_value(user, value)

A sink author's (`ingestd.testing.SinkSuite`):

    class TestMySink(SinkSuite):
        @pytest_asyncio.fixture
        async def sink(self, tmp_path):
            s = MySink(MySinkConfig(path=str(tmp_path / "store")), name="kit")
            await s.open()
            yield s
            await s.close()

What the plugin adds:

- marker `ingestd_kit` on every test a suite contributes: `pytest -m ingestd_kit` runs only the
  kit, `-m "not ingestd_kit"` only the author's own tests;
- fixture `ingestd_daemon`: the real `ingestd` CLI on a daemon.toml in `tmp_path` (no MQTT), for
  end-to-end tests of an installed plugin. It loads into a sink that the test supplies, the body
  of the config's `[sinks.main]` table: override the fixture `ingestd_sink` (in the test module
  or a conftest.py), or pass `write_config(..., sink=...)`; there is no default. The harness
  reads rows back through the `Sink` contract only (`rows`, `generation`, `scan`), so any sink
  will do: the store your deployment uses, or your own sink plugin under test:

      @pytest.fixture
      def ingestd_sink():
          return 'type = "mystore"\\npath = "store"'     # any installed sink type and its keys

      def test_end_to_end(ingestd_daemon):
          ingestd_daemon.write_config('''
              [connections.wh]
              type = "mywarehouse"
              ...
              [sources.orders]
              connection = "wh"
              ...
          ''')
          out = ingestd_daemon.run("run", "--once", "--now", "2026-11-21T07:00:00Z")
          assert out.returncode == 0, out.stderr
          assert ingestd_daemon.rows("orders", datetime.date(2026, 11, 20)) == 1000
          assert ingestd_daemon.scan("orders", datetime.date(2026, 11, 20)).num_rows == 1000
          assert ingestd_daemon.plugin("mywarehouse")["error"] is None

- a clear usage error when the kit's tests are collected without pytest-asyncio;
- a report header line naming the plugin API version the kit checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pytest

from ingestd import API_VERSION, SCHEMAS, Kind, PartitionInfo, Sink, configured_sink
from ingestd.testing import ConnectorSuite, KitTable, SinkSuite
from ingestd.testing.connector_suite import Closable

__all__ = ["ConnectorSuite", "DaemonHarness", "KitTable", "SinkSuite"]

MARKER = "ingestd_kit"
SUITES = (ConnectorSuite, SinkSuite)


# -- hooks ---------------------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: a test of the ingestd conformance kit (ConnectorSuite, SinkSuite)")


def pytest_report_header(config: pytest.Config) -> str:
    return f"ingestd conformance kit: plugin API {API_VERSION}"


def _kit_test(item: pytest.Item) -> bool:
    cls = getattr(item, "cls", None)
    if cls is None or not issubclass(cls, SUITES):
        return False
    name = getattr(item, "originalname", item.name)
    return any(name in vars(suite) for suite in SUITES if issubclass(cls, suite))


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    kit = [item for item in items if _kit_test(item)]
    for item in kit:
        item.add_marker(MARKER)
    if kit and not config.pluginmanager.hasplugin("asyncio"):
        raise pytest.UsageError("the ingestd conformance kit's tests are async and need pytest-asyncio: "
                                "pip install pytest-asyncio (and do not disable it with -p no:asyncio)")


# -- the end-to-end harness ------------------------------------------------------------------

T = TypeVar("T")

SINK_NAME = "main"
NO_SINK = ("the ingestd_daemon harness needs the sink to load into: define a fixture `ingestd_sink` "
           "returning the body of [sinks.main] (its `type` and keys), or call write_config(..., sink=...)")


class DaemonHarness:
    """The real `ingestd` CLI on a config in `folder`. `write_config` adds `[daemon]` (state
    store in the folder, quick retries), `[bus]` (off) and `[sinks.main]` (the table the caller
    gives, as `sink` here or to `write_config`) around the connection and source tables it is
    given. `rows`, `generation` and `scan` read that sink back in this process, through the
    `Sink` contract (`read_generation`, `scan`) of whichever plugin provides its type, so the
    harness knows no sink's storage. Read while no daemon runs on the config: each read opens
    the sink (`open()` may clean up after a crash) and closes it again."""

    def __init__(self, folder: Path, sink: str | None = None):
        self.folder = Path(folder)
        self.config = self.folder / "daemon.toml"
        self.sink = sink

    def write_config(self, body: str, *, daemon: str = "", sink: str | None = None) -> Path:
        """Write daemon.toml: `body` holds `[connections.*]` and `[sources.*]` tables; `daemon`
        extra `[daemon]` keys; `sink` the body of `[sinks.main]` (default: the harness's)."""
        sink = self.sink if sink is None else sink
        if sink is None:
            raise ValueError(NO_SINK)
        head = "\n".join([
            "[daemon]", 'state_path = "state.db"', "retry_attempts = 2", "retry_base_seconds = 0.05",
            "retry_max_seconds = 0.2", textwrap.dedent(daemon).strip(), "",
            "[bus]", "enabled = false", "",
            f"[sinks.{SINK_NAME}]", textwrap.dedent(sink).strip(), "",
        ])
        self.config.write_text(head + "\n" + textwrap.dedent(body).strip() + "\n")
        return self.config

    @staticmethod
    def command() -> list[str]:
        """The installed `ingestd` script beside this Python, else `python -m ingestd`."""
        script = shutil.which("ingestd", path=str(Path(sys.executable).parent))
        return [script] if script else [sys.executable, "-m", "ingestd"]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment without the caller's INGESTD_* variables, plus `extra`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INGESTD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        env.update(extra)
        return env

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """`ingestd -c daemon.toml ARGS...`, output captured as text."""
        cmd = [*self.command(), "-c", str(self.config), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.folder, timeout=timeout,
                              env=self.env(**(env or {})))
        if check and done.returncode != 0:
            raise AssertionError(f"ingestd {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def plugins(self, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """`ingestd plugins --json`: every plugin's name, distribution, version, api, types, error."""
        cmd = [*self.command(), "plugins", "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=self.env(**(env or {})))
        if done.returncode != 0:
            raise AssertionError(f"ingestd plugins exited {done.returncode}\n{done.stderr}")
        infos: list[dict[str, Any]] = json.loads(done.stdout)
        return infos

    def plugin(self, name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        """One plugin's entry of `plugins()`, by plugin name or by a type it provides."""
        for info in self.plugins(env):
            if name == info["name"] or name in info["connectors"] or name in info["sinks"]:
                return info
        raise AssertionError(f"no plugin named {name!r} or providing type {name!r} is installed")

    # -- reading the sink back, through the Sink contract --------------------------------------

    def read_generation(self, source: str, day: dt.date, kind: Kind = "events") -> PartitionInfo | None:
        """What the sink holds for one source and day: its visible generation and row count."""
        _check_kind(kind)
        return self._with_sink(lambda sink: sink.read_generation(kind, source, day))

    def rows(self, source: str, day: dt.date, kind: Kind = "events") -> int:
        """Rows of the visible generation of one source and day (0 if never loaded)."""
        info = self.read_generation(source, day, kind)
        return info.rows if info is not None else 0

    def generation(self, source: str, day: dt.date, kind: Kind = "events") -> int | None:
        """The visible generation of one source and day, or None if never loaded."""
        info = self.read_generation(source, day, kind)
        return info.generation if info is not None else None

    def scan(self, source: str, day: dt.date, kind: Kind = "events") -> pa.Table:
        """Every row of the visible generation of one source and day, in the canonical schema
        (`ingestd.SCHEMAS[kind]`), in no particular order: sort or filter it in the test."""
        _check_kind(kind)

        async def collect(sink: Sink) -> pa.Table:
            stream = sink.scan(kind, source, day)
            assert isinstance(stream, Closable), f"the sink's scan returned a {type(stream).__name__}, without aclose()"
            async with contextlib.aclosing(stream):
                return pa.Table.from_batches([batch async for batch in stream], SCHEMAS[kind])

        return self._with_sink(collect)

    def _with_sink(self, read: Callable[[Sink], Awaitable[T]]) -> T:
        """Build the configured sink from the plugin registry, open it, `read`, close it; on an
        event loop of its own (a worker thread's, when the caller is inside a running loop)."""

        async def session() -> T:
            sink = configured_sink(self.config, SINK_NAME)
            await sink.open()
            try:
                return await read(sink)
            finally:
                await sink.close()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(session())
        with ThreadPoolExecutor(1, thread_name_prefix="ingestd-harness") as pool:
            return pool.submit(asyncio.run, session()).result()


def _check_kind(kind: str) -> None:
    if kind not in SCHEMAS:
        raise ValueError(f"kind is one of {', '.join(SCHEMAS)}, not {kind!r}")


@pytest.fixture
def ingestd_sink() -> str | None:
    """The body of the harness's `[sinks.main]` table (`type = "..."` and the sink's keys).
    Override it in a test module or conftest.py; by default there is none, and `write_config`
    asks for one."""
    return None


@pytest.fixture
def ingestd_daemon(tmp_path: Path, ingestd_sink: str | None) -> DaemonHarness:
    """The real `ingestd` CLI on a daemon.toml in `tmp_path`, loading into the `ingestd_sink`
    table (see `DaemonHarness`)."""
    return DaemonHarness(tmp_path, sink=ingestd_sink)
