"""Config models: plain dataclasses, validated from TOML tables with key-path errors.

A plugin declares its config as a dataclass. `build_model(cls, table, path)` checks every key
against the field types (str, int, float, bool, date, lists, dicts, Literal, Optional, nested
dataclasses, `Secret`) and raises `ConfigErrors` naming each bad key, e.g.
`connections.wh.port: expected an integer, got 'abc'`. Unknown keys are errors too.

A `Secret` field `password` is given in TOML as one of `password = "..."`,
`password_env = "VAR"` or `password_file = "/path"`; `${CREDENTIALS_DIRECTORY}` and `~` are
expanded in the file path (systemd's LoadCredential=). The value prints as `***`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime as dt
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from .errors import ConfigError, ConfigErrors
from .secrets import MIN_LENGTH

T = TypeVar("T")

BASE_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("ingestd_config_dir", default=None)
"""The config file's folder while a config is read: relative `Path` fields and secret files
are taken from there."""


class Secret:
    """A secret value: `str()` and `repr()` show `***`; `reveal()` gives the value."""

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str = "inline"):
        self._value = value
        self.origin = origin

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = lambda self: "***"  # noqa: E731

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


ENV_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
"""`${VAR}`, `${VAR:-default}`, and `$$` for a literal `$`. A bare `$VAR` is left as it is."""


class UnsetVariable(ValueError):
    def __init__(self, name: str):
        hint = " (systemd sets it with LoadCredential=)" if name == "CREDENTIALS_DIRECTORY" else ""
        super().__init__(f"environment variable {name} is not set{hint}; give it a value, or a default "
                         f"with ${{{name}:-default}}")
        self.name = name


def expand_env(text: str) -> str:
    """`text` with its `${VAR}` references replaced; raises `UnsetVariable` for an unset one."""
    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is None or (found == "" and default is not None):
            if default is None:
                raise UnsetVariable(name)
            return default
        return found

    return ENV_REFERENCE.sub(value, text)


def _expand_path(raw: str) -> str:
    path = Path(os.path.expanduser(expand_env(raw)))
    base = BASE_DIR.get()
    return str(path if path.is_absolute() or base is None else base / path)


def _resolve_secret(name: str, table: dict[str, Any], path: str, errors: list[ConfigError]) -> Secret | None:
    given = [k for k in (name, f"{name}_env", f"{name}_file") if k in table]
    if len(given) > 1:
        errors.append(ConfigError(f"{path}.{given[1]}", f"give only one of {', '.join(given)}"))
        return None
    if not given:
        return None
    key = given[0]
    raw = table[key]
    where = f"{path}.{key}"
    if not isinstance(raw, str) or not raw:
        errors.append(ConfigError(where, f"expected a non-empty string, got {_show(raw)}"))
        return None
    if key == name:
        if len(raw) < MIN_LENGTH:
            errors.append(ConfigError(where, f"an inline secret must be at least {MIN_LENGTH} characters: a shorter "
                                      f"value cannot be scrubbed from logs and output; give it with {name}_env "
                                      f"or {name}_file"))
            return None
        return Secret(raw, "inline")
    if key.endswith("_env"):
        value = os.environ.get(raw)
        if value is None:
            errors.append(ConfigError(where, f"environment variable {raw} is not set"))
            return None
        return Secret(value, f"env:{raw}")
    try:
        file = _expand_path(raw)
    except UnsetVariable as exc:
        errors.append(ConfigError(where, str(exc)))
        return None
    try:
        value = Path(file).read_text().rstrip("\r\n")
    except OSError as exc:
        errors.append(ConfigError(where, f"cannot read secret file {file}: {exc.strerror or exc}"))
        return None
    return Secret(value, f"file:{file}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_WORDS = {Path: "a path", str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dt.date: "a date (YYYY-MM-DD)"}


def _convert(tp: Any, value: Any, path: str, errors: list[ConfigError]) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _convert(args[0], value, path, errors)
        for arg in args:
            trial: list[ConfigError] = []
            out = _convert(arg, value, path, trial)
            if not trial:
                return out
        errors.append(ConfigError(path, f"expected one of {', '.join(_word(a) for a in args)}, got {_show(value)}"))
        return None
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            errors.append(ConfigError(path, f"expected one of {', '.join(repr(c) for c in choices)}, "
                                            f"got {_show(value)}"))
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            errors.append(ConfigError(path, f"expected a list, got {_show(value)}"))
            return []
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_convert(item_tp, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(ConfigError(path, f"expected a table, got {_show(value)}"))
            return {}
        _, val_tp = get_args(tp) or (str, Any)
        return {k: _convert(val_tp, v, f"{path}.{k}", errors) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(ConfigError(path, f"expected a table, got {_show(value)}"))
            return None
        return _build(tp, value, path, errors)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(ConfigError(path, f"expected true or false, got {_show(value)}"))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(ConfigError(path, f"expected an integer, got {_show(value)}"))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(ConfigError(path, f"expected a number, got {_show(value)}"))
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(ConfigError(path, f"expected a string, got {_show(value)}"))
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            errors.append(ConfigError(path, f"expected a path (a non-empty string), got {_show(value)}"))
            return None
        try:
            return Path(_expand_path(value))
        except UnsetVariable as exc:
            errors.append(ConfigError(path, str(exc)))
            return None
    if tp is dt.date:
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            return value
        try:
            return dt.date.fromisoformat(str(value))
        except ValueError:
            errors.append(ConfigError(path, f"expected a date (YYYY-MM-DD), got {_show(value)}"))
            return None
    return value


def _word(tp: Any) -> str:
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def _build(cls: type[T], table: dict[str, Any], path: str, errors: list[ConfigError]) -> T | None:
    hints = get_type_hints(cls)
    # cls is any dataclass (fields() raises TypeError otherwise); typeshed wants the protocol type
    fields = {f.name: f for f in dataclasses.fields(typing.cast(Any, cls)) if f.init}
    secret_keys: set[str] = set()
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        tp = hints[name]
        is_secret = tp is Secret or Secret in get_args(tp)
        if is_secret:
            secret_keys |= {name, f"{name}_env", f"{name}_file"}
            secret = _resolve_secret(name, table, path, errors)
            if secret is not None:
                kwargs[name] = secret
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if not any(k in table for k in (name, f"{name}_env", f"{name}_file")):
                    errors.append(ConfigError(f"{path}.{name}", f"missing: give {name}_env, {name}_file or {name}"))
            continue
        if name in table:
            kwargs[name] = _convert(tp, table[name], f"{path}.{name}", errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(ConfigError(f"{path}.{name}", f"missing: expected {_word(tp)}"))
    for key in table:
        if key not in fields and key not in secret_keys:
            known = ", ".join(sorted(set(fields) | secret_keys))
            errors.append(ConfigError(f"{path}.{key}", f"unknown key (known keys: {known})"))
    if errors:
        return None
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        errors.append(ConfigError(path, str(exc)))
        return None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            errors.append(ConfigError(f"{path}.{exc.path}" if exc.path else path, exc.message))
        except ValueError as exc:
            errors.append(ConfigError(path, str(exc)))
    return obj


def build_model(cls: type[T], table: dict[str, Any], path: str) -> T:
    """Build dataclass `cls` from a TOML table; raise ConfigErrors naming every bad key."""
    errors: list[ConfigError] = []
    obj = _build(cls, table, path, errors)
    if errors:
        raise ConfigErrors(errors)
    assert obj is not None  # _build returns None only after recording an error
    return obj


def redact(obj: Any) -> Any:
    """A JSON-safe view of a config object with every Secret shown as `***`."""
    if isinstance(obj, Secret):
        return "***"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: redact(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, (dt.date, Path)):
        return str(obj)
    return obj


def secret_values(obj: Any) -> list[str]:
    """Every revealed secret inside a config object (for log scrubbing and tests)."""
    out: list[str] = []
    if isinstance(obj, Secret):
        out.append(obj.reveal())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            out += secret_values(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            out += secret_values(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += secret_values(v)
    return out
