"""The daemon's loop keeps its turns while async jobs that compute without awaiting run back
to back in every slot (a freed slot runs the next job claimed ahead in the same asyncio task):
its timers, sockets and claims are served meanwhile."""

from __future__ import annotations

from pathlib import Path

from taskctl import enqueue_params
from tests.bench.loop_turns import PROBE_TASK, SPIN_TASK  # the bench's bad case
from tests.support import Taskd

WORKERS = 16  # one for the probe, the others chain the spinning jobs
SPINS = 2000  # of 2 ms each: longer than the probe's PROBE_SECONDS on two cores
PROBE_SECONDS = 2.0
STALLED = 20.0  # ms a timer is late by when the loop went that long without a turn


def test_the_loop_takes_turns_while_jobs_that_never_await_chain(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    tasks = short_tmp / "tasks"
    tasks.mkdir()
    (tasks / "spin.py").write_text(SPIN_TASK)
    (tasks / "probe.py").write_text(PROBE_TASK)
    daemon = taskd_factory(tasks=tasks, config=f"workers = {WORKERS}\n", log_level="info")
    daemon.start()
    with daemon.client() as client:
        probe = client.enqueue("probe", PROBE_SECONDS).job_id
        client.enqueue_many([enqueue_params("spin", 2.0) for _ in range(SPINS)])
        late = client.wait(probe, timeout=60).result
        spun = client.status().counts.get("succeeded", 0) - 1
    # Without turns the slots run all the jobs claimed ahead (~10 ms of them per slot, ~150 ms
    # in all) before a timer fires: most of the probe's time is then spent in such stalls. A
    # loaded machine preempts the daemon now and then: a stall or two, not most of the time.
    stalled = sum(ms for ms in late if ms > STALLED)
    assert stalled < 0.25 * PROBE_SECONDS * 1000, (
        f"timers late by over {STALLED:g} ms for {stalled:.0f} of {PROBE_SECONDS * 1000:g} ms: "
        f"{sorted(late)[-10:]}"
    )
    assert spun > WORKERS * 10  # the spinning jobs did chain meanwhile (claimed ahead)
    assert daemon.stop() == 0
