"""taskctl as a person at a terminal meets it: options anywhere, help, errors, Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import TASKCTL, Taskd, short_tempdir, wait_until

EXAMPLES = Path(__file__).parent.parent.parent / "contrib" / "examples"


def taskctl(*args: str) -> subprocess.CompletedProcess[str]:
    command = [TASKCTL] if TASKCTL else [sys.executable, "-m", "taskctl"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)


def test_global_options_go_before_or_after_the_command(taskd: Taskd) -> None:
    after = taskctl("list", "--json", "--socket", str(taskd.socket))
    assert after.returncode == 0, after.stderr
    assert "echo" in [task["name"] for task in json.loads(after.stdout)]
    status = taskctl("status", "--socket", str(taskd.socket))
    assert status.returncode == 0 and "workers:" in status.stdout, status.stderr
    both = taskctl("--json", "--socket", "/nonexistent.sock", "jobs", "--socket", str(taskd.socket))
    assert both.returncode == 0, both.stderr  # the option after the command wins


def test_help_version_and_bare_taskctl() -> None:
    bare = taskctl()
    assert bare.returncode == 2 and "enqueue" in bare.stderr and "schedules" in bare.stderr
    assert taskctl("--version").stdout.startswith("taskctl ")
    run_help = taskctl("run", "--help").stdout
    assert "example" in run_help and "taskctl run hello" in run_help
    assert "the task's name" in run_help and "attempts before the job fails" in run_help
    assert "75  taskd is busy" not in run_help  # the exit statuses are in `taskctl --help` only
    assert "75  taskd is busy" in taskctl("--help").stdout
    assert "--older-than DUR" in taskctl("prune", "--help").stdout


@pytest.mark.parametrize(
    ("payload", "message"),
    [("", "--payload is empty"), ("{'name': 'Ada'}", "take double quotes")],
)
def test_payload_mistakes_are_explained(taskd: Taskd, payload: str, message: str) -> None:
    result = taskd.ctl("run", "echo", "--payload", payload)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_json_errors_are_json(taskd: Taskd) -> None:
    result = taskd.ctl("--json", "job", "424242")
    assert result.returncode == 4 and result.stdout == ""
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "unknown_job" and error["exit"] == 4 and "424242" in error["message"]


def test_jobs_shows_origin_and_when_a_delayed_job_is_due(taskd: Taskd) -> None:
    assert taskd.ctl("enqueue", "echo", "--delay", "1h").returncode == 0
    assert taskd.ctl("run", "echo").returncode == 0
    table = taskd.ctl("jobs").stdout.splitlines()
    assert table[0].split()[:5] == ["ID", "TASK", "STATUS", "ORIGIN", "ATTEMPTS"]
    assert "DUE" in table[0]
    ran, queued = table[1].split(), table[2].split()
    # the DUE cell is a time of day, with the date in front when it is not today
    assert ran[3] == "run" and queued[3] == "enqueue" and ":" in " ".join(queued[6:8])


def test_jobs_filters_by_key_text_creation_time_and_pages_by_id(taskd: Taskd) -> None:
    def enqueue(*args: str) -> int:
        made = taskd.ctl("enqueue", "echo", "--delay", "1h", *args)
        assert made.returncode == 0, made.stderr
        return int(made.stdout)

    ada = enqueue("--payload", '{"to": "ada@example.com"}', "--key", "k-ada")
    bob = enqueue("--payload", '{"to": "bob@example.com"}')
    eve = enqueue("--payload", '{"to": "eve@example.com"}', "--key", "k-eve")

    def ids(*filters: str) -> list[int]:
        listed = taskd.ctl("--json", "jobs", "--task", "echo", *filters)
        assert listed.returncode == 0, listed.stderr
        return [job["id"] for job in json.loads(listed.stdout)]

    assert ids() == [eve, bob, ada]
    assert ids("--key", "k-ada") == [ada]
    assert ids("--text", "bob@") == [bob]
    assert ids("--before", str(eve), "--limit", "1") == [bob]  # the next page after eve
    assert ids("--since", "1h") == [eve, bob, ada]
    assert ids("--until", "1h") == []
    assert ids("--since", "2999-01-01T00:00:00+00:00") == []
    assert ids("--until", "@32503680000", "--text", "example.com", "--before", str(bob)) == [ada]
    wrong = taskd.ctl("jobs", "--since", "yesterday")
    assert wrong.returncode == 2 and "--since" in wrong.stderr and "ISO-8601" in wrong.stderr
    too_long = taskd.ctl("jobs", "--text", "x" * 201)
    assert too_long.returncode == 2 and "text" in too_long.stderr, too_long.stderr


def test_a_time_in_the_past_is_said(taskd: Taskd) -> None:
    result = taskd.ctl("enqueue", "echo", "--at", "2020-01-01T00:00:00")
    assert (
        result.returncode == 0 and "in the past" in result.stderr and "local time" in result.stderr
    )


def connected(pid: int) -> bool:
    """True once the process holds a socket (taskctl connects only after it knows its job)."""
    for link in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(link).startswith("socket:"):
                return True
        except FileNotFoundError:  # closed since it was listed
            continue
    return False


def test_ctrl_c_exits_130_and_names_the_job_that_goes_on(taskd: Taskd, short_tmp: Path) -> None:
    started = short_tmp / "started"
    payload = json.dumps({"seconds": 30, "started": str(started)})
    job_id = taskd.ctl("enqueue", "slow", "--payload", payload).stdout.strip()
    command = [TASKCTL] if TASKCTL else [sys.executable, "-m", "taskctl"]
    for args in (["wait", job_id], ["run", "slow", "--payload", payload]):
        with subprocess.Popen(
            [*command, "--socket", str(taskd.socket), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ) as process:  # fmt: skip
            wait_until(started.exists, what="the task to start")
            wait_until(lambda: connected(process.pid), what="taskctl to connect")
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=30)
        assert process.returncode == 130, stderr
        assert "interrupted" in stderr
        if args[0] == "wait":  # a run's job id is known once its run request is answered
            assert f"taskctl wait {job_id}" in stderr and f"taskctl cancel {job_id}" in stderr
    assert json.loads(taskd.ctl("--json", "job", job_id).stdout)["status"] == "running"
    for job in json.loads(taskd.ctl("--json", "jobs", "--status", "running").stdout):
        assert taskd.ctl("cancel", str(job["id"])).returncode == 0


@pytest.fixture
def examples() -> Path:
    root = short_tempdir()
    shutil.copytree(EXAMPLES, root / "contrib" / "examples")
    yield root / "contrib" / "examples"
    shutil.rmtree(root, ignore_errors=True)


def test_make_run_shows_why_taskd_cannot_start(examples: Path) -> None:
    (examples / "tasks" / "broken.py").write_text("import no_such_module\n")
    run = subprocess.run([sys.executable, examples / "run.py"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 78, run.stderr
    assert "broken.py" in run.stderr and "no_such_module" in run.stderr
    assert "make run: taskd stopped with exit status 78" in run.stderr
    assert "taskd is running" not in run.stdout


def test_a_second_make_run_says_taskd_is_already_running(examples: Path) -> None:
    with subprocess.Popen([sys.executable, examples / "run.py"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as first:  # fmt: skip
        try:
            assert first.stdout is not None
            output = first.stdout
            wait_until(lambda: "Ctrl-C stops it" in output.readline(), what="the first run")
            second = subprocess.run([sys.executable, examples / "run.py"], capture_output=True,
                                    text=True, timeout=60)  # fmt: skip
            assert second.returncode == 1 and "another taskd is already serving" in second.stderr
            assert "taskd is running" not in second.stdout
        finally:
            first.send_signal(signal.SIGTERM)
            assert first.wait(30) == 0


def test_a_caller_during_a_graceful_stop_is_told_taskd_is_stopping(
    taskd: Taskd, short_tmp: Path
) -> None:
    started = short_tmp / "started"
    payload = json.dumps({"seconds": 5, "started": str(started)})
    assert taskd.ctl("enqueue", "slow", "--payload", payload).returncode == 0
    wait_until(started.exists, what="the task to start")
    assert taskd.process is not None
    taskd.process.send_signal(signal.SIGTERM)  # it waits for the running job: grace_period
    wait_until(lambda: "waiting up to" in taskd.log, what="taskd to begin stopping")
    refused = taskd.ctl("list")
    assert refused.returncode == 75 and "taskd is stopping" in refused.stderr, refused.stderr
    assert taskd.process.wait(30) == 0
