"""`taskctl status` under load: it lists the jobs that run, never more than `workers`,
although the store also counts as running the jobs claimed ahead of a free slot and those
whose outcome is being written."""

from __future__ import annotations

import json
from pathlib import Path

from taskctl import enqueue_params
from tests.support import Taskd

WORKERS = 2
JOBS = 2000


def test_status_never_lists_more_running_jobs_than_workers(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    daemon = taskd_factory(config=f"workers = {WORKERS}\n", log_level="info").start()
    log = short_tmp / "executions.log"
    with daemon.client() as client:
        client.enqueue_many([enqueue_params("work", {"log": str(log)}) for _ in range(JOBS)])
        listed, busy, held = [], [], []
        while True:
            status = client.status()
            listed.append(len(status.running))
            (here,) = status.nodes
            assert status.slots is not None
            busy.append(status.slots.busy)
            held.append(here.running)  # the store's count: with those claimed ahead, ending
            assert status.slots.busy + status.slots.claimed_ahead + status.slots.ending >= (
                len(status.running)
            )
            if not status.counts.get("pending") and not status.counts.get("running"):
                break
    shown = daemon.ctl("status")
    assert shown.returncode == 0, shown.stderr
    over = [count for count in listed if count > WORKERS]
    assert not over, f"{len(over)} of {len(listed)} reads listed more than {WORKERS}: {max(over)}"
    assert max(busy) <= WORKERS
    assert max(listed) == WORKERS  # it was busy
    assert max(held) > WORKERS  # it did claim ahead, or the test proves nothing
    assert len(log.read_text().split()) == JOBS
    status = json.loads(daemon.ctl("--json", "status").stdout)
    assert status["slots"] == {"busy": 0, "claimed_ahead": 0, "ending": 0}
