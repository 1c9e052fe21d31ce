"""A sink built from a daemon.toml exactly as the daemon builds it, for tools that read a sink
back in a process of their own (the conformance kit's `ingestd_daemon` harness) and so must not
know which plugin provides it or how it stores rows."""

from __future__ import annotations

import os

from ..core.config import load_sinks
from ..core.contracts import Sink
from ..core.errors import ConfigError, ConfigErrors
from .manager import load_plugins


def configured_sink(config_file: str | os.PathLike[str], name: str | None = None) -> Sink:
    """A new, unopened instance of the sink `[sinks.NAME]` of `config_file` (the first sink when
    `name` is None, which is the one a source without `sink` uses), of the type a loaded plugin
    provides, with its table validated by that plugin's config model; relative paths are taken
    from the file's folder. The caller opens it, reads (`read_generation`, `scan`) and closes
    it. Only the `[sinks.*]` tables are read. Raises `ConfigErrors` for a bad or missing table."""
    loaded = load_plugins()
    sinks = load_sinks(config_file, loaded.registry, loaded.errors())
    if name is None:
        if not sinks:
            raise ConfigErrors([ConfigError("sinks", "no sink configured: add a [sinks.NAME] table",
                                            file=str(config_file))])
        name = next(iter(sinks))
    if name not in sinks:
        raise ConfigErrors([ConfigError(f"sinks.{name}", f"no such sink (configured: {', '.join(sinks) or 'none'})",
                                        file=str(config_file))])
    plugged = sinks[name]
    return loaded.registry.sinks[plugged.type](plugged.config, name=name)
