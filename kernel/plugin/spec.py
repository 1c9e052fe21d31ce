"""Every hook a plugin can implement, grouped by phase.

Hooks are registration and observation only: they are synchronous and must be cheap. The work
itself (warehouse I/O, writes) happens in the async methods of `Connector` and `Sink` classes
that `ingestd_register` adds to the registry. A module that implements a hook not listed here is
refused at load.

These docstrings are the hooks' only documentation: `scripts/plugin_docs.py` renders them as
PLUGINS.md's "Hook reference", and `tests/test_meta.py` checks that the guide shows each hook's
signature as it is here. Write them as pytest writes its hookspecs: a summary, `:param name:`
for every argument, `:returns:`, then the sections `Called`, `Errors` and `Rules` (a title
underlined with `=`), and `.. versionadded:: API N`. Text is Markdown (single backticks).
"""

from __future__ import annotations

from ..core.contracts import Registry
from ..core.events import Event
from . import hookspec

# -- registration: once, when plugins are loaded -------------------------------------------


@hookspec
def ingestd_register(registry: Registry) -> None:
    """Add connector, sink and observer classes, by type name, to the registry.

    :param registry: The registry of this process: call `registry.add_connector(cls)` with a
        `ingestd.Connector` subclass, `registry.add_sink(cls)` with a `ingestd.Sink` subclass
        and `registry.add_observer(cls)` with a `ingestd.Observer` subclass (since API 2). Each
        class needs a non-empty `type_name` and a `config_model`.
    :returns: Nothing; a returned value is ignored.

    Called
    ======
    Once per plugin, when the plugin manager loads it (daemon start and every CLI command),
    before the config is validated, so that `[connections.*]`, `[sinks.*]` and `[observers.*]`
    tables can name the types it adds.

    Errors
    ======
    A class that is not such a subclass, lacks `type_name` or `config_model`, or takes a type
    name another plugin already provides raises `PluginError`. Any exception here marks the
    plugin failed (shown by `ingestd plugins`) and undoes every type it added in this call.

    Rules
    =====
    Register classes only: open no connection and read no file here (instances are made from
    the config later).

    .. versionadded:: API 1
    """


# -- observation: while the daemon runs ----------------------------------------------------


@hookspec
def ingestd_event(event: Event) -> None:
    """Observe one lifecycle event.

    :param event: An instance of a `ingestd.Event` subclass (see the guide's "Observing
        events"); `event.type` is its dotted name, `event.to_json()` its MQTT payload.
    :returns: Nothing; a returned value is ignored.

    Called
    ======
    For every event of the process, after the state change it reports is committed (and its
    MQTT outbox row written), in the daemon's event loop, in the order events happen.

    Errors
    ======
    An exception is logged as `plugin.event_hook_failed` and ignored: the load and the other
    observers go on.

    Rules
    =====
    Synchronous and fast: no network or disk I/O, no sleeping; queue slow work. Events are
    immutable; keep no references you mutate. Ignore event types and `data` keys you do not
    know: new ones may come in any release.

    .. versionadded:: API 1
    """
