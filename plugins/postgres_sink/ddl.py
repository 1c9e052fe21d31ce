"""The sink's tables and views in its PostgreSQL schema, and the statements that read and swap them.

Layout (named as in the DuckDB sink, so analysts' queries carry over):

- `events_data`, `metrics_data`: the rows of each partition's visible generation, and only those
  (a replace deletes the old rows and inserts the new ones in the transaction that switches the
  generation, so under MVCC every other session sees one whole generation).
- `partitions(kind, source, day, generation, rows, loaded_at)`, primary key (kind, source, day):
  the visible generation of each partition and its row count, so `read_generation` is one
  indexed read.
- views `events`, `metrics`: the data tables, under the names analysts query.

All identifiers are fixed here but the schema, which config validation keeps to a plain
identifier and which is quoted everywhere anyway.
"""

from __future__ import annotations

from ingestd import EVENTS_SCHEMA, METRICS_SCHEMA, Kind, SinkError, quote_ident

DATA_TABLES: dict[str, str] = {"events": "events_data", "metrics": "metrics_data"}
SCHEMAS = {"events": EVENTS_SCHEMA, "metrics": METRICS_SCHEMA}
STAGE = "ingestd_stage"
"""The staging table of a replace: a TEMP table (ON COMMIT DROP) of the replacing session, so a
crash leaves none behind and concurrent replaces never share one."""

_COLUMNS = {
    "events": """source text NOT NULL, day date NOT NULL, "timestamp" timestamptz, event_name text,
        event_value text, unit_id text, id_type text, ids text, metadata text, generation bigint NOT NULL,
        ingested_at timestamptz""",
    "metrics": """source text NOT NULL, day date NOT NULL, unit_id text, id_type text, metric_name text,
        metric_value double precision, numerator double precision, denominator double precision,
        generation bigint NOT NULL, ingested_at timestamptz""",
}


def data_table(kind: str) -> str:
    try:
        return DATA_TABLES[kind]
    except KeyError:
        raise SinkError(f"unknown kind {kind!r}: expected one of {', '.join(DATA_TABLES)}") from None


def names(kind: Kind) -> str:
    """The canonical columns of `kind`, quoted, in order."""
    return ", ".join(quote_ident(n) for n in SCHEMAS[kind].names)


def setup_statements(schema: str) -> list[str]:
    """Idempotent DDL creating everything the sink uses; run under `setup_lock_key(schema)`."""
    s = quote_ident(schema)
    out = [f"CREATE SCHEMA IF NOT EXISTS {s}"]
    for kind, table in DATA_TABLES.items():
        out.append(f"CREATE TABLE IF NOT EXISTS {s}.{table} ({_COLUMNS[kind]})")
        out.append(f"CREATE INDEX IF NOT EXISTS {table}_partition ON {s}.{table} (source, day)")
    out.append(f"""CREATE TABLE IF NOT EXISTS {s}.partitions (
        kind text NOT NULL, source text NOT NULL, day date NOT NULL, generation bigint NOT NULL,
        rows bigint NOT NULL, loaded_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (kind, source, day))""")
    for kind, table in DATA_TABLES.items():
        out.append(f"CREATE OR REPLACE VIEW {s}.{kind} AS SELECT * FROM {s}.{table}")
    return out


def expected_relations(schema: str) -> list[str]:
    """What `open()` checks for before it runs any DDL: a role that may use but not create the
    schema (set up once by an administrator) then opens without CREATE privileges."""
    return [f"{quote_ident(schema)}.{name}" for name in (*DATA_TABLES.values(), "partitions", *DATA_TABLES)]


PARTITIONS_COLUMNS = frozenset({"kind", "source", "day", "generation", "rows", "loaded_at"})
"""The columns that tell the sink's `partitions` table from another one of that name (the
PostgreSQL state store has one too, in its own schema: `ingestd` by default)."""


def setup_lock_key(schema: str) -> str:
    """Text hashed into the advisory lock that serialises concurrent opens of one schema (CREATE ...
    IF NOT EXISTS alone races: two sessions may both find a table missing)."""
    return f"ingestd.postgres_sink.setup:{schema}"


def partition_lock_key(schema: str, kind: str, source: str, day: object) -> str:
    """Text hashed into the transaction-scoped advisory lock a swap takes on its partition, so two
    replaces of one partition (two processes) never both delete the old rows and insert theirs."""
    return f"ingestd.postgres_sink.partition:{schema}:{kind}:{day}:{source}"


def stage_statement(schema: str, kind: str) -> str:
    return (f"CREATE TEMP TABLE {STAGE} (LIKE {quote_ident(schema)}.{data_table(kind)}) ON COMMIT DROP")
