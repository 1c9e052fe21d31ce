"""The state store's tables, written once for both backends, and their migrations.

`$`-tokens in the DDL stand for what the two dialects spell differently (see `render`): an
auto-numbered key, and the type of a timestamp taken from the database's clock (lease and claim
expiries, heartbeats). Every other timestamp is ISO-8601 text written by ingestd, as in version 3.

Version 4 adds what replicas sharing one store need: `meta` (`schema_version`, and a `store_id`
written once, by which a sink recognises the store's database), `replicas` (heartbeats), `leases`
(one per partition being loaded: holder, fencing token, expiry), and the owner of runs and outbox
rows and the claims on windows and backfill days.
"""

from __future__ import annotations

SCHEMA_VERSION = 4

RESULT_SCHEMAS = """
CREATE TABLE IF NOT EXISTS result_schemas (
    source TEXT PRIMARY KEY, columns TEXT NOT NULL, query_hash TEXT NOT NULL, day TEXT NOT NULL,
    run_id TEXT, stored_at TEXT NOT NULL, seen TEXT, change TEXT, changed_at TEXT
)"""
"""Schema drift (version 3): per source, the query's result columns (`[{name, type, family}]`) as
its last successful load saw them, with the query text's hash and that load's day and run; `seen`,
a different schema a later load or probe saw (NULL once a load stores it); `change`, the last
change seen (what `schema.changed` said) and when."""

REPLICAS = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS replicas (
    replica TEXT PRIMARY KEY, host TEXT NOT NULL, pid BIGINT NOT NULL, started_at $TS NOT NULL, seen_at $TS NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    source TEXT NOT NULL, day TEXT NOT NULL, replica TEXT NOT NULL, token BIGINT NOT NULL, expires_at $TS NOT NULL,
    PRIMARY KEY (source, day)
)"""

SCHEMA = RESULT_SCHEMAS + ";" + REPLICAS + """;
CREATE TABLE IF NOT EXISTS partitions (
    source TEXT NOT NULL, day TEXT NOT NULL, status TEXT NOT NULL,
    generation BIGINT NOT NULL DEFAULT 0, rows BIGINT, source_rows BIGINT, fingerprint TEXT,
    loaded_at TEXT, checked_at TEXT, last_run_id TEXT, error TEXT, ready_at TEXT, held_rows BIGINT,
    PRIMARY KEY (source, day)
);
CREATE TABLE IF NOT EXISTS runs (
    $ROWID run_id TEXT PRIMARY KEY, source TEXT NOT NULL, day TEXT NOT NULL, trigger TEXT NOT NULL,
    status TEXT NOT NULL, reason TEXT, generation BIGINT,
    rows_fetched BIGINT, rows_written BIGINT, rows_rejected BIGINT, rejects TEXT,
    fingerprint TEXT, started_at TEXT NOT NULL, finished_at TEXT, duration_ms BIGINT,
    backfill_id BIGINT, pid BIGINT, first_load BIGINT, replica TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_partition ON runs (source, day);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
CREATE TABLE IF NOT EXISTS rejects (
    id $ID, run_id TEXT NOT NULL, source TEXT NOT NULL, day TEXT NOT NULL,
    reason TEXT NOT NULL, row TEXT NOT NULL, at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS backfills (
    id $ID, request_id TEXT UNIQUE, sources TEXT NOT NULL,
    day_from TEXT NOT NULL, day_to TEXT NOT NULL, status TEXT NOT NULL,
    origin TEXT, created_at TEXT NOT NULL, finished_at TEXT, missing BIGINT NOT NULL DEFAULT 0,
    skipped BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS backfill_days (
    backfill_id BIGINT NOT NULL, source TEXT NOT NULL, day TEXT NOT NULL,
    status TEXT NOT NULL, run_id TEXT, claimed_by TEXT, claim_expires $TS,
    PRIMARY KEY (backfill_id, source, day)
);
CREATE TABLE IF NOT EXISTS windows (
    source TEXT NOT NULL, kind TEXT NOT NULL, last_at TEXT NOT NULL,
    claimed_by TEXT, claim_due TEXT, claim_expires $TS,
    PRIMARY KEY (source, kind)
);
CREATE TABLE IF NOT EXISTS outbox (
    seq $SEQ, type TEXT NOT NULL, source TEXT,
    payload TEXT NOT NULL, created_at TEXT NOT NULL, replica TEXT
);
CREATE INDEX IF NOT EXISTS outbox_by_replica ON outbox (replica, seq);
DROP VIEW IF EXISTS usage;
CREATE VIEW usage AS
    SELECT source, day, trigger, CASE WHEN first_load = 1 THEN 'first' ELSE 'reload' END AS load,
           substr(finished_at, 1, 10) AS ran_on, SUM(rows_written) AS rows, COUNT(*) AS loads
    FROM runs WHERE status = 'succeeded' GROUP BY source, day, trigger, 4, 5;
"""
"""A new database of this version (an older one gets its MIGRATIONS first; CREATE ... IF NOT
EXISTS leaves its tables alone)."""

MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE partitions ADD COLUMN ready_at TEXT",
        "ALTER TABLE partitions ADD COLUMN held_rows INTEGER",
        "ALTER TABLE runs ADD COLUMN first_load INTEGER",
        "ALTER TABLE backfills ADD COLUMN missing INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE backfills ADD COLUMN skipped INTEGER NOT NULL DEFAULT 0"],
    3: [RESULT_SCHEMAS],
    4: ["ALTER TABLE runs ADD COLUMN replica TEXT",
        "ALTER TABLE outbox ADD COLUMN replica TEXT",
        "ALTER TABLE windows ADD COLUMN claimed_by TEXT",
        "ALTER TABLE windows ADD COLUMN claim_due TEXT",
        "ALTER TABLE windows ADD COLUMN claim_expires $TS",
        "ALTER TABLE backfill_days ADD COLUMN claimed_by TEXT",
        "ALTER TABLE backfill_days ADD COLUMN claim_expires $TS"],
}
"""Statements that bring a database of the version before up to this version. The PostgreSQL
store begins at version 4, so only SQLite files ever run the ones before."""

DDL_TOKENS = {
    "sqlite": {"$ID": "INTEGER PRIMARY KEY", "$SEQ": "INTEGER PRIMARY KEY AUTOINCREMENT", "$TS": "TEXT",
               "$ROWID": ""},
    # `runs.rowid`: SQLite's implicit insertion order, made explicit (a tie-break in run listings).
    "postgres": {"$ID": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                 "$SEQ": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "$TS": "TIMESTAMPTZ",
                 "$ROWID": "rowid BIGINT GENERATED BY DEFAULT AS IDENTITY UNIQUE,"},
}


def render(ddl: str, dialect: str) -> list[str]:
    """The statements of `ddl` in `dialect`, one per item."""
    for token, text in DDL_TOKENS[dialect].items():
        ddl = ddl.replace(token, text)
    return [s.strip() for s in ddl.split(";") if s.strip()]


def steps(version: int, fresh: bool, dialect: str) -> list[str]:
    """What brings a database of `version` (fresh: no tables yet) to SCHEMA_VERSION."""
    out: list[str] = []
    if not fresh:
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS.get(step, []):
                out += render(statement, dialect)
    return out + render(SCHEMA, dialect)
