"""The DuckDB warehouse connector: a DuckDB file as the warehouse (and the demo warehouse).

See README.md beside this file; sample.toml is its documented configuration.
"""

from ingestd import hookimpl

from .connector import DuckDBConnector

INGESTD_API = (2, 2)


@hookimpl
def ingestd_register(registry) -> None:
    registry.add_connector(DuckDBConnector)
