"""One replace as one PostgreSQL transaction on one ADBC connection (blocking; run it on the
replace's own `ThreadSession` thread).

    begin  -> CREATE TEMP TABLE ingestd_stage (LIKE <data table>) ON COMMIT DROP
    stage  -> Arrow chunks bulk-loaded into it with ADBC (COPY ... FORMAT binary), one per chunk
    swap   -> advisory lock on the partition; the fence check; DELETE the day's rows; INSERT the
              staged rows with the target's generation; upsert the partitions row; COMMIT

Nothing is visible to other sessions before the COMMIT, and all of it is at the COMMIT (MVCC), so
readers see the previous generation or the new one. A failure or a crash at any point before it
rolls everything back on the server, staging table included: there is nothing to clean up after.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ingestd import FencedOut, SinkError, Target, quote_ident

from . import ddl


class FenceProbe:
    """Whether this sink's database is the state store a fence belongs to: its `<schema>.meta`
    row `store_id` equals the fence's. Asked once per state-store schema and remembered for the
    sink's life (the answer only changes if someone moves the database under the daemon)."""

    def __init__(self) -> None:
        self._store_ids: dict[str, str | None] = {}

    def known(self, schema: str) -> bool:
        return schema in self._store_ids

    def same_store(self, schema: str, store_id: str) -> bool:
        return self._store_ids.get(schema) == store_id

    def learn(self, cursor: Any, schema: str) -> None:
        """Reads the store id on `cursor`'s connection, outside any swap: a missing table is not
        an error that may abort the swap's transaction."""
        meta = f"{quote_ident(schema)}.meta"
        cursor.execute("SELECT to_regclass($1) IS NOT NULL", (meta,))
        exists = bool(cursor.fetchall()[0][0])
        store_id = None
        if exists:
            cursor.execute(f"SELECT value FROM {meta} WHERE key = 'store_id'")
            rows = cursor.fetchall()
            store_id = str(rows[0][0]) if rows else None
        self._store_ids[schema] = store_id


class Swap:
    """A replace of `target` in progress on `con` (an ADBC DB-API connection, autocommit off)."""

    def __init__(self, con: Any, schema: str, target: Target, fences: FenceProbe):
        self.con = con
        self.cursor = con.cursor()
        self.schema = schema
        self.target = target
        self.fences = fences
        self.table = ddl.data_table(target.kind)
        self.staged = 0

    def begin(self) -> None:
        fence = self.target.fence
        if fence is not None and not self.fences.known(fence.schema):
            self.fences.learn(self.cursor, fence.schema)
            self.con.commit()
        self.cursor.execute(ddl.stage_statement(self.schema, self.target.kind))

    def stage(self, chunk: list[pa.RecordBatch]) -> int:
        """Bulk-loads one chunk (Arrow batches of the canonical schema) into the staging table."""
        table = pa.Table.from_batches(chunk)
        self.cursor.adbc_ingest(ddl.STAGE, table, mode="append", temporary=True)
        self.staged += table.num_rows
        return int(table.num_rows)

    def commit(self) -> None:
        """Switches the partition to the staged rows and commits, or raises (and rolls back)."""
        t, s, cur = self.target, quote_ident(self.schema), self.cursor
        cur.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                    (ddl.partition_lock_key(self.schema, t.kind, t.source, t.day),))
        cur.fetchall()
        self._check_fence()
        cur.execute(f"SELECT generation FROM {s}.partitions WHERE kind = $1 AND source = $2 AND day = $3",
                    (t.kind, t.source, t.day))
        visible = cur.fetchall()
        if visible and visible[0][0] == t.generation:
            raise SinkError(f"generation {t.generation} of {t.kind} {t.source} {t.day} is already visible: "
                            "a replace must write a new generation")
        cur.execute(f"DELETE FROM {s}.{self.table} WHERE source = $1 AND day = $2", (t.source, t.day))
        names = ddl.names(t.kind)
        select = ", ".join("$1::bigint" if n == "generation" else quote_ident(n) for n in ddl.SCHEMAS[t.kind].names)
        cur.execute(f"INSERT INTO {s}.{self.table} ({names}) SELECT {select} FROM {ddl.STAGE}", (t.generation,))
        cur.execute(f"""INSERT INTO {s}.partitions (kind, source, day, generation, rows, loaded_at)
                        VALUES ($1, $2, $3, $4, $5, now())
                        ON CONFLICT (kind, source, day) DO UPDATE
                        SET generation = EXCLUDED.generation, rows = EXCLUDED.rows, loaded_at = EXCLUDED.loaded_at""",
                    (t.kind, t.source, t.day, t.generation, self.staged))
        self.con.commit()

    def _check_fence(self) -> None:
        """Runs the lease check in this transaction when the fence is this database's (see
        `ingestd.Fence`): it locks the lease row until the commit, so the lease cannot be taken
        over between the check and the rows becoming visible."""
        fence = self.target.fence
        if fence is None or not self.fences.same_store(fence.schema, fence.store_id):
            return
        self.cursor.execute(fence.check_sql, tuple(fence.params))
        if not self.cursor.fetchall():
            t = self.target
            raise FencedOut(f"replica {fence.replica} lost its lease on {t.source} {t.day} (fencing token "
                            f"{fence.token}): generation {t.generation} of {t.kind} was not made visible")

    def rollback(self) -> None:
        self.con.rollback()

    def close(self) -> None:
        self.cursor.close()

