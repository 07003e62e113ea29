"""The nodes' writes: a worker registers, keeps its heartbeat and leases, and leaves."""

from __future__ import annotations

import os
import socket

from taskd.store.sqlite.jobs import Tx, fetch
from taskd.store.sqlite.schema import marks


def register(tx: Tx, items: list[tuple[str, float]]) -> list[str]:
    """Start a new worker (`node/N`) for each (node, ttl); the node's previous one is gone."""
    host, pid = socket.gethostname(), os.getpid()
    workers = []
    for node, ttl in items:
        rows = fetch(
            tx,
            "INSERT INTO nodes (id, worker, starts, host, pid, started_at, seen_at, expires)"
            " VALUES (:id, :id || '/1', 1, :host, :pid, :now, :now, :now + :ttl)"
            " ON CONFLICT (id) DO UPDATE SET starts = starts + 1,"
            " worker = id || '/' || (starts + 1), host = excluded.host, pid = excluded.pid,"
            " started_at = excluded.started_at, seen_at = excluded.seen_at,"
            " expires = excluded.expires"
            " RETURNING worker",
            {"id": node, "host": host, "pid": pid, "now": tx.now, "ttl": ttl},
        )
        workers.append(rows[0]["worker"])
    return workers


def leave(tx: Tx, workers: list[str]) -> list[None]:
    # The row stays, so that the node's next start gets the next number.
    tx.db.executemany("UPDATE nodes SET expires = NULL WHERE worker = ?", [(w,) for w in workers])
    return [None] * len(workers)


def renew(tx: Tx, items: list[tuple[str, list[int], float]]) -> list[list[int]]:
    """Extend each worker's heartbeat and leases; the job ids it no longer holds."""
    results = []
    for worker, job_ids, lease in items:
        alive = fetch(
            tx,
            "UPDATE nodes SET seen_at = ?, expires = ? WHERE worker = ? AND expires IS NOT NULL"
            " RETURNING id",
            (tx.now, tx.now + lease, worker),
        )
        held: set[int] = set()
        if alive and job_ids:
            rows = fetch(
                tx,
                "UPDATE jobs SET lease_expires = ? WHERE status = 'running' AND worker = ?"
                f" AND id IN ({marks(len(job_ids))}) RETURNING id",
                (tx.now + lease, worker, *job_ids),
            )
            held = {row["id"] for row in rows}
        results.append([job_id for job_id in job_ids if job_id not in held])
    return results
