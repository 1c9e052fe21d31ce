"""The Databricks connector, on databricks-sql-connector (Thrift backend).

See README.md beside this file; sample.toml is its documented configuration.
"""

from ingestd import hookimpl

from .connector import DatabricksConnector

INGESTD_API = (2, 2)


@hookimpl
def ingestd_register(registry) -> None:
    registry.add_connector(DatabricksConnector)
