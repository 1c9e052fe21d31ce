"""`ingestd check`: each source's connection proven to work and to read the source's day query,
without the state store (a daemon may be running)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from ..core.config import Config
from ..core.contracts import Connector
from ..core.errors import IngestdError
from ..core.query import DayWindow, day_query
from ..plugin.manager import LoadedPlugins


@dataclass(frozen=True)
class SourceCheck:
    source: str
    connection: str
    connection_type: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def check_sources(config: Config, plugins: LoadedPlugins) -> list[SourceCheck]:
    """Run every source's connector `check()` with its day query for today minus `lag_days`."""
    connectors: dict[str, Connector] = {}
    out = []
    try:
        for name, src in config.sources.items():
            plugged = config.connections[src.connection]
            if src.connection not in connectors:
                connectors[src.connection] = plugins.registry.connectors[plugged.type](plugged.config,
                                                                                      name=src.connection)
            conn = connectors[src.connection]
            day = dt.date.today() - dt.timedelta(days=src.lag_days)
            query = day_query(src.query, DayWindow.of(day, src.timezone), conn.capabilities,
                              **src.mapping.day_filter(src.kind))
            try:
                await conn.check(query)
                out.append(SourceCheck(name, src.connection, plugged.type))
            except IngestdError as exc:
                out.append(SourceCheck(name, src.connection, plugged.type, str(exc)))
    finally:
        for conn in connectors.values():
            await conn.close()
    return out
