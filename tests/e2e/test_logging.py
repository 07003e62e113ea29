"""log_format = "json": every line of taskd's log is one JSON object, with the task and the
job where a line is about one."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

from taskd.store.sqlite.schema import MIGRATIONS
from tests.support import Taskd, wait_until


def test_json_log_lines_name_the_task_and_the_job(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config='log_format = "json"\n').start()
    assert daemon.ctl("run", "chatty", "--payload", '{"lines": 2}').returncode == 0
    failed = json.loads(daemon.ctl("--json", "run", "fail", "--payload", '"x"').stdout)
    assert daemon.stop() == 0
    entries = [json.loads(line) for line in daemon.log.splitlines()]  # every line is JSON
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        assert dt.datetime.fromisoformat(entry["time"]).tzinfo == dt.UTC
    lines = [e for e in entries if e["logger"] == "taskd.task.chatty"]
    assert [e["message"].split(": ", 1)[1] for e in lines] == ["line 0", "line 1"]
    assert all(e["task"] == "chatty" and isinstance(e["job_id"], int) for e in lines)
    (failure,) = [e for e in entries if e["level"] == "error" and e.get("task") == "fail"]
    assert failure["job_id"] == failed["id"] and "ValueError: boom: x" in failure["message"]
    assert "Traceback" in failure["message"]


def test_a_fresh_store_is_one_line_and_a_refused_start_says_why_first(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    first = taskd_factory().start()
    schema = [line for line in first.log.splitlines() if "schema version" in line]
    assert len(schema) == 1 and "INFO" in schema[0], schema
    created = f"created the job store {first.database} at schema version {len(MIGRATIONS)}"
    assert created in schema[0]
    (short_tmp / "second").mkdir()
    second = taskd_factory(short_tmp / "second", socket_path=first.socket)
    lines = second.refused().splitlines()
    (refusal,) = [n for n, line in enumerate(lines) if "cannot start" in line]
    assert "another taskd is already serving" in lines[refusal]
    stopping = [n for n, line in enumerate(lines) if line.endswith(("stopping", "stopped"))]
    assert stopping and min(stopping) > refusal, lines  # the clean-up comes after the cause
    assert all(" DEBUG " in lines[n] for n in stopping), lines  # and is no news


def test_one_of_a_thing_is_not_said_in_the_plural(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    tasks = short_tmp / "tasks"
    tasks.mkdir()
    (tasks / "hold.py").write_text(
        "import time\nfrom taskd import define_task\n\n\n"
        "@define_task\ndef hold(payload: dict) -> None:\n    time.sleep(60)\n"
    )
    daemon = taskd_factory(tasks=tasks).start()
    wait_until(lambda: "): 1 task from" in daemon.log, what="taskd's ready line")
    assert (
        daemon.notifications[0].split("STATUS=")[1].startswith("0 running, 0 queued, 1 task loaded")
    )
    job_id = daemon.ctl("enqueue", "hold").stdout.strip()
    wait_until(lambda: f"job {job_id}" in daemon.ctl("status").stdout, what="the job to run")
    daemon.kill()
    daemon.start()
    assert "1 job was running when taskd last stopped without finishing it" in daemon.log
    checked = subprocess.run(
        [sys.executable, "-m", "taskd", "--check", "--tasks", str(tasks)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert checked.stdout.startswith(f"configuration ok: 1 task in {tasks}, 0 schedules")
    assert daemon.ctl("cancel", job_id).returncode == 0
