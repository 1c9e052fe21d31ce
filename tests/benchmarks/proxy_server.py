"""The Redshift test proxy (tests/pg_proxy.py) in a process of its own, for the benchmarks.

    python -m tests.benchmarks.proxy_server PG_HOST PG_PORT   # prints the proxy's port, runs until stdin closes

Two differences from the tests' in-process proxy, both so that it stands in for a network and
not for a CPU load:
- it runs in its own process, so its threads never share an interpreter lock with what is
  measured (the driver in the benchmark, or `ingestd load`);
- once a session's start-up is done (the first ReadyForQuery, after which the proxy rewrites
  nothing unless a result has a `jsonb` column, which the benchmark's tables do not have), it
  copies the server's bytes through as they come instead of walking every message in Python,
  which would cost about a microsecond per row.
"""

from __future__ import annotations

import signal
import sys

from tests import pg_proxy
from tests.pg_proxy import RedshiftProxy, ServerStream

READY_FOR_QUERY = (b"Z\x00\x00\x00\x05I", b"Z\x00\x00\x00\x05T", b"Z\x00\x00\x00\x05E")


class PassThroughStream(ServerStream):
    """ServerStream until the end of start-up, then a plain copy."""

    through = False

    def feed(self, data: bytes) -> bytes:
        if self.through:
            return data
        out = super().feed(data)
        if not self.pending and not self.skip and out.endswith(READY_FOR_QUERY):
            self.through = True
        return out


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    pg_proxy.ServerStream = PassThroughStream  # what RedshiftProxy._serve instantiates
    proxy = RedshiftProxy(host, port, jsonb_as_super=False).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(proxy.port, flush=True)
    try:
        sys.stdin.read()  # until the benchmark closes our stdin (or exits)
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
