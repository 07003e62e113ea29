"""Forgetting the records kept beside jobs: a schedule's fired ticks and finished batches
are kept as long as the succeeded jobs they may have made, and pruned with them, a slice
per transaction."""

from __future__ import annotations

from taskd.store.core.dialect import Tx
from taskd.store.core.jobs import PRUNE_SLICE
from taskd.store.core.statements import Statement, Steps

# Each table pruned beside the jobs: its key's columns, and the time after which a row may go.
RECORDS = {
    "schedule_ticks": ("schedule, tick", "fired_at"),
    "batches": ("id", "finished_at"),
}


def prune_records(tx: Tx, slices: list[tuple[str, float]]) -> Steps[list[int]]:
    """Delete up to PRUNE_SLICE rows of a table of RECORDS dated more than `age` ago."""
    counts = []
    for table, age in slices:
        key, stamp = RECORDS[table]
        rows = yield Statement(
            f"DELETE FROM {{s}}.{table} WHERE ({key}) IN (SELECT {key} FROM {{s}}.{table}"
            f" WHERE {stamp} < :now - :age LIMIT :slice) RETURNING {stamp}",
            {"age": age, "slice": PRUNE_SLICE},
        )
        counts.append(len(rows))
    return counts
