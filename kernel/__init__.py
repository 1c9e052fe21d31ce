"""ingestd's public plugin API: everything a connector, sink or observer plugin may import.

Plugins import from `ingestd` only, never from its submodules.
"""

from __future__ import annotations

from .core.contracts import (
                        Capabilities,
                        Connector,
                        Fence,
                        Kind,
                        Observer,
                        ObserverStats,
                        PartitionInfo,
                        ProbeResult,
                        Registry,
                        Sink,
                        SourceInfo,
                        Target,
)
from .core.errors import (
                        ConfigError,
                        ConfigErrors,
                        ConnectorError,
                        FencedOut,
                        IngestdError,
                        PermanentError,
                        PluginError,
                        SinkError,
                        TransientError,
)
from .core.events import (
                        BackfillAccepted,
                        BackfillDone,
                        BackfillProgress,
                        CheckChanged,
                        CheckHeld,
                        CheckUnchanged,
                        DaemonStarted,
                        DaemonStopping,
                        Event,
                        LoadEmpty,
                        LoadFailed,
                        LoadStarted,
                        LoadSucceeded,
                        SchemaChanged,
)
from .core.logs import get as get_logger
from .core.models import Secret, build_model
from .core.query import DayQuery, DayWindow, day_query, quote_ident
from .core.schema import EVENTS_SCHEMA, METRICS_SCHEMA, SCHEMAS
from .core.secrets import pem_lines, scrub
from .core.streams import Outlet, Rechunker, ThreadSession, ThreadStream, rechunk
from .plugin import API_VERSION, hookimpl  # a plugin declares INGESTD_API = (min, max), inclusive
from .plugin.configured import configured_sink

__all__ = [
    "API_VERSION", "hookimpl",
    "Connector", "Sink", "Observer", "ObserverStats", "Registry", "Capabilities", "ProbeResult", "SourceInfo", "Target",
    "Fence", "FencedOut",
    "PartitionInfo", "Kind", "DayQuery", "DayWindow", "day_query", "quote_ident",
    "EVENTS_SCHEMA", "METRICS_SCHEMA", "SCHEMAS",
    "Secret", "build_model", "configured_sink", "get_logger", "scrub", "pem_lines",
    "ThreadStream", "Outlet", "ThreadSession", "Rechunker", "rechunk",
    "IngestdError", "ConfigError", "ConfigErrors", "ConnectorError", "TransientError", "PermanentError",
    "SinkError", "PluginError",
    "Event", "LoadStarted", "LoadSucceeded", "LoadEmpty", "LoadFailed", "CheckChanged", "CheckHeld",
    "CheckUnchanged", "SchemaChanged", "BackfillAccepted", "BackfillProgress", "BackfillDone", "DaemonStarted",
    "DaemonStopping",
]
