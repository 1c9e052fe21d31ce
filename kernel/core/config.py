"""daemon.toml -> typed config. Every error names the file and the key path.

The file has `[daemon]`, `[bus]`, `[http]`, `[sinks.NAME]`, `[connections.NAME]`,
`[sources.NAME]` and `[observers.NAME]` tables. A connection's, sink's or observer's table is
validated by the config model of the plugin that provides its `type`. Relative paths are taken
from the config file's folder.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
import uuid
from collections.abc import Mapping as ReadOnlyMap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from .contracts import Connector, Observer, Registry, Sink
from .errors import ConfigError, ConfigErrors
from .models import BASE_DIR, Secret, UnsetVariable, build_model, expand_env, redact, secret_values
from .query import placeholder_mistakes, uses_placeholders
from .scheduler import validate_cron, validate_timezone
from .schema import Mapping

_T = TypeVar("_T")


@dataclass
class DaemonSection:
    """`[daemon]`: process-wide settings."""

    instance: str = ""
    state_path: str = "var/state.db"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_concurrent_loads: int = 2
    batch_rows: int = 50_000
    retry_attempts: int = 5
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    shutdown_grace_seconds: float = 30.0
    max_backfill_days: int = 366
    umask: str = "077"
    """The umask of every file ingestd creates (state store, sink files, lock): owner only."""
    state_url: str = ""
    """`postgresql://user@host:port/db`: the state store lives in PostgreSQL, shared by replicas
    (`state_path` then only places local files: the HTTP token and endpoint). No password in it:
    `state_password` (`_env`, `_file`), or libpq's passfile or service through the URL."""
    state_password: Secret | None = None
    state_schema: str = "ingestd"
    """The PostgreSQL schema of the state tables (created if missing)."""
    replica_id: str = ""
    """This daemon's name among replicas sharing a state store (default: the host name and a
    random suffix per process). A stable id lets a restarted daemon take back its own unsent
    events and interrupted runs at once; two running daemons must never share one."""
    lease_seconds: float = 30.0
    """How long a partition lease, a window or backfill-day claim and a heartbeat last unrenewed."""

    def validate(self) -> None:
        for key in ("max_concurrent_loads", "batch_rows", "retry_attempts", "max_backfill_days"):
            if getattr(self, key) < 1:
                raise ConfigError(key, "must be at least 1")
        if self.state_url:
            check_state_url(self.state_url)
        elif self.state_password is not None:
            raise ConfigError("state_password", "is set but state_url is not: the password is for a PostgreSQL "
                                                "state store")
        if not STATE_SCHEMA.match(self.state_schema):
            raise ConfigError("state_schema", "expected a plain lower-case PostgreSQL name (letters, digits, _; "
                                              f"not starting with a digit), got {self.state_schema!r}")
        if self.replica_id and not REPLICA_ID.match(self.replica_id):
            raise ConfigError("replica_id", "expected 1..64 letters, digits, '.', '_' or '-' (it is used in MQTT "
                                            f"topics), got {self.replica_id!r}")
        if self.lease_seconds < 5:
            raise ConfigError("lease_seconds", "must be at least 5")
        if not (self.umask.isdigit() and set(self.umask) <= set("01234567") and len(self.umask) <= 4):
            raise ConfigError("umask", f"expected an octal umask such as \"077\", got {self.umask!r}")


@dataclass
class BusSection:
    """`[bus]`: the MQTT connection (see the README's MQTT section)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str = ""
    base_topic: str = ""
    username: str | None = None
    password: Secret | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    reconnect_max_seconds: float = 60.0
    max_payload_bytes: int = 65536
    heartbeat_seconds: float = 60.0
    """How often the retained online state's `heartbeat_at` is refreshed."""
    shared: bool | str = False
    """Replicas of one cluster (README "Running several daemons"): requests are taken through the
    MQTT 5 shared subscription `$share/<group>/<base>/request/+`, so each is answered by one
    replica; the group is the instance name when `true`, or this name. Each replica publishes its
    own retained state (and will) under `<base>/replica/<replica_id>/state`."""

    def share_group(self, instance: str) -> str | None:
        """The shared-subscription group, or None when requests are not shared."""
        if self.shared is False:
            return None
        return instance if self.shared is True else self.shared

    def validate(self) -> None:
        if isinstance(self.shared, str) and (not self.shared or any(c in self.shared for c in "/+#$ ")):
            raise ConfigError("shared", f"a cluster name must be one topic level without '/', '+', '#', '$' or "
                                        f"spaces, got {self.shared!r}")


@dataclass
class HttpSection:
    """`[http]`: the HTTP listener (status page, `/metrics`, `/healthz`, `/readyz`, the control
    API under `/api/v1/`). Off when the table is absent.

    Write endpoints need `Authorization: Bearer <token>`. Without `token` (`token_env`,
    `token_file`) the daemon makes a random one at each start and writes it, readable by its
    user only, to `<state_path>.http-token`, where the CLI (and an operator with `cat`) finds
    it. A listener on an address other than loopback needs a configured token."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8470
    token: Secret | None = None
    max_body_bytes: int = 65536
    refresh_seconds: int = 30
    calendar_days: int = 35

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError("port", "must be 0..65535 (0: any free port)")
        if self.max_body_bytes < 1:
            raise ConfigError("max_body_bytes", "must be at least 1")
        if not 1 <= self.calendar_days <= 366:
            raise ConfigError("calendar_days", "must be 1..366")
        if self.refresh_seconds < 0:
            raise ConfigError("refresh_seconds", "must not be negative (0: the page does not refresh)")
        if self.token is None and not is_loopback(self.host):
            raise ConfigError("host", f"{self.host!r} is not a loopback address: give token_env or token_file "
                                      "so that the control API is not open to the network")
        if self.token is not None and len(self.token.reveal()) < 16:
            raise ConfigError("token", "must be at least 16 characters")


STATE_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
REPLICA_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PROCESS_SUFFIX = uuid.uuid4().hex[:6]
"""The default replica id's suffix: one per process, so two daemons on one host differ."""


def check_state_url(url: str) -> None:
    """A `postgresql://` URL without a password (errors never repeat the URL: it may hold one)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError as exc:
        raise ConfigError("state_url", f"not a valid URL ({exc})") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError("state_url", f"expected a postgresql://user@host:port/database URL, got scheme "
                                       f"{parts.scheme!r}")
    if password is not None or "password=" in parts.query.lower():
        raise ConfigError("state_url", "holds a password: give it with state_password_env or state_password_file "
                                       "(or a libpq passfile or service), never in the URL")


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine: `localhost`, 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


DEFAULT_RECHECK_SCHEDULE = ["0 */6 * * *"]


@dataclass
class RecheckSection:
    """`[sources.NAME.recheck]`: re-check windows and what counts as a change. On by default
    (every 6 hours over the last 3 days); `schedule = []` turns re-checks off."""

    schedule: list[str] = field(default_factory=lambda: list(DEFAULT_RECHECK_SCHEDULE))
    lookback_days: int = 3
    threshold_pct: float = 1.0
    detect: Literal["count", "checksum"] = "count"

    def validate(self) -> None:
        if self.lookback_days < 1:
            raise ConfigError("lookback_days", "must be at least 1")
        if self.threshold_pct < 0:
            raise ConfigError("threshold_pct", "must not be negative")


@dataclass
class SourceSection:
    """`[sources.NAME]`: one query on one connection, its mapping and schedule."""

    connection: str
    kind: Literal["events", "metrics"]
    query: str
    schedule: list[str]
    mapping: Mapping
    sink: str | None = None
    timezone: str = "UTC"
    lag_days: int = 1
    max_reject_pct: float = 1.0
    hold_drop_pct: float | None = None
    """Hold an automatic reload (scheduled, re-check) that would remove more than this share of a
    day's rows, until the user confirms it (`ingestd load`, a `reload` request). Off when unset."""
    ready_query: str | None = None
    batch_rows: int | None = None
    enabled: bool = True
    slices: int = 1
    slice_column: str | None = None
    recheck: RecheckSection = field(default_factory=RecheckSection)


@dataclass
class Plugged:
    """A connection or sink table: its plugin type and the plugin's validated config."""

    type: str
    config: Any
    derived_secrets: list[str] = field(default_factory=list)
    """What the plugin's `secret_values(config)` derived from its structured secrets."""


@dataclass
class Config:
    file: Path
    daemon: DaemonSection
    bus: BusSection
    sinks: dict[str, Plugged]
    connections: dict[str, Plugged]
    sources: dict[str, SourceSection]
    http: HttpSection | None = None
    observers: dict[str, Plugged] = field(default_factory=dict)

    def http_enabled(self) -> bool:
        return self.http is not None and self.http.enabled

    def sink_of(self, source: str) -> str:
        return self.sources[source].sink or next(iter(self.sinks))

    def state_path(self) -> Path:
        return resolve_path(self.file, self.daemon.state_path)

    def instance(self) -> str:
        return self.daemon.instance or socket.gethostname()

    def replica_id(self) -> str:
        """This process's id among replicas sharing the state store (`[daemon] replica_id`)."""
        return self.daemon.replica_id or f"{socket.gethostname()}-{PROCESS_SUFFIX}"

    def secrets(self) -> list[str]:
        """Every secret value of this config: each `Secret` field, and what the plugins derive from
        structured secrets (the fields of a key file). `ingestd.core.secrets` scrubs them."""
        values = secret_values(self.daemon) + secret_values(self.bus) + secret_values(self.http)
        for plugged in (*self.sinks.values(), *self.connections.values(), *self.observers.values()):
            values += secret_values(plugged.config) + plugged.derived_secrets
        return [v for v in values if v]

    def redacted(self) -> dict[str, Any]:
        return {
            "daemon": redact(self.daemon), "bus": redact(self.bus), "http": redact(self.http),
            "sinks": {k: {"type": v.type, **redact(v.config)} for k, v in self.sinks.items()},
            "connections": {k: {"type": v.type, **redact(v.config)} for k, v in self.connections.items()},
            "sources": {k: redact(v) for k, v in self.sources.items()},
            "observers": {k: {"type": v.type, **redact(v.config)} for k, v in self.observers.items()},
        }


def resolve_path(config_file: Path, raw: str) -> Path:
    path = Path(os.path.expanduser(raw))
    return path if path.is_absolute() else (config_file.parent / path).resolve()


KNOWN_TOP = {"daemon", "bus", "http", "sinks", "connections", "sources", "observers"}


def load_config(path: str | os.PathLike[str], registry: Registry,
                plugin_errors: dict[str, str] | None = None) -> Config:
    """Read and validate daemon.toml; raise ConfigErrors listing every problem found."""
    file, raw = _read(path)
    token = BASE_DIR.set(file.parent)
    try:
        return _load(file, raw, registry, plugin_errors or {})
    finally:
        BASE_DIR.reset(token)


def load_sinks(path: str | os.PathLike[str], registry: Registry,
               plugin_errors: dict[str, str] | None = None) -> dict[str, Plugged]:
    """Only the `[sinks.NAME]` tables of daemon.toml, validated as `load_config` validates them.
    For reading a sink back without the rest of the config (whose connections may need
    secrets from an environment this process does not have)."""
    file, raw = _read(path)
    errors: list[ConfigError] = []
    token = BASE_DIR.set(file.parent)
    try:
        sinks = _plugged(raw.get("sinks", {}), "sinks", registry.sinks, "sink", errors, plugin_errors or {},
                         registry)
    finally:
        BASE_DIR.reset(token)
    if errors:
        raise ConfigErrors([ConfigError(e.path, e.message, file=str(file)) for e in errors])
    return sinks


def _read(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    file = Path(path).resolve()
    try:
        raw = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigErrors([ConfigError("", "config file not found", file=str(file))]) from None
    except OSError as exc:
        raise ConfigErrors([ConfigError("", f"cannot read the config file: {exc.strerror or exc}",
                                        file=str(file))]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigErrors([ConfigError("", f"not valid TOML: {exc}", file=str(file))]) from None
    errors: list[ConfigError] = []
    expanded = _expand(raw, "", errors)
    if errors:
        raise ConfigErrors([ConfigError(e.path, e.message, file=str(file)) for e in errors])
    return file, expanded


SQL_KEYS = ("query", "ready_query")
"""Source keys left as written: SQL takes no values from the environment (bound parameters only)."""


def _expand(value: Any, where: str, errors: list[ConfigError]) -> Any:
    """Environment references (`${VAR}`, `${VAR:-default}`) in every string of the config but a
    source's SQL; an unset variable without a default is an error naming the key and it."""
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if isinstance(value, str) and not (where.startswith("sources.") and where.rsplit(".", 1)[-1] in SQL_KEYS):
        try:
            return expand_env(value)
        except UnsetVariable as exc:
            errors.append(ConfigError(where, str(exc)))
    return value


def _load(file: Path, raw: dict[str, Any], registry: Registry, plugin_errors: dict[str, str]) -> Config:
    errors: list[ConfigError] = []

    def section(cls: type[_T], table: dict[str, Any], where: str) -> _T | None:
        try:
            return build_model(cls, table, where)
        except ConfigErrors as exc:
            errors.extend(exc.errors)
            return None

    for key in raw:
        if key not in KNOWN_TOP:
            errors.append(ConfigError(key, f"unknown section (known: {', '.join(sorted(KNOWN_TOP))})"))
    daemon = section(DaemonSection, raw.get("daemon", {}), "daemon") or DaemonSection()
    bus = section(BusSection, raw.get("bus", {}), "bus") or BusSection()
    http = section(HttpSection, raw["http"], "http") if isinstance(raw.get("http"), dict) else None
    if "http" in raw and not isinstance(raw["http"], dict):
        errors.append(ConfigError("http", "expected a table"))
    sinks = _plugged(raw.get("sinks", {}), "sinks", registry.sinks, "sink", errors, plugin_errors, registry)
    connections = _plugged(raw.get("connections", {}), "connections", registry.connectors, "connector",
                           errors, plugin_errors, registry)
    observers = _plugged(raw.get("observers", {}), "observers", registry.observers, "observer", errors,
                         plugin_errors, registry)
    if not sinks and not any(e.path.startswith("sinks") for e in errors):
        errors.append(ConfigError("sinks", "no sink configured: add a [sinks.NAME] table"))
    sources: dict[str, SourceSection] = {}
    raw_sources = raw.get("sources", {})
    if not isinstance(raw_sources, dict):
        errors.append(ConfigError("sources", "expected a table of [sources.NAME] tables"))
        raw_sources = {}
    for name, table in raw_sources.items():
        where = f"sources.{name}"
        if not isinstance(table, dict):
            errors.append(ConfigError(where, "expected a table"))
            continue
        src = section(SourceSection, table, where)
        if src is None:
            continue
        _check_source(name, src, sinks, connections, raw.get("connections", {}), errors)
        sources[name] = src
    if errors:
        for e in errors:
            e.file = str(file)
        raise ConfigErrors([ConfigError(e.path, e.message, file=str(file)) for e in errors])
    return Config(file, daemon, bus, sinks, connections, sources, http, observers)


def _plugged(tables: Any, where: str, types: ReadOnlyMap[str, type[Connector] | type[Sink] | type[Observer]], what: str,
             errors: list[ConfigError], plugin_errors: dict[str, str], registry: Registry) -> dict[str, Plugged]:
    out: dict[str, Plugged] = {}
    if not isinstance(tables, dict):
        errors.append(ConfigError(where, f"expected a table of [{where}.NAME] tables"))
        return out
    for name, table in tables.items():
        path = f"{where}.{name}"
        if not isinstance(table, dict):
            errors.append(ConfigError(path, "expected a table"))
            continue
        kind = table.get("type")
        if not isinstance(kind, str):
            known = ", ".join(sorted(types)) or "none loaded"
            errors.append(ConfigError(f"{path}.type", f"missing: name the {what} type ({known})"))
            continue
        cls = types.get(kind)
        if cls is None:
            failed = "; ".join(f"plugin {p!r} failed to load: {err}" for p, err in plugin_errors.items())
            hint = f" ({failed})" if failed else ""
            errors.append(ConfigError(f"{path}.type", f"unknown {what} type {kind!r}; available: "
                                      f"{', '.join(sorted(types)) or 'none'}{hint}"))
            continue
        rest = {k: v for k, v in table.items() if k != "type"}
        try:
            model: Any = build_model(cls.config_model, rest, path)
        except ConfigErrors as exc:
            errors.extend(exc.errors)
            continue
        try:
            derived = [v for v in cls.secret_values(model) if isinstance(v, str)]
        except Exception as exc:  # a plugin's reading of its key file: say which table, go on
            errors.append(ConfigError(path, f"the {what} could not read its secrets: {type(exc).__name__}: {exc}"))
            continue
        out[name] = Plugged(kind, model, derived)
    return out


def _check_source(name: str, src: SourceSection, sinks: dict[str, Plugged], connections: dict[str, Plugged],
                  raw_connections: Any, errors: list[ConfigError]) -> None:
    where = f"sources.{name}"
    if src.connection not in connections and src.connection not in (raw_connections or {}):
        errors.append(ConfigError(f"{where}.connection", f"no [connections.{src.connection}] table"
                                  f" (defined: {', '.join(sorted(raw_connections or {})) or 'none'})"))
    if src.sink is not None and src.sink not in sinks:
        errors.append(ConfigError(f"{where}.sink", f"no [sinks.{src.sink}] table"))
    if src.sink is None and len(sinks) > 1:
        errors.append(ConfigError(f"{where}.sink", "several sinks are configured: name one"))
    if not src.schedule:
        errors.append(ConfigError(f"{where}.schedule", "give at least one cron expression"))
    for i, expr in enumerate(src.schedule):
        if (msg := validate_cron(expr)):
            errors.append(ConfigError(f"{where}.schedule[{i}]", msg))
    for i, expr in enumerate(src.recheck.schedule):
        if (msg := validate_cron(expr)):
            errors.append(ConfigError(f"{where}.recheck.schedule[{i}]", msg))
    if (msg := validate_timezone(src.timezone)):
        errors.append(ConfigError(f"{where}.timezone", msg))
    if src.lag_days < 0:
        errors.append(ConfigError(f"{where}.lag_days", "must not be negative"))
    if not 0 <= src.max_reject_pct <= 100:
        errors.append(ConfigError(f"{where}.max_reject_pct", "must be between 0 and 100"))
    if src.hold_drop_pct is not None and not 0 <= src.hold_drop_pct <= 100:
        errors.append(ConfigError(f"{where}.hold_drop_pct", "must be between 0 and 100"))
    if src.batch_rows is not None and src.batch_rows < 1:
        errors.append(ConfigError(f"{where}.batch_rows", "must be at least 1"))
    try:
        src.mapping.check(src.kind)
    except ConfigError as exc:
        errors.append(ConfigError(f"{where}.mapping.{exc.path}", exc.message))
    for key in SQL_KEYS:
        for mistake in placeholder_mistakes(getattr(src, key) or ""):
            errors.append(ConfigError(f"{where}.{key}", mistake))
    if not uses_placeholders(src.query) and not src.mapping.filter_column(src.kind)[0]:
        col = "timestamp" if src.kind == "events" else "date"
        errors.append(ConfigError(f"{where}.query", "has no {day}/{start}/{end} placeholder; use one, or map "
                                  f"mapping.{col} so the query can be filtered on it"))
    _check_slices(where, src, errors)
    if src.ready_query is not None and not uses_placeholders(src.ready_query):
        errors.append(ConfigError(f"{where}.ready_query", "must name the day with {day} or {start}/{end}"))



MAX_SLICES = 64


def _check_slices(where: str, src: SourceSection, errors: list[ConfigError]) -> None:
    """`slices` K > 1 fetches a day as K parts in K worker processes (kernel/slices.py): by
    sub-ranges of {start}/{end}, or by `MOD(slice_column, K)`."""
    if src.slices < 1:
        errors.append(ConfigError(f"{where}.slices", "must be at least 1"))
    elif src.slices > MAX_SLICES:
        errors.append(ConfigError(f"{where}.slices", f"must be at most {MAX_SLICES} (each slice is a worker "
                                  "process with a warehouse connection of its own)"))
    if src.slice_column is not None and not src.slice_column.strip():
        errors.append(ConfigError(f"{where}.slice_column", "must not be empty: name an integer column of the "
                                  "query's result"))
    if src.slices > 1 and src.slice_column is None:
        bounded = "{start}" in src.query and "{end}" in src.query
        column, kind = src.mapping.filter_column(src.kind)  # a query without placeholders is filtered on it
        filtered = not uses_placeholders(src.query) and bool(column) and kind == "timestamp"
        if not (bounded or filtered):
            errors.append(ConfigError(f"{where}.slices", "with slices > 1 the query must bound the day with both "
                                      "{start} and {end} (each slice gets a sub-range of them), or set "
                                      "slice_column to an integer column to slice by MOD(column, slices)"))
