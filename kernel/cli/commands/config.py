"""`ingestd config show`: the effective config, defaults filled in, secrets redacted."""

from __future__ import annotations

import argparse
import json

from ..registry import EXIT_OK, Command, setup


class ConfigCommand(Command):
    name = "config"
    help = "show the effective configuration (defaults filled in, secrets as ***)"
    example = "ingestd -c daemon.toml config show"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("action", choices=["show"])

    def run(self, args: argparse.Namespace) -> int:
        config, _ = setup(args.config)
        print(json.dumps(config.redacted(), indent=2, default=str))
        return EXIT_OK
