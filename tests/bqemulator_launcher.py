"""Start the bqemulator BigQuery emulator offline (run with `.venvs/bqemulator/bin/python`).

bqemulator installs and loads DuckDB's `spatial` extension at start, which downloads it and so
cannot work without network access; the tests use no GEOGRAPHY, so that step is replaced with a
no-op before the emulator's own CLI runs (and the `avro` extension, also a download, is
not loaded unless BQEMU_ENABLE_FORMAT_EXTENSIONS says so). Usage:

    .venvs/bqemulator/bin/python tests/bqemulator_launcher.py REST_PORT GRPC_PORT [PROJECT]

which runs `bqemulator start --rest-port REST_PORT --grpc-port GRPC_PORT --project PROJECT`
on 127.0.0.1, in memory, until it is terminated.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Python puts this script's folder first on sys.path, and tests/bqemulator.py (the fixture
# helper) would then shadow the bqemulator package: take the folder off.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3):
        raise SystemExit("usage: bqemulator_launcher.py REST_PORT GRPC_PORT [PROJECT]")
    rest_port, grpc_port = argv[0], argv[1]
    project = argv[2] if len(argv) == 3 else "test"

    # Its Avro load/extract support downloads DuckDB's `avro` extension too: off, unless asked.
    os.environ.setdefault("BQEMU_ENABLE_FORMAT_EXTENSIONS", "false")

    from bqemulator.storage.engine import DuckDBEngine

    DuckDBEngine._load_spatial = lambda self: None  # offline: no GEOGRAPHY support needed

    from bqemulator.cli import main as cli_main

    cli_main(["start", "--rest-host", "127.0.0.1", "--grpc-host", "127.0.0.1",
              "--rest-port", rest_port, "--grpc-port", grpc_port, "--project", project,
              "--ephemeral"], prog_name="bqemulator")


if __name__ == "__main__":
    main(sys.argv[1:])
