"""What taskctl tells the person at the terminal: failed attempts while it waits, joins,
reloads that need a restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.http_support import HttpClient, http_config
from tests.support import Taskd

SLOW_RETRY = '[task."fail"]\nbackoff = 3600\n'


def test_run_reports_each_failed_attempt(taskd: Taskd, short_tmp: Path) -> None:
    payload = json.dumps({"log": str(short_tmp / "log.txt"), "succeed_on": 3})
    ran = taskd.ctl("run", "flaky", "--payload", payload, "--max-attempts", "3")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "3"
    lines = ran.stderr.splitlines()
    assert lines[0].startswith("taskctl: attempt 1 failed: RuntimeError: attempt 1 failed; ")
    assert lines[1].startswith("taskctl: attempt 2 failed: RuntimeError: attempt 2 failed; ")
    assert len(lines) == 2, lines


def test_wait_says_when_the_next_attempt_starts(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config=SLOW_RETRY).start()
    job_id = daemon.ctl("enqueue", "fail", "--max-attempts", "2", "--payload", '"x"').stdout
    waited = daemon.ctl("wait", job_id.strip(), "--timeout", "3s")
    assert waited.returncode == 124, waited.stderr
    # The backoff of 1h gets up to 10% jitter.
    said = "taskctl: attempt 1 failed: ValueError: boom: x; retrying in 1h"
    assert said in waited.stderr, waited.stderr
    assert f"job {job_id.strip()} is still pending after 3.0s" in waited.stderr
    assert daemon.stop() == 0


def test_joining_a_run_pending_a_retry(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config=SLOW_RETRY).start()
    first = daemon.ctl("run", "fail", "--detach", "--max-attempts", "2")
    assert first.returncode == 0, first.stderr
    job_id = int(first.stdout)
    with daemon.client() as client:
        assert client.wait(job_id, after_attempt=0).status == "pending"
    joined = daemon.ctl("run", "fail", "--detach")
    assert int(joined.stdout) == job_id
    assert "which was already pending a retry" in joined.stderr, joined.stderr
    assert "payload" not in joined.stderr
    same = daemon.ctl("run", "fail", "--detach", "--payload", "{}")
    assert "pending a retry" in same.stderr and "payload" not in same.stderr
    other = daemon.ctl("run", "fail", "--detach", "--payload", '"mine"')
    assert "its payload was used, not yours" in other.stderr, other.stderr
    assert daemon.stop() == 0


def test_reload_says_what_waits_for_a_restart(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config="workers = 2\n").start()
    daemon.config_file.write_text("workers = 3\n")
    reloaded = daemon.ctl("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    assert reloaded.stdout.startswith("reloaded: ")
    assert "only when taskd restarts: workers" in reloaded.stderr
    as_json = json.loads(daemon.ctl("--json", "reload").stdout)
    assert as_json["restart_needed"] == ["workers"]
    again = daemon.ctl("reload")  # still not in effect
    assert again.returncode == 0 and "restarts: workers" in again.stderr
    daemon.config_file.write_text("workers = 2\n")
    back = daemon.ctl("reload")
    assert back.returncode == 0 and "restart" not in back.stderr
    assert daemon.stop() == 0


def test_messages_count_in_the_singular_too(taskd: Taskd, short_tmp: Path) -> None:
    (short_tmp / "one").mkdir()
    (short_tmp / "one" / "echo.py").write_text(
        (Path(__file__).parent.parent / "fixtures" / "tasks" / "echo.py").read_text()
    )
    assert taskd.ctl("run", "fail", "--payload", '"x"').returncode == 1
    (failed,) = json.loads(taskd.ctl("--json", "jobs").stdout)
    retried = taskd.ctl("retry", str(failed["id"]))
    assert retried.stdout.strip().endswith("is pending again with 1 attempt"), retried.stdout
    assert taskd.ctl("wait", str(failed["id"])).returncode == 1
    assert taskd.ctl("retry", str(failed["id"])).returncode == 0  # failed again: retry again
    assert taskd.ctl("wait", str(failed["id"])).returncode == 1
    assert taskd.ctl("run", "echo").returncode == 0
    (done,) = json.loads(taskd.ctl("--json", "jobs", "--task", "echo").stdout)
    again = taskd.ctl("cancel", str(done["id"]))
    assert again.returncode == 3
    assert f"job {done['id']} has already succeeded and cannot be cancelled" in again.stderr
    pruned = taskd.ctl("prune", "--older-than", "0")
    assert pruned.stdout.strip() == "deleted 2 finished jobs"
    assert taskd.ctl("run", "echo").returncode == 0
    assert taskd.ctl("prune", "--older-than", "0").stdout.strip() == "deleted 1 finished job"
    check = subprocess.run(
        [sys.executable, "-m", "taskd", "--check", "--tasks", str(short_tmp / "one"),
         "--config", str(taskd.config_file)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "configuration ok: 1 task in" in check.stdout and ", 0 schedules" in check.stdout


def test_jobs_of_an_unknown_task_is_an_error(taskd: Taskd) -> None:
    typo = taskd.ctl("jobs", "--task", "ecoh")
    assert typo.returncode == 4 and "unknown task 'ecoh'" in typo.stderr, typo.stderr
    assert "echo" in typo.stderr  # the known tasks are listed
    run = taskd.ctl("run", "ecoh")
    assert run.returncode == 4 and 'did you mean "echo"?' in run.stderr, run.stderr
    none_yet = taskd.ctl("jobs", "--task", "echo")
    assert none_yet.returncode == 0 and none_yet.stdout.strip() == "no jobs"


def test_jobs_filtered_by_how_they_were_made(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config=http_config()).start()
    ran = int(json.loads(daemon.ctl("--json", "run", "echo").stdout)["id"])
    enqueued = int(daemon.ctl("enqueue", "echo", "--payload", "{}").stdout)
    by_task = json.loads(daemon.ctl("--json", "run", "parent", "--payload", "{}").stdout)["id"]
    child = [job["id"] for job in json.loads(daemon.ctl("--json", "jobs", "--task", "slow").stdout)]
    for origin, ids in (("run", [by_task, ran]), ("enqueue", [enqueued]), ("task", child)):
        listed = json.loads(daemon.ctl("--json", "jobs", "--origin", origin).stdout)
        assert [job["id"] for job in listed] == ids, (origin, listed)
        assert {job["origin"] for job in listed} == {origin}
        over_http = HttpClient.of(daemon).get(f"/jobs?origin={origin}").json()["jobs"]
        assert [job["id"] for job in over_http] == ids
        with daemon.client() as client:
            assert [job.id for job in client.jobs(origin=origin)] == ids
    assert json.loads(daemon.ctl("--json", "jobs", "--origin", "schedule").stdout) == []
    wrong = daemon.ctl("jobs", "--origin", "tick")
    assert (
        wrong.returncode == 2 and "choose from 'run', 'enqueue', 'schedule', 'task'" in wrong.stderr
    )


def test_wait_after_a_retry_follows_the_new_attempts(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    # Attempts count from 1 again after a retry: the earlier run's failures are not news.
    daemon = taskd_factory(config='[task."flaky"]\nbackoff = 2\n').start()
    payload = json.dumps({"log": str(short_tmp / "log.txt")})
    first = daemon.ctl("run", "flaky", "--payload", payload, "--max-attempts", "2")
    assert first.returncode == 1, first.stderr
    job_id = json.loads(daemon.ctl("--json", "jobs", "--task", "flaky").stdout)[0]["id"]
    assert daemon.ctl("retry", str(job_id)).returncode == 0
    waited = daemon.ctl("wait", str(job_id))
    assert waited.returncode == 1, waited.stderr
    said = [line for line in waited.stderr.splitlines() if line.startswith("taskctl: attempt")]
    assert len(said) == 1, waited.stderr  # not the two of the first run
    assert said[0].startswith("taskctl: attempt 1 failed: RuntimeError: attempt 1 failed; ")
    with daemon.client() as client:  # as the Python client's wait sees it
        job = client.job(job_id)
        assert job.status == "failed" and job.attempts == 2
        assert client.wait(job_id, after_attempt=0).status == "failed"
