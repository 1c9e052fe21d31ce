"""`ingestd plugins`: each plugin, its distribution, version, API range, types and load error."""

from __future__ import annotations

import argparse
import json

from ...plugin.manager import load_plugins
from ..registry import EXIT_OK, Command


class Plugins(Command):
    name = "plugins"
    help = "list plugins, their versions and the types they provide"
    example = "ingestd plugins --json"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        plugins = load_plugins()
        if args.json:
            print(json.dumps([i.as_dict() for i in plugins.infos], indent=2))
            return EXIT_OK
        for i in plugins.infos:
            api = f"API {i.api[0]}..{i.api[1]}" if i.api else "API ?"
            provides = ", ".join([f"connector:{c}" for c in i.connectors] + [f"sink:{s}" for s in i.sinks]
                                 + [f"observer:{o}" for o in i.observers]) or "-"
            dist = f"{i.distribution} {i.version}" if i.distribution else "(not installed as a distribution)"
            line = f"{i.name:<16} {dist:<28} {api:<10} {provides}"
            label = "DISABLED" if i.error and i.error.startswith("disabled by") else "FAILED"
            print(line + (f"  {label}: {i.error}" if i.error else ""))
        return EXIT_OK
