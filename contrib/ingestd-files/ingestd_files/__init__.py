"""ingestd-files: an ingestd connector for day partitions of Parquet or JSON Lines files.

The plugin module is `ingestd_files.connector` (entry point `files` in the `ingestd` group);
its docstring has the sample configuration.
"""

from .connector import FilesConfig, FilesConnector

__version__ = "0.1.0"

__all__ = ["FilesConfig", "FilesConnector", "__version__"]
