"""Leases and claims: how replicas sharing a state store split the work without a leader.

- A partition lease (`leases`): before loading (source, day) a replica claims it in one upsert,
  which takes the row only when it is missing, expired, or already this replica's, and hands out a
  fencing token above both the partition's generation and any token handed out before. The commit
  of the load's generation checks, in its own transaction, that the lease is still this replica's
  with that token and unexpired (`check_fence`), so a replica that stalled past its lease cannot
  record a generation once another took the day over.
- A window claim (`windows.claimed_*`): one replica fires each due time of a source's load or
  re-check window; a claim that expires unfinished may be taken by another.
- A backfill-day claim (`backfill_days.claimed_*`): replicas take a backfill's pending days one at
  a time, oldest first.
- Heartbeats (`replicas`) say who is alive: a dead replica's unsent outbox rows are adopted by a
  live one (`adopt_outbox`), and its interrupted runs may be settled.

Expiries are computed and compared with the database's clock (`$NOW`), never a replica's. On
SQLite (one process holds the file) the same statements run, and always succeed for that process.
"""

from __future__ import annotations

import datetime as dt

from ...core import logs
from ...core.contracts import Fence
from ...core.errors import FencedOut
from .core import StoreCore, Tx
from .rows import ReplicaRow, replica

log = logs.get("ingestd.state")

CLAIM_PARTITION = """
INSERT INTO leases (source, day, replica, token, expires_at)
VALUES (?, ?, ?, COALESCE((SELECT generation FROM partitions WHERE source = ? AND day = ?), 0) + 1, $EXPIRES)
ON CONFLICT (source, day) DO UPDATE SET replica = excluded.replica, expires_at = excluded.expires_at,
    token = CASE WHEN leases.token + 1 > excluded.token THEN leases.token + 1 ELSE excluded.token END
WHERE leases.expires_at <= $NOW OR leases.replica = excluded.replica
RETURNING token"""

HOLDS_LEASE = """
SELECT 1 FROM leases WHERE source = ? AND day = ? AND replica = ? AND token = ? AND expires_at > $NOW$FOR_UPDATE"""

CLAIM_WINDOW = """
INSERT INTO windows (source, kind, last_at, claimed_by, claim_due, claim_expires) VALUES (?, ?, '', ?, ?, $EXPIRES)
ON CONFLICT (source, kind) DO UPDATE SET claimed_by = excluded.claimed_by, claim_due = excluded.claim_due,
    claim_expires = excluded.claim_expires
WHERE windows.last_at < excluded.claim_due
  AND (windows.claimed_by IS NULL OR windows.claim_due IS NULL OR windows.claim_due <> excluded.claim_due
       OR windows.claimed_by = excluded.claimed_by OR windows.claim_expires <= $NOW)
RETURNING claimed_by"""

CLAIMABLE_DAYS = """
SELECT source, day FROM backfill_days WHERE backfill_id = ? AND status = 'pending'
  AND (claimed_by IS NULL OR claim_expires <= $NOW)"""

CLAIM_BACKFILL_DAY = """
UPDATE backfill_days SET claimed_by = ?, claim_expires = $EXPIRES
WHERE backfill_id = ? AND (source, day) IN (""" + CLAIMABLE_DAYS + """ ORDER BY day, source LIMIT 1$SKIP_LOCKED)
RETURNING source, day"""

LIVE = "SELECT replica FROM replicas WHERE seen_at > $AGO"


def utc_iso(t: dt.datetime) -> str:
    """A window's time as text that orders as time does (UTC, one format)."""
    return (t.astimezone(dt.UTC) if t.tzinfo else t.replace(tzinfo=dt.UTC)).isoformat()


class Leases(StoreCore):
    # -- replicas -------------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Say this replica is alive (its `replicas` row, `seen_at` now by the database's clock)."""
        async with self.transaction() as tx:
            await tx.db.execute(
                "INSERT INTO replicas (replica, host, pid, started_at, seen_at) VALUES (?, ?, ?, $NOW, $NOW)"
                " ON CONFLICT (replica) DO UPDATE SET seen_at = excluded.seen_at,"
                " started_at = CASE WHEN replicas.pid = excluded.pid AND replicas.host = excluded.host"
                " THEN replicas.started_at ELSE excluded.started_at END,"
                " host = excluded.host, pid = excluded.pid", (self.replica, self.host, self.pid))

    async def forget_replicas(self, unseen_seconds: float) -> int:
        """Drop the rows of replicas not seen for `unseen_seconds`; returns how many."""
        async with self.transaction() as tx:
            done = await tx.db.execute("DELETE FROM replicas WHERE seen_at <= $AGO", (float(unseen_seconds),))
        return done.rowcount

    async def live_replicas(self) -> list[ReplicaRow]:
        """Replicas whose last heartbeat is younger than `lease_seconds`."""
        rows = await self._all(f"SELECT * FROM replicas WHERE replica IN ({LIVE}) ORDER BY replica",
                               (self.lease_seconds,))
        return [replica(r) for r in rows]

    # -- partition leases -------------------------------------------------------------------------

    async def claim_partition(self, source: str, day: dt.date, lease_seconds: float | None = None) -> int | None:
        """Take the lease on (source, day) for `lease_seconds` and return its new fencing token;
        None while another replica holds a live lease on it. Asked again by its holder, it hands
        out a new token (what the old one guarded is fenced out): renew with `renew_partition`."""
        async with self.transaction() as tx:
            d = day.isoformat()
            row = (await tx.db.execute(CLAIM_PARTITION, (source, d, self.replica, source, d,
                                                         self._seconds(lease_seconds)))).fetchone()
        token = int(row[0]) if row is not None else None
        log.debug("state.lease_claimed" if token else "state.lease_busy", source=source, day=d, token=token,
                  replica=self.replica)
        return token

    async def renew_partition(self, source: str, day: dt.date, token: int, lease_seconds: float | None = None) -> bool:
        """Extend this replica's live lease; False when it expired or was taken over."""
        async with self.transaction() as tx:
            done = await tx.db.execute(
                "UPDATE leases SET expires_at = $EXPIRES WHERE source = ? AND day = ? AND replica = ? AND token = ?"
                " AND expires_at > $NOW", (self._seconds(lease_seconds), source, day.isoformat(), self.replica, token))
        if done.rowcount != 1:
            log.warning("state.lease_lost", source=source, day=day.isoformat(), token=token, replica=self.replica)
        return done.rowcount == 1

    async def release_partition(self, source: str, day: dt.date, token: int) -> None:
        """Give the lease up (it expires now; its token stays, so the next one is higher)."""
        async with self.transaction() as tx:
            await tx.db.execute("UPDATE leases SET expires_at = $NOW WHERE source = ? AND day = ? AND replica = ?"
                                " AND token = ?", (source, day.isoformat(), self.replica, token))

    def fence(self, source: str, day: dt.date, token: int) -> Fence | None:
        """What a sink writing into this PostgreSQL database checks in its swap transaction
        (`ingestd.Fence`); None for SQLite, whose sink cannot share its transaction."""
        schema = getattr(self.backend, "schema", None)
        if not self.shared or schema is None:
            return None
        return Fence(token=token, replica=self.replica, store_id=self.store_id, schema=schema,
                     check_sql=f"SELECT 1 FROM {schema}.leases WHERE source = $1::text AND day = $2::text"
                               " AND replica = $3::text AND token = $4::bigint AND expires_at > now() FOR UPDATE",
                     params=(source, day.isoformat(), self.replica, token))

    async def check_fence(self, tx: Tx, source: str, day: str, token: int) -> None:
        """Inside `tx`, before it writes: raise `FencedOut` (rolling it all back) unless this
        replica still holds (source, day) with `token`, unexpired. On PostgreSQL the lease row is
        locked until the commit, so it cannot be taken over in between."""
        held = (await tx.db.execute(HOLDS_LEASE, (source, day, self.replica, token))).fetchone()
        if held is None:
            log.warning("state.fenced_out", source=source, day=day, token=token, replica=self.replica)
            raise FencedOut(f"{source} {day}: the lease with token {token} is no longer {self.replica}'s "
                            "(it expired or another replica took the day over); nothing was recorded")

    # -- windows --------------------------------------------------------------------------------

    async def claim_window(self, source: str, kind: str, due_at: dt.datetime,
                           lease_seconds: float | None = None) -> bool:
        """Whether this replica fires the window of `kind` due at `due_at`: true for one replica
        (again for it, if it asks again), until `mark_window` records it done; a claim that expires
        unfinished may be taken by another."""
        async with self.transaction() as tx:
            row = (await tx.db.execute(CLAIM_WINDOW, (source, kind, self.replica, utc_iso(due_at),
                                                      self._seconds(lease_seconds)))).fetchone()
        return row is not None

    async def renew_window(self, source: str, kind: str, due_at: dt.datetime,
                           lease_seconds: float | None = None) -> bool:
        """Extend this replica's unexpired claim of a window while it runs; False when it lapsed."""
        async with self.transaction() as tx:
            done = await tx.db.execute(
                "UPDATE windows SET claim_expires = $EXPIRES WHERE source = ? AND kind = ? AND claimed_by = ?"
                " AND claim_due = ? AND claim_expires > $NOW",
                (self._seconds(lease_seconds), source, kind, self.replica, utc_iso(due_at)))
        return done.rowcount == 1

    # -- backfill days --------------------------------------------------------------------------

    async def renew_backfill_day(self, backfill_id: int, source: str, day: dt.date,
                                 lease_seconds: float | None = None) -> bool:
        """Extend this replica's unexpired claim of a backfill day while it loads; False when it
        lapsed (another replica may take the day; its load is leased, so never concurrent)."""
        async with self.transaction() as tx:
            done = await tx.db.execute(
                "UPDATE backfill_days SET claim_expires = $EXPIRES WHERE backfill_id = ? AND source = ? AND day = ?"
                " AND claimed_by = ? AND status = 'pending' AND claim_expires > $NOW",
                (self._seconds(lease_seconds), backfill_id, source, day.isoformat(), self.replica))
        return done.rowcount == 1

    async def claim_backfill_day(self, backfill_id: int,
                                 lease_seconds: float | None = None) -> tuple[str, dt.date] | None:
        """The oldest pending day of a backfill no live claim holds, claimed for this replica;
        None when there is none."""
        for _ in range(5):
            async with self.transaction() as tx:
                row = (await tx.db.execute(CLAIM_BACKFILL_DAY, (self.replica, self._seconds(lease_seconds),
                                                                backfill_id, backfill_id))).fetchone()
            if row is not None:
                return row["source"], dt.date.fromisoformat(row["day"])
            # PostgreSQL: the day picked may have been claimed by another between the pick and the
            # lock (the pick is then empty); look again while claimable days are left.
            if not await self._all(CLAIMABLE_DAYS + " LIMIT 1", (backfill_id,)):
                return None
        return None

    # -- outbox ---------------------------------------------------------------------------------

    async def adopt_outbox(self, dead_after_seconds: float) -> int:
        """Make this replica the owner of the unsent outbox rows of replicas not seen for
        `dead_after_seconds`; returns how many. Adopters take turns (an advisory lock on
        PostgreSQL, the writer lock on SQLite), so each row is adopted once."""
        await self.heartbeat()
        async with self.transaction() as tx:
            if self.shared:
                await tx.db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", ("ingestd.outbox.adopt",))
            done = await tx.db.execute(
                f"UPDATE outbox SET replica = ? WHERE replica IS NULL OR (replica <> ? AND replica NOT IN ({LIVE}))",
                (self.replica, self.replica, float(dead_after_seconds)))
        if done.rowcount:
            log.info("state.outbox_adopted", rows=done.rowcount, replica=self.replica)
        return done.rowcount

    def _seconds(self, lease_seconds: float | None) -> float:
        return float(self.lease_seconds if lease_seconds is None else lease_seconds)
