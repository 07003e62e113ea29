"""What workflows cost, measured on a real taskd (SQLite unless --postgres URL).

    python -m tests.bench.workflows [--chain 200] [--batch 1000] [--postgres URL]

- A chain of N jobs (each `--after` the one before): the delay from a parent's end
  (`finished_at`) to its child's start (`started_at`), both the store's clock. A child is due
  in the transaction that records its parent's success, so nothing polls for it.
- A batch of M jobs with `on_finish`: the time from its last job's end to its callback's
  creation (the same transaction) and to the callback's start.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

from taskctl import Client, enqueue_params
from tests.backends import unique_schema
from tests.support import Taskd, wait_until


def chain(client: Client, length: int) -> list[float]:
    """The parent-end to child-start delays of a chain of `length` jobs, in seconds."""
    ids = [client.enqueue("echo", {"n": 0}, delay=1).job_id]  # all linked before it starts
    for n in range(1, length):
        ids.append(client.enqueue("echo", {"n": n}, after=[ids[-1]]).job_id)
    client.wait(ids[-1], timeout=120)
    jobs = [client.job(job_id) for job_id in ids]
    return [
        child.started_at - parent.finished_at
        for parent, child in itertools.pairwise(jobs)
        if child.started_at is not None and parent.finished_at is not None
    ]


def batch(client: Client, size: int) -> tuple[float, float]:
    """The seconds from a batch's last job's end to its callback's creation and start."""
    enqueued = client.enqueue_many(
        [enqueue_params("echo", {"n": n}) for n in range(size)], on_finish="echo"
    )
    assert enqueued.batch is not None
    info = wait_until(
        lambda: (b := client.batch(enqueued.batch or 0)).callback_id is not None and b,
        timeout=120,
    )
    callback = client.wait(info.callback_id, timeout=60)
    last = max(client.job(r.job_id).finished_at or 0.0 for r in enqueued)
    assert callback.started_at is not None
    return callback.created_at - last, callback.started_at - last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--postgres", metavar="URL")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tdw", dir="/tmp"))
    config = "workers = 8\n"
    if args.postgres:
        config += f'[postgres]\nschema = "{unique_schema()}"\n'
    daemon = Taskd(root, config=config, log_level="info")
    if args.postgres:
        daemon.database = args.postgres  # type: ignore[assignment]
    daemon.start()
    try:
        with daemon.client() as client:
            delays = sorted(chain(client, args.chain))
            created, started = batch(client, args.batch)
    finally:
        daemon.stop()
    store = "PostgreSQL" if args.postgres else "SQLite"
    p95 = delays[int(len(delays) * 0.95) - 1]
    print(f"{store}: chain of {args.chain}: parent end -> child start: median "
          f"{statistics.median(delays) * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms, "
          f"max {delays[-1] * 1000:.2f} ms")  # fmt: skip
    print(f"{store}: batch of {args.batch}: last job's end -> callback created "
          f"{created * 1000:.2f} ms, started {started * 1000:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
