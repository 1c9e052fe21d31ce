"""`ingestd check`: validate the config; for every source, check its connection, run its query
with a zero-row or one-row limit and verify the mapped columns; open each sink; connect to the
broker when the bus is on. One line each, then what is wrong (or worth knowing) under it."""

from __future__ import annotations

import argparse
import asyncio

import aiomqtt

from ...bus.client import reach_broker
from ...core.config import Config
from ...engine.runtime import check_capabilities
from ...service.checks import check_sinks, check_sources
from ..registry import EXIT_FAILED, EXIT_OK, Command, setup


async def _bus_line(config: Config) -> tuple[bool, str]:
    bus = config.bus
    where = f"{bus.host}:{bus.port} (MQTT {bus.protocol}{', TLS' if bus.tls or bus.ca_file else ''})"
    if not bus.enabled:
        return True, "-      bus: off ([bus] enabled = false)"
    try:
        await reach_broker(bus)
    except TimeoutError:
        return False, f"FAILED bus: no answer from the broker at {where} within 10 s"
    except aiomqtt.MqttError as exc:
        return False, f"FAILED bus: cannot connect to the broker at {where}: {exc}"
    return True, f"ok     bus: connected to the broker at {where}"


class Check(Command):
    name = "check"
    help = "validate the config, run every source's query (0-1 rows) against its mapping, open sinks and the bus"
    example = "ingestd -c daemon.toml check"

    def run(self, args: argparse.Namespace) -> int:
        config, plugins = setup(args.config)
        check_capabilities(config, plugins)
        for info in plugins.infos:
            if info.error:
                print(f"plugin {info.name}: not loaded: {info.error}")

        async def work() -> bool:
            ok = True
            for r in await check_sources(config, plugins):
                ok &= r.ok
                if r.error:
                    print(f"FAILED {r.source}: connection {r.connection}: {r.error}")
                elif r.problems:
                    print(f"FAILED {r.source}: connection {r.connection} ({r.connection_type}) reads the query for "
                          f"{r.day}, but the mapping does not fit its result:")
                else:
                    print(f"ok     {r.source}: connection {r.connection} ({r.connection_type}) reads the day query"
                          + (f" ({r.day}: {r.columns} columns, the mapped ones usable)" if r.columns is not None
                             else ""))
                for line in r.problems:
                    print(f"         {line}")
                for line in r.notes:
                    print(f"         note: {line}")
            for s in await check_sinks(config, plugins):
                ok &= s.ok
                print(f"ok     sink {s.sink} ({s.sink_type}): opened" if s.ok
                      else f"FAILED sink {s.sink} ({s.sink_type}): {s.error}")
            bus_ok, line = await _bus_line(config)
            print(line)
            return ok and bus_ok

        return EXIT_OK if asyncio.run(work()) else EXIT_FAILED
