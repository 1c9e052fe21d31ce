"""`ingestd init [PATH]`: write the commented starter config (the repo's daemon.toml, shipped in
the package), so that `pip install ingestd && ingestd init && ingestd run` works anywhere."""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

from ..registry import EXIT_FAILED, EXIT_OK, Command


def starter_config() -> str:
    return (files("ingestd") / "daemon.toml").read_text(encoding="utf-8")


class Init(Command):
    name = "init"
    help = "write the commented starter config (a demo warehouse and store, the status page on 127.0.0.1:8470)"
    example = "ingestd init /etc/ingestd/daemon.toml"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("path", nargs="?", default="daemon.toml",
                            help="where to write it (default ./daemon.toml; a folder gets daemon.toml inside)")
        parser.add_argument("--force", action="store_true", help="replace a file that exists")

    def run(self, args: argparse.Namespace) -> int:
        path = Path(args.path)
        if path.is_dir() or args.path.endswith(("/", "\\")):
            path = path / "daemon.toml"
        if path.exists() and not args.force:
            print(f"{path} exists already; nothing written (--force replaces it)", file=sys.stderr)
            return EXIT_FAILED
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(starter_config(), encoding="utf-8")
        config = "" if path.resolve() == Path("daemon.toml").resolve() else f" -c {path}"
        print(f"wrote {path}: a demo warehouse (DuckDB) loaded into a DuckDB store, every key commented.\n"
              f"next: ingestd{config} run     (then open http://127.0.0.1:8470/ for the status page)")
        return EXIT_OK
