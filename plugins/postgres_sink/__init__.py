"""The PostgreSQL sink: the analytics store in a PostgreSQL schema, written with ADBC's Arrow bulk
ingest, one transaction per replaced day.

See README.md beside this file; sample.toml is its documented configuration.
"""

from ingestd import Registry, hookimpl

from .sink import PostgresSink

INGESTD_API = (2, 2)


@hookimpl
def ingestd_register(registry: Registry) -> None:
    registry.add_sink(PostgresSink)
