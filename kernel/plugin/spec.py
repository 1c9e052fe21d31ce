"""Every hook a plugin can implement, grouped by phase.

Hooks are registration and observation only: they are synchronous and must be cheap. The work
itself (warehouse I/O, writes) happens in the async methods of `Connector` and `Sink` classes
that `ingestd_register` adds to the registry. A module that implements a hook not listed here is
refused at load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import hookspec

if TYPE_CHECKING:
    from ..core.contracts import Registry
    from ..core.events import Event



# -- registration: once, when plugins are loaded -------------------------------------------

@hookspec
def ingestd_register(registry: "Registry") -> None:
    """Add connector and sink classes to the registry.

    Called once per plugin when the plugin manager loads it, before the config is validated, so
    that `[connections.*]` and `[sinks.*]` tables can name the types it adds. Call
    `registry.add_connector(cls)` / `registry.add_sink(cls)`; a type name taken by another plugin
    is refused. Returns nothing.

    Since API version 1.
    """


# -- observation: while the daemon runs ----------------------------------------------------

@hookspec
def ingestd_event(event: "Event") -> None:
    """Observe one lifecycle event (a `kernel.events.Event` subclass).

    Called after the state change the event reports has been committed (and its outbox row
    written), in the daemon's event loop: return quickly and do not block. Exceptions are logged
    and ignored; one failing observer never stops a load. Returns nothing.

    Since API version 1.
    """
