"""The nodes' writes: a worker registers, keeps its heartbeat and leases, and leaves."""

from __future__ import annotations

import os
import socket

from taskd.store.core.dialect import Tx
from taskd.store.core.statements import Statement, Steps

# A node's next worker (`node/N`, N counting its starts); each dialect ends it.
REGISTER_SQL = """
INSERT INTO {s}.nodes (id, worker, starts, host, pid, started_at, seen_at, expires, slots)
VALUES (:id, :id || '/1', 1, :host, :pid, :now, :now, :now + :ttl, :slots)
ON CONFLICT (id) DO UPDATE SET starts = nodes.starts + 1,
    worker = nodes.id || '/' || (nodes.starts + 1), host = excluded.host, pid = excluded.pid,
    slots = excluded.slots,
    started_at = excluded.started_at, seen_at = excluded.seen_at, expires = excluded.expires"""


def register(tx: Tx, items: list[tuple[str, float, int]]) -> Steps[list[str]]:
    """Start a new worker (`node/N`) for each (node, ttl, slots); the node's previous one is
    gone."""
    host, pid = socket.gethostname(), os.getpid()
    workers = []
    for node, ttl, slots in items:
        parameters = {"id": node, "host": host, "pid": pid, "ttl": ttl, "slots": slots}
        rows = yield Statement(tx.sql.register_sql, parameters)
        workers.append(rows[0]["worker"])
    return workers


def leave(tx: Tx, workers: list[str]) -> Steps[list[None]]:
    # The row stays, so that the node's next start gets the next number.
    yield Statement(
        "UPDATE {s}.nodes SET expires = NULL WHERE worker = :worker",
        [{"worker": worker} for worker in workers],
        many=True,
    )
    return [None] * len(workers)


def renew(tx: Tx, items: list[tuple[str, list[int], float]]) -> Steps[list[list[int]]]:
    """Extend each worker's heartbeat and leases; the job ids it no longer holds."""
    results = []
    for worker, job_ids, lease in items:
        held = yield from tx.sql.renew(worker, job_ids, lease)
        results.append([job_id for job_id in job_ids if job_id not in held])
    return results
