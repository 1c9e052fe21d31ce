"""One scrubber for every exit: each configured secret's value becomes `***`.

The config registers its secrets when it is read (`Config.secrets()`: every `Secret` field of
the daemon's, the bus's and each plugin's config, plus what a plugin derives from a structured
secret such as a key file, through `Connector.secret_values`/`Sink.secret_values`). Everything
that leaves the process goes through `scrub`: log lines, CLI output, MQTT events, retained states
and answers, HTTP answers, and every text the state store writes (error texts, reject samples,
outbox payloads), so a state file copied into a bug report carries no secret either.

Values shorter than `MIN_LENGTH` characters are not scrubbed by value: replacing "ab" everywhere
would mangle every text and hide nothing. Such a value is refused inline in daemon.toml (see
`ingestd.core.models`); given by `_env` or `_file` it is used, and the README says it cannot be
scrubbed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

MIN_LENGTH = 4
MASK = "***"


class Scrubber:
    def __init__(self) -> None:
        self._values: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add(self, values: Iterable[str]) -> None:
        """Scrub these values too (longest first, so a secret containing another is masked whole)."""
        with self._lock:
            merged = set(self._values) | {v for v in values if isinstance(v, str) and len(v) >= MIN_LENGTH}
            self._values = tuple(sorted(merged, key=len, reverse=True))

    def clear(self) -> None:
        with self._lock:
            self._values = ()

    def __bool__(self) -> bool:
        return bool(self._values)

    def text(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        return text

    def value(self, obj: Any) -> Any:
        """`obj` with every string in it scrubbed (dicts, lists and tuples walked; keys too)."""
        if not self._values:
            return obj
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, dict):
            return {self.value(k): self.value(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.value(v) for v in obj) if isinstance(obj, tuple) else [self.value(v) for v in obj]
        if isinstance(obj, bytes):
            try:
                return self.text(obj.decode("utf-8")).encode("utf-8")
            except UnicodeDecodeError:
                return obj
        return obj


SECRETS = Scrubber()
"""The process's scrubber: one per process, as the secrets are the config's."""


def register(values: Iterable[str]) -> None:
    SECRETS.add(values)


def scrub(text: str) -> str:
    return SECRETS.text(text)


def scrub_value(obj: Any) -> Any:
    return SECRETS.value(obj)


def pem_lines(text: str) -> list[str]:
    """The body lines of PEM blocks (a private key's base64 lines), each a secret of its own, so
    a fragment of a key in an error text is masked too."""
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.startswith("-----") and len(line.strip()) >= 16]
