"""log_format = "json": every line of taskd's log is one JSON object, with the task and the
job where a line is about one."""

from __future__ import annotations

import datetime as dt
import json

from tests.support import Taskd


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
