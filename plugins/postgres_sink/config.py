"""`[sinks.NAME]` with `type = "postgres"`: the config model, and the connection strings made from it.

The password never sits in the URL: it comes from `password_env` / `password_file` (a `Secret`),
is passed to psycopg as a keyword and to ADBC (which takes one URI) percent-encoded into a URI
that is never logged or shown; `redact` scrubs it from any driver message that might echo it.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from ingestd import ConfigError, Secret

SCHEMES = ("postgresql", "postgres")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass
class PostgresSinkConfig:
    """`[sinks.NAME]` with `type = "postgres"`.

    `url`: `postgresql://user@host:port/dbname` without a password (libpq query parameters such as
    `application_name` may follow). `password`: the user's password, as `password_env` or
    `password_file` (none: libpq's own means, a `.pgpass` file or trust). `schema`: the PostgreSQL
    schema holding the tables and views (created when missing). `sslmode`: libpq's sslmode, unset
    to keep the URL's or libpq's default. `chunk_rows`: rows bulk-loaded per COPY into the staging
    table; it bounds the sink's memory. `connect_timeout_seconds`: how long a connection attempt
    may take before the load fails.
    """

    url: str
    password: Secret | None = None
    schema: str = "analytics"
    sslmode: str | None = None
    chunk_rows: int = 100_000
    connect_timeout_seconds: int = 10

    def validate(self) -> None:
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in SCHEMES:
            raise ConfigError("url", "expected a postgresql://user@host:port/dbname URL")
        if parsed.password is not None:
            # The URL is not echoed: it holds the very secret that must not be printed.
            raise ConfigError("url", "holds a password: remove it from the URL and give it with password_env "
                                     "or password_file")
        try:
            parsed.port  # noqa: B018  (raises ValueError for a port that is not a number)
        except ValueError:
            raise ConfigError("url", "the port is not a number") from None
        if "password" in dict(urllib.parse.parse_qsl(parsed.query)):
            raise ConfigError("url", "holds a password parameter: give it with password_env or password_file")
        if not IDENTIFIER.match(self.schema):
            raise ConfigError("schema", f"expected a plain PostgreSQL identifier (letters, digits, _), "
                                        f"got {self.schema!r}")
        if self.sslmode is not None and self.sslmode not in SSLMODES:
            raise ConfigError("sslmode", f"expected one of {', '.join(SSLMODES)}, got {self.sslmode!r}")
        if self.chunk_rows < 1:
            raise ConfigError("chunk_rows", f"expected at least 1, got {self.chunk_rows}")
        if self.connect_timeout_seconds < 1:
            raise ConfigError("connect_timeout_seconds", f"expected at least 1, got {self.connect_timeout_seconds}")

    # -- what the drivers are given ---------------------------------------------------------

    def where(self) -> str:
        """`host:port/dbname`, for messages (never the user's password)."""
        parsed = urllib.parse.urlsplit(self.url)
        host = parsed.hostname or "localhost"
        return f"{host}:{parsed.port or 5432}/{parsed.path.lstrip('/') or '(default database)'}"

    def psycopg_kwargs(self) -> dict[str, Any]:
        """Keywords for `psycopg.connect(self.url, **kwargs)`: the session runs in UTC."""
        kwargs: dict[str, Any] = {"connect_timeout": self.connect_timeout_seconds, "options": self._options()}
        if self.password is not None:
            kwargs["password"] = self.password.reveal()
        if self.sslmode is not None:
            kwargs["sslmode"] = self.sslmode
        return kwargs

    def adbc_uri(self) -> str:
        """The one URI ADBC takes: `url` with the password, sslmode and timeout put in. Secret."""
        parsed = urllib.parse.urlsplit(self.url)
        netloc = parsed.netloc
        if self.password is not None:
            user, _, hostport = netloc.rpartition("@")
            quoted = urllib.parse.quote(self.password.reveal(), safe="")
            netloc = f"{user}:{quoted}@{hostport}" if user else f":{quoted}@{hostport}"
        query = dict(urllib.parse.parse_qsl(parsed.query))
        query.setdefault("connect_timeout", str(self.connect_timeout_seconds))
        query["options"] = self._options()
        if self.sslmode is not None:
            query["sslmode"] = self.sslmode
        encoded = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)  # libpq reads + as a plus
        return urllib.parse.urlunsplit(("postgresql", netloc, parsed.path, encoded, ""))

    def _options(self) -> str:
        """libpq `options`: the URL's own, then the session's time zone (UTC: timestamps are read
        back as UTC whatever the server's default)."""
        given = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.url).query)).get("options", "")
        return f"{given} -c timezone=UTC".strip()

    def redact(self, text: str) -> str:
        """`text` with the password (as given and percent-encoded) masked."""
        if self.password is None:
            return text
        secret = self.password.reveal()
        for value in {secret, urllib.parse.quote(secret, safe="")}:
            if value:
                text = text.replace(value, "***")
        return text
