"""`taskctl why ID`: the reason a job is not running yet, computed by a real daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support import RawConnection, Taskd, enqueue, wait_until

FIXTURES = Path(__file__).parent.parent / "fixtures" / "tasks"


def why(daemon: Taskd, job_id: int) -> dict[str, Any]:
    shown = daemon.ctl("why", str(job_id), "--json")
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)  # type: ignore[no-any-return]


def start_slow(daemon: Taskd, started: Path, seconds: float = 60) -> int:
    """Enqueue a `slow` job and return its id once it runs."""
    payload = json.dumps({"seconds": seconds, "started": str(started)})
    job_id = enqueue(daemon, "slow", "--payload", payload)
    wait_until(lambda: str(job_id) in (started.read_text() if started.exists() else ""))
    return job_id


def test_a_delayed_job_waits_for_its_delay(taskd: Taskd) -> None:
    before = time.time()
    job_id = enqueue(taskd, "echo", "--delay", "1h")
    reply = why(taskd, job_id)
    assert reply["reason"] == "delayed" and reply["status"] == "pending"
    assert "delay" in reply["message"]
    # --json prints times as ISO-8601; the human form names the time.
    human = taskd.ctl("why", str(job_id))
    assert human.returncode == 0 and "waits for its delay, until" in human.stdout
    assert "created" in human.stdout
    assert reply["timeline"][0]["event"] == "created"
    with taskd.client() as client:
        until = client.why(job_id).until
    assert until is not None and before + 3590 < until < time.time() + 3610


def test_a_failed_attempt_waits_for_its_retry(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config='[task."fail"]\nbackoff = 3600\n').start()
    job_id = enqueue(daemon, "fail", "--max-attempts", "3", "--payload", '"x"')
    with daemon.client() as client:
        failed_once = client.wait(job_id, after_attempt=0)
        assert failed_once.status == "pending" and failed_once.attempts == 1
    reply = why(daemon, job_id)
    assert reply["reason"] == "retry_backoff"
    assert "attempt 1 of 3 failed" in reply["message"] and "boom" in reply["message"]
    events = [event["event"] for event in reply["timeline"]]
    assert events == ["created", "started", "error"], events
    assert reply["timeline"][2]["attempt"] == 1
    assert reply["timeline"][1]["worker"]  # the worker that ran attempt 1
    assert daemon.stop() == 0


def test_the_concurrency_limit_and_the_running_job(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    daemon = taskd_factory(config='workers = 4\n[task."slow"]\nconcurrency = 1\n').start()
    running = start_slow(daemon, short_tmp / "started.txt")
    second = enqueue(daemon, "slow", "--payload", "{}")
    reply = why(daemon, second)
    assert reply["reason"] == "concurrency_limit", reply
    assert "1 job of slow running" in reply["message"]
    first = why(daemon, running)
    assert first["reason"] == "running" and first["timeline"][-1]["event"] == "started"
    assert first["timeline"][-1]["worker"] and first["timeline"][-1]["worker"] in first["message"]
    for job_id in (second, running):
        assert daemon.ctl("cancel", str(job_id)).returncode == 0
    assert why(daemon, running)["reason"] == "cancelled"
    assert daemon.stop() == 0


def test_no_free_worker(taskd_factory: type[Taskd], short_tmp: Path) -> None:
    daemon = taskd_factory(config="workers = 1\n").start()
    running = start_slow(daemon, short_tmp / "started.txt")
    waiting = enqueue(daemon, "echo")
    reply = why(daemon, waiting)
    assert reply["reason"] == "workers_busy", reply
    assert "its one worker is busy" in reply["message"]
    assert daemon.ctl("cancel", str(running)).returncode == 0
    with daemon.client() as client:
        client.wait(waiting, timeout=20)
    assert daemon.stop() == 0


def test_finished_jobs_say_how_they_ended(taskd: Taskd) -> None:
    assert taskd.ctl("run", "echo", "--payload", '{"a": 1}').returncode == 0
    (done,) = json.loads(taskd.ctl("--json", "jobs").stdout)
    reply = why(taskd, done["id"])
    assert reply["reason"] == "succeeded" and "succeeded at" in reply["message"]
    assert [e["event"] for e in reply["timeline"]] == ["created", "started", "succeeded"]
    assert taskd.ctl("run", "fail", "--payload", '"bad"').returncode == 1
    failed = next(j for j in json.loads(taskd.ctl("--json", "jobs").stdout) if j["task"] == "fail")
    reply = why(taskd, failed["id"])
    assert reply["reason"] == "failed" and "boom: bad" in reply["message"]
    with RawConnection(taskd.socket) as connection:  # every key on the wire, nil when unset
        timeline = connection.call("why", {"id": failed["id"]})["result"]["timeline"]
    assert [sorted(event) for event in timeline] == [
        ["at", "attempt", "event", "message", "worker"]
    ] * len(timeline)
    assert timeline[0]["attempt"] is None and timeline[1]["message"] is None
    missing = taskd.ctl("why", "999999")
    assert missing.returncode == 4 and "999999" in missing.stderr


def test_a_stopping_daemon_starts_nothing(taskd_factory: type[Taskd], short_tmp: Path) -> None:
    daemon = taskd_factory(config="workers = 1\ngrace_period = 60\n").start()
    running = start_slow(daemon, short_tmp / "started.txt")
    with daemon.client() as client:  # connected before the stop: still served while draining
        waiting = client.enqueue("echo").job_id
        assert client.why(waiting).reason == "workers_busy"
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "waiting up to" in daemon.log, what="taskd to drain")
        reply = client.why(waiting)
        assert reply.reason == "draining", reply
        assert "stopping" in reply.message
        client.cancel(running)
    assert daemon.process.wait(30) == 0


def test_a_job_whose_task_was_removed(taskd_factory: type[Taskd], short_tmp: Path) -> None:
    tasks = short_tmp / "tasks"
    tasks.mkdir()
    (tasks / "echo.py").write_text((FIXTURES / "echo.py").read_text())
    (tasks / "slow.py").write_text((FIXTURES / "slow.py").read_text())
    daemon = taskd_factory(tasks=tasks).start()
    job_id = enqueue(daemon, "echo", "--delay", "1h")
    (tasks / "echo.py").unlink()
    assert daemon.ctl("reload").returncode == 0
    reply = why(daemon, job_id)
    assert reply["reason"] == "unknown_task", reply
    assert "has not loaded" in reply["message"]
    assert daemon.stop() == 0


def test_the_sentence_and_the_timeline_are_in_the_viewers_zone(
    taskd_factory: type[Taskd],
) -> None:
    daemon = taskd_factory().start(env={"TZ": "UTC"})  # a daemon whose zone is not the viewer's
    job_id = enqueue(daemon, "echo", "--delay", "1h")
    viewer = {**os.environ, "TZ": "Asia/Tokyo"}
    shown = subprocess.run([*daemon.ctl_command(), "why", str(job_id)], env=viewer,
                           capture_output=True, text=True, check=True)  # fmt: skip
    headline, zone = shown.stdout.splitlines()[:2]
    assert zone == "timeline (JST):"
    assert re.search(r"until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d JST \(in 59m", headline), headline
    # Programs read `at` (and `until`); the sentence they get names the moment in UTC.
    reply = why(daemon, job_id)
    assert reply["at"] == reply["until"] and " UTC (in 59m" in reply["message"]
