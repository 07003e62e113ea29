"""Plain-function tasks that never return: their threads are counted as stuck, replaced up to
max_stuck_threads, reported in the log and in `taskctl status`, and new work still runs."""

from __future__ import annotations

import json
from pathlib import Path

from taskctl import enqueue_params
from tests.support import Taskd

TASKS = {
    "hang.py": """
import threading
from taskd import define_task

@define_task(description="Never returns", timeout=2, max_attempts=1)
def hang() -> None:
    threading.Event().wait()
""",
    "plain.py": """
from taskd import define_task

@define_task(description="A plain function", timeout=30)
def plain(payload):
    return payload
""",
    "coroutine.py": """
from taskd import define_task

@define_task(description="A coroutine", timeout=30)
async def coroutine(payload):
    return payload
""",
}


def tasks_folder(root: Path) -> Path:
    folder = root / "tasks"
    folder.mkdir()
    for name, text in TASKS.items():
        (folder / name).write_text(text)
    return folder


def hang(daemon: Taskd, count: int) -> None:
    """`count` runs of a task that never returns, each timed out after 2 s."""
    with daemon.client() as client:
        jobs = client.enqueue_many([enqueue_params("hang", key=str(n)) for n in range(count)])
        for entry in jobs:
            job = client.wait(entry.job_id, timeout=60)
            assert job.status == "failed" and job.error == "timed out after 2 s", job


def status(daemon: Taskd) -> dict[str, object]:
    shown = daemon.ctl("--json", "status")
    assert shown.returncode == 0, shown.stderr
    result: dict[str, object] = json.loads(shown.stdout)
    return result


def test_hung_plain_functions_do_not_stop_execution(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    # 16 workers and 16 replacements by default: 24 stuck threads leave 8 for new work.
    daemon = taskd_factory(tasks=tasks_folder(short_tmp), log_level="info").start()
    hang(daemon, 24)
    for task in ("coroutine", "plain"):
        ran = daemon.ctl("run", task, "--payload", '"still runs"', timeout=30)
        assert (ran.returncode, ran.stdout.strip()) == (0, '"still runs"'), ran.stderr
    threads = status(daemon)["threads"]
    assert threads == {"running": 0, "stuck": 24, "max_stuck": 16, "refused": 0}
    assert (
        "24 stuck in functions whose job ended (replaced up to 16)" in daemon.ctl("status").stdout
    )
    assert "job 1 hang ended, but its function is still running in its thread" in daemon.log
    assert "16 threads stuck (max_stuck_threads = 16), another thread takes its place" in (
        daemon.log
    )
    assert "17 threads stuck (max_stuck_threads = 16), it is not replaced" in daemon.log


def test_past_max_stuck_threads_plain_functions_fail_and_coroutines_run(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    config = "workers = 2\nmax_stuck_threads = 1\n"
    daemon = taskd_factory(tasks=tasks_folder(short_tmp), config=config).start()
    hang(daemon, 3)  # 2 workers + 1 replacement, all stuck: no thread is left
    refused = daemon.ctl("run", "plain", "--payload", "1", timeout=30)
    assert refused.returncode == 1
    assert "no thread left for plain-function tasks: 3 threads are stuck" in refused.stderr
    assert "max_stuck_threads" in refused.stderr
    ran = daemon.ctl("run", "coroutine", "--payload", "2", timeout=30)
    assert (ran.returncode, ran.stdout.strip()) == (0, "2"), ran.stderr
    threads = status(daemon)["threads"]
    assert threads == {"running": 0, "stuck": 3, "max_stuck": 1, "refused": 1}
    assert daemon.stop() == 0
    assert "3 task threads are still running; exiting without them" in daemon.log
