"""ingestd's public plugin API: everything a connector, sink or observer plugin may import.

Plugins import from `kernel` only, never from its submodules.
"""

from __future__ import annotations

import pluggy

from .contracts import (Capabilities, Connector, Kind, PartitionInfo, ProbeResult, Registry, Sink,
                        SourceInfo, Target)
from .errors import (ConfigError, ConfigErrors, ConnectorError, IngestdError, PermanentError, PluginError,
                     SinkError, TransientError)
from .events import (BackfillAccepted, BackfillDone, BackfillProgress, CheckChanged, CheckUnchanged,
                     DaemonStarted, DaemonStopping, Event, LoadEmpty, LoadFailed, LoadStarted,
                     LoadSucceeded)
from .models import Secret, build_model
from .query import DayQuery, DayWindow, quote_ident
from .schema import EVENTS_SCHEMA, METRICS_SCHEMA, SCHEMAS

from .plugins import API_VERSION  # a plugin declares INGESTD_API = (min, max), inclusive

hookimpl = pluggy.HookimplMarker("ingestd")

__all__ = [
    "API_VERSION", "hookimpl",
    "Connector", "Sink", "Registry", "Capabilities", "ProbeResult", "SourceInfo", "Target",
    "PartitionInfo", "Kind", "DayQuery", "DayWindow", "quote_ident",
    "EVENTS_SCHEMA", "METRICS_SCHEMA", "SCHEMAS",
    "Secret", "build_model",
    "IngestdError", "ConfigError", "ConfigErrors", "ConnectorError", "TransientError", "PermanentError",
    "SinkError", "PluginError",
    "Event", "LoadStarted", "LoadSucceeded", "LoadEmpty", "LoadFailed", "CheckChanged",
    "CheckUnchanged", "BackfillAccepted", "BackfillProgress", "BackfillDone", "DaemonStarted",
    "DaemonStopping",
]
