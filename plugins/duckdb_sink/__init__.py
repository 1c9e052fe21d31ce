"""The DuckDB sink: the analytics store in a DuckDB file (the embedded default).

See README.md beside this file; sample.toml is its documented configuration.
"""

from ingestd import hookimpl

from .sink import DuckDBSink

INGESTD_API = (2, 2)


@hookimpl
def ingestd_register(registry) -> None:
    registry.add_sink(DuckDBSink)
