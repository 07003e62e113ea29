"""The nodes' writes: a worker registers, keeps its heartbeat and leases, and leaves."""

from __future__ import annotations

import os
import socket

from taskd.store.postgres.tx import Tx

REGISTER_SQL = """
INSERT INTO {s}.nodes (id, worker, starts, host, pid, started_at, seen_at, expires)
VALUES ($1, $1 || '/1', 1, $2, $3, {s}.now(), {s}.now(), {s}.now() + $4)
ON CONFLICT (id) DO UPDATE SET starts = nodes.starts + 1,
    worker = nodes.id || '/' || (nodes.starts + 1), host = excluded.host, pid = excluded.pid,
    started_at = excluded.started_at, seen_at = excluded.seen_at, expires = excluded.expires,
    schedules = NULL
RETURNING worker
"""

RENEW_SQL = """
WITH alive AS (
    UPDATE {s}.nodes SET seen_at = {s}.now(), expires = {s}.now() + $3
    WHERE worker = $1 AND expires IS NOT NULL RETURNING id
)
UPDATE {s}.jobs SET lease_expires = {s}.now() + $3
WHERE status = 'running' AND worker = $1 AND id = ANY($2::bigint[])
  AND EXISTS (SELECT 1 FROM alive)
RETURNING id
"""


async def register(tx: Tx, items: list[tuple[str, float]]) -> list[str]:
    """Start a new worker (`node/N`) for each (node, ttl); the node's previous one is gone."""
    host, pid = socket.gethostname(), os.getpid()
    sql = REGISTER_SQL.format(s=tx.s)
    return [str(await tx.db.fetchval(sql, node, host, pid, ttl)) for node, ttl in items]


async def leave(tx: Tx, workers: list[str]) -> list[None]:
    # The row stays, so that the node's next start gets the next number.
    await tx.db.execute(
        f"UPDATE {tx.s}.nodes SET expires = NULL WHERE worker = ANY($1::text[])", workers
    )
    return [None] * len(workers)


async def renew(tx: Tx, items: list[tuple[str, list[int], float]]) -> list[list[int]]:
    """Extend each worker's heartbeat and leases; the job ids it no longer holds."""
    sql = RENEW_SQL.format(s=tx.s)
    results = []
    for worker, job_ids, lease in items:
        held = {row["id"] for row in await tx.fetch(sql, worker, job_ids, lease)}
        results.append([job_id for job_id in job_ids if job_id not in held])
    return results


async def announce_schedules(tx: Tx, items: list[tuple[str, str]]) -> list[None]:
    for worker, digest in items:
        await tx.db.execute(
            f"UPDATE {tx.s}.nodes SET schedules = $2 WHERE worker = $1", worker, digest
        )
    return [None] * len(items)
