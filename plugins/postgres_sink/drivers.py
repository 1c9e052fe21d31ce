"""The two drivers, imported when the sink first needs them: without the `postgres` extra the
plugin still loads (the `ingestd plugins` list stays clean for everyone else), and a config that
uses the sink gets one clear error naming the extra to install."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

from ingestd import SinkError

EXTRA = "pip install 'ingestd[postgres]'"


def _load(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SinkError(f"the postgres sink needs {package}, which is not installed: {EXTRA}") from exc


def psycopg() -> ModuleType:
    return _load("psycopg", "psycopg 3")


def adbc() -> ModuleType:
    """`adbc_driver_postgresql.dbapi`."""
    return _load("adbc_driver_postgresql.dbapi", "adbc-driver-postgresql")


@functools.cache
def errors() -> tuple[type[BaseException], ...]:
    """What the drivers (and the sockets under them) raise."""
    return (_load("adbc_driver_manager", "adbc-driver-postgresql").Error, psycopg().Error, OSError)
