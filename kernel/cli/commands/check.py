"""`ingestd check`: validate the config and check every source's connection."""

from __future__ import annotations

import argparse
import asyncio

from ...engine.runtime import check_capabilities
from ...service.checks import check_sources
from ..registry import EXIT_FAILED, EXIT_OK, Command, setup


class Check(Command):
    name = "check"
    help = "validate the config and check every source's connection"
    example = "ingestd -c daemon.toml check"

    def run(self, args: argparse.Namespace) -> int:
        config, plugins = setup(args.config)
        check_capabilities(config, plugins)
        for info in plugins.infos:
            if info.error:
                print(f"plugin {info.name}: not loaded: {info.error}")
        results = asyncio.run(check_sources(config, plugins))
        for r in results:
            if r.ok:
                print(f"ok     {r.source}: connection {r.connection} ({r.connection_type}) reads the day query")
            else:
                print(f"FAILED {r.source}: connection {r.connection}: {r.error}")
        return EXIT_FAILED if any(not r.ok for r in results) else EXIT_OK
