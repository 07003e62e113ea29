"""What a task prints goes to its job's log lines, never to taskd's stdout or stderr directly:
a task printing in a loop while taskd's output is a pipe nobody reads (a stalled journal)
does not stop the daemon, and taskd's own log drops lines rather than wait."""

from __future__ import annotations

import json
import os
import select
import signal
from pathlib import Path

import pytest

from tests.support import Taskd, wait_until

TASKS = {
    "prints.py": """
import sys
from taskd import define_task

@define_task(description="Prints lines in a loop, never awaiting")
async def prints(payload: dict) -> int:
    stream = sys.stderr if payload.get("stderr") else sys.stdout
    for number in range(payload["lines"]):
        print(f"line {number}", "x" * 100, file=stream)
    print("no newline at the end", end="", file=stream)
    return payload["lines"]
""",
    "prints_plain.py": """
import sys
from taskd import define_task

@define_task(description="A plain function that prints lines in a loop")
def prints_plain(payload: dict) -> int:
    stream = sys.stderr if payload.get("stderr") else sys.stdout
    for number in range(payload["lines"]):
        print(f"line {number}", "x" * 100, file=stream)
    print("no newline at the end", end="", file=stream)
    return payload["lines"]
""",
}
LINES = 10_000  # about 1.3 MB: 20 times what a pipe holds, more than taskd queues


def tasks_folder(root: Path) -> Path:
    folder = root / "tasks"
    folder.mkdir()
    for name, text in TASKS.items():
        (folder / name).write_text(text)
    return folder


def flooding(
    taskd_factory: type[Taskd], short_tmp: Path, task: str, stream: str
) -> tuple[Taskd, int]:
    """A taskd whose output is a pipe nobody reads, after a run of `task` printing LINES
    lines to `stream`, which it answered; and the run's job id."""
    daemon = taskd_factory(tasks=tasks_folder(short_tmp), log_level="debug")
    daemon.unread_pipe = True
    daemon.start()
    payload = json.dumps({"lines": LINES, "stderr": stream == "stderr"})
    ran = daemon.ctl("--json", "--request-timeout", "20s", "run", task, "--payload", payload)
    assert ran.returncode == 0, ran.stderr
    job = json.loads(ran.stdout)
    assert job["status"] == "succeeded" and job["result"] == LINES
    return daemon, job["id"]


@pytest.mark.parametrize(
    ("task", "stream", "level"),
    [
        ("prints", "stdout", "INFO"),
        ("prints", "stderr", "WARNING"),
        ("prints_plain", "stdout", "INFO"),
    ],
)
def test_a_task_printing_to_a_pipe_nobody_reads_does_not_stop_taskd(
    taskd_factory: type[Taskd], short_tmp: Path, task: str, stream: str, level: str
) -> None:
    daemon, job_id = flooding(taskd_factory, short_tmp, task, stream)
    listed = daemon.ctl("--request-timeout", "10s", "list")
    assert listed.returncode == 0, listed.stderr
    logs = daemon.ctl("--json", "--request-timeout", "10s", "logs", str(job_id))
    assert logs.returncode == 0, logs.stderr
    kept = json.loads(logs.stdout)
    # A job keeps its last 1,000 lines and 64 KiB: the older ones are counted as dropped.
    lines = kept["lines"]
    assert kept["dropped"] + len(lines) == LINES + 1
    assert lines[-1]["message"] == "no newline at the end"
    assert lines[-2]["message"] == f"line {LINES - 1} " + "x" * 100
    assert {line["level"] for line in lines} == {level}
    status = daemon.ctl("--json", "--request-timeout", "10s", "status")
    dropped = json.loads(status.stdout)["log_dropped"]
    assert dropped > 0  # taskd's own log (with the task's lines) did not wait for the pipe
    assert f"log:       {dropped} lines dropped" in daemon.ctl("status").stdout
    assert daemon.signal_and_wait(signal.SIGTERM, timeout=20) == 0  # the pipe still unread
    assert "Traceback" not in daemon.unread


def test_the_log_says_how_many_lines_it_dropped_once_it_goes_through(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    daemon, _ = flooding(taskd_factory, short_tmp, "prints", "stdout")
    output = read_until(daemon, "lines of this log were dropped")
    assert "Traceback" not in output
    assert daemon.stop() == 0


def read_until(daemon: Taskd, text: str) -> str:
    """Read taskd's unread pipe until `text` has come."""
    assert daemon.process is not None and daemon.process.stdout is not None
    fd = daemon.process.stdout.fileno()
    output = b""

    def arrived() -> bool:
        nonlocal output
        while select.select([fd], [], [], 0)[0]:
            output += os.read(fd, 1 << 16)
        return text.encode() in output

    wait_until(arrived, what=text)
    return output.decode(errors="replace")


OUTSIDE = """
import sys
import threading
from taskd import define_task

print("printed while the tasks load")

@define_task(description="Prints, and prints from a thread of its own")
async def outside() -> str:
    print("from the job", end="")
    print(", in pieces")
    thread = threading.Thread(target=print, args=("from a thread of its own",))
    thread.start()
    thread.join()
    print("a warning", file=sys.stderr)
    return "done"
"""


def test_what_is_printed_outside_a_job_goes_to_taskds_log(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    folder = short_tmp / "tasks"
    folder.mkdir()
    (folder / "outside.py").write_text(OUTSIDE)
    daemon = taskd_factory(tasks=folder, log_level="info").start()
    job = json.loads(daemon.ctl("--json", "run", "outside").stdout)
    logs = json.loads(daemon.ctl("--json", "logs", str(job["id"])).stdout)
    kept = [(line["level"], line["message"]) for line in logs["lines"]]
    assert kept == [("INFO", "from the job, in pieces"), ("WARNING", "a warning")]
    assert daemon.stop() == 0
    assert "INFO taskd.output: printed while the tasks load" in daemon.log
    assert "INFO taskd.output: from a thread of its own" in daemon.log
    assert f"INFO taskd.task.outside: job {job['id']}: from the job, in pieces" in daemon.log
    assert f"WARNING taskd.task.outside: job {job['id']}: a warning" in daemon.log
