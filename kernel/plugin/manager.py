"""Plugin manager: every plugin, built-in or third-party, comes through the `ingestd`
entry-point group. One bad plugin is reported and skipped; it never kills the daemon.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

import pluggy

from ..core.contracts import Registry
from ..core.errors import PluginError
from . import API_VERSION, PROJECT
from . import spec as hookspecs

GROUP = PROJECT


@dataclass
class PluginInfo:
    name: str
    target: str
    distribution: str | None = None
    version: str | None = None
    api: tuple[int, int] | None = None
    connectors: list[str] = field(default_factory=list)
    sinks: list[str] = field(default_factory=list)
    error: str | None = None
    observers: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "module": self.target, "distribution": self.distribution,
                "version": self.version, "api": list(self.api) if self.api else None,
                "connectors": self.connectors, "sinks": self.sinks, "observers": self.observers,
                "error": self.error}


@dataclass
class LoadedPlugins:
    manager: pluggy.PluginManager
    registry: Registry
    infos: list[PluginInfo]

    def errors(self) -> dict[str, str]:
        return {i.name: i.error for i in self.infos if i.error}


def disabled_names() -> set[str]:
    return {n.strip() for n in os.environ.get("INGESTD_DISABLE_PLUGINS", "").split(",") if n.strip()}


def _api_range(module: ModuleType) -> tuple[int, int]:
    declared = getattr(module, "INGESTD_API", None)
    if (not isinstance(declared, tuple) or len(declared) != 2
            or not all(isinstance(v, int) for v in declared)):
        raise PluginError("declares no INGESTD_API = (min, max) tuple of the API versions it supports")
    low, high = declared
    if not low <= API_VERSION <= high:
        raise PluginError(f"supports plugin API {low}..{high}, but this ingestd has API {API_VERSION}")
    return low, high


def load_plugins(extra: list[tuple[str, ModuleType]] | None = None) -> LoadedPlugins:
    """Load every entry point of group `ingestd` (plus `extra` modules, for tests)."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    infos: list[PluginInfo] = []
    blocked = disabled_names()
    # ingestd's own plugins first: a third party cannot take over a built-in type name.
    eps = sorted(entry_points(group=GROUP), key=lambda e: (e.dist is None or e.dist.name != "ingestd", e.name))
    seen: set[str] = set()
    items: list[tuple[str, EntryPoint | ModuleType]] = [(e.name, e) for e in eps] + list(extra or [])
    for name, item in items:
        if name in seen:
            continue
        seen.add(name)
        target = item.value if isinstance(item, EntryPoint) else item.__name__
        info = PluginInfo(name, target)
        if isinstance(item, EntryPoint) and item.dist is not None:
            info.distribution, info.version = item.dist.name, item.dist.version
        infos.append(info)
        if name in blocked:
            info.error = "disabled by INGESTD_DISABLE_PLUGINS"
            continue
        try:
            module = item.load() if isinstance(item, EntryPoint) else item
            info.api = _api_range(module)
            pm.register(module, name)
            try:
                pm.check_pending()
            except pluggy.PluginValidationError as exc:
                pm.unregister(module)
                raise PluginError(f"implements a hook ingestd does not have: {exc}") from None
            _register(pm, module, name, registry, info)
        except Exception as exc:  # a broken plugin must not take the daemon down
            info.error = f"{type(exc).__name__}: {exc}"
            if pm.is_registered(locals().get("module")):
                pm.unregister(locals()["module"])
    return LoadedPlugins(pm, registry, infos)


def _register(pm: pluggy.PluginManager, module: ModuleType, name: str, registry: Registry, info: PluginInfo) -> None:
    impl = getattr(module, "ingestd_register", None)
    if impl is None:
        return
    before_c, before_s, before_o = set(registry.connectors), set(registry.sinks), set(registry.observers)
    registry._current_plugin = name
    try:
        impl(registry=registry)
    except Exception:
        for key in set(registry.connectors) - before_c:
            registry.connectors.pop(key)
        for key in set(registry.sinks) - before_s:
            registry.sinks.pop(key)
        for key in set(registry.observers) - before_o:
            registry.observers.pop(key)
        raise
    finally:
        registry._current_plugin = "?"
    info.connectors = sorted(set(registry.connectors) - before_c)
    info.sinks = sorted(set(registry.sinks) - before_s)
    info.observers = sorted(set(registry.observers) - before_o)
