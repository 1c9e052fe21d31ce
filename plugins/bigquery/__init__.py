"""The BigQuery connector, on google-cloud-bigquery.

See README.md beside this file; sample.toml is its documented configuration.
"""

from ingestd import hookimpl

from .connector import BigQueryConnector

INGESTD_API = (2, 2)


@hookimpl
def ingestd_register(registry) -> None:
    registry.add_connector(BigQueryConnector)
