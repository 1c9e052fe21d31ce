"""Error classes shared by the kernel and plugins.

A connector sorts every failure into one of two classes: `TransientError` (the kernel retries
with backoff) and `PermanentError` (the run fails now, with the message as its reason).
"""

from __future__ import annotations


class IngestdError(Exception):
    """Base of every error ingestd raises on purpose."""


class ConfigError(IngestdError):
    """The configuration is wrong. `path` names the key (e.g. `sources.orders.schedule[1]`)."""

    def __init__(self, path: str, message: str, *, file: str | None = None):
        self.path = path
        self.message = message
        self.file = file
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{path}: {message}" if path else f"{where}{message}")


class ConfigErrors(IngestdError):
    """Several configuration errors found in one pass, reported together."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class ConnectorError(IngestdError):
    """A warehouse call failed. `code` is the warehouse's own code (SQLSTATE, error number)."""

    def __init__(self, message: str, *, code: str | None = None):
        self.code = code
        super().__init__(f"[{code}] {message}" if code else message)


class TransientError(ConnectorError):
    """Worth retrying: connection reset, throttling, a resuming warehouse, a 5xx."""


class PermanentError(ConnectorError):
    """Retrying will not help: bad SQL, missing table or grant, bad credentials."""


class FencedOut(IngestdError):
    """A write was refused because the replica's lease on its partition was taken over: another
    replica holds a newer fencing token. Nothing was made visible; the day is the other's now."""


class SinkError(IngestdError):
    """The sink could not write; the previous generation stays whole."""


class RejectLimitExceeded(IngestdError):
    """A load rejected more rows than the source's `max_reject_pct` allows."""


class PluginError(IngestdError):
    """A plugin could not be loaded, registered, or does not fit this kernel's API version."""


class StateError(IngestdError):
    """The state store cannot be opened or used (locked, corrupt, wrong schema)."""
