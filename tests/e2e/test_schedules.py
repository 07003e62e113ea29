"""Schedules in the real daemon: ticks in the job store, coalescing, catch-up, control."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import re
import signal
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from taskd.models import Job
from taskd.scheduler import EARLY
from tests.support import Taskd, wait_for_clock, wait_until


def jobs_of(daemon: Taskd, task: str) -> list[Job]:
    """The task's jobs, oldest first, read through the client."""
    with daemon.client() as client:
        return list(reversed(client.jobs(task=task, limit=1000, payloads=True)))


def tick_of(job: Job) -> float:
    return dt.datetime.fromisoformat(job.payload["scheduled_time"]).timestamp()


def schedules(daemon: Taskd) -> dict[str, dict[str, Any]]:
    listed = daemon.ctl("--json", "schedules")
    assert listed.returncode == 0, listed.stderr
    return {entry["id"]: entry for entry in json.loads(listed.stdout)}


def instant(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def test_every_second_schedule_fires_each_tick_with_its_own_time(
    taskd_factory: type[Taskd],
) -> None:
    config = 'timezone = "Europe/Berlin"\n[scheduled_tasks]\n"* * * * * *" = "echo"\n'
    daemon = taskd_factory(config=config).start()
    wait_until(lambda: len(jobs_of(daemon, "echo")) >= 3, timeout=10, what="three ticks")
    listed = daemon.ctl("--json", "jobs", "--task", "echo", "--payloads")
    jobs = sorted(json.loads(listed.stdout), key=lambda job: job["id"])
    ticks = [dt.datetime.fromisoformat(job["payload"]["scheduled_time"]) for job in jobs]
    berlin = ZoneInfo("Europe/Berlin")
    for job, tick in zip(jobs, ticks, strict=True):
        assert job["origin"] == "schedule" and job["payload"]["cron"] == "* * * * * *"
        assert tick.microsecond == 0 and tick.utcoffset() == tick.astimezone(berlin).utcoffset()
        # Committed up to EARLY ahead of the tick, started at it (not before); how late is
        # make bench's (a loaded machine may be seconds late).
        lateness = instant(job["created_at"]) - tick.timestamp()
        assert -EARLY - 0.05 <= lateness < 5, (job, lateness)
        if job["started_at"] is not None:
            assert 0 <= instant(job["started_at"]) - tick.timestamp() < 5, job
    assert [b.timestamp() - a.timestamp() for a, b in itertools.pairwise(ticks)] == [1.0] * (
        len(ticks) - 1
    )  # one job per tick, each with its own scheduled_time
    wait_until(lambda: jobs_of(daemon, "echo")[0].status == "succeeded", what="the first run")
    first = jobs_of(daemon, "echo")[0]
    assert first.result == first.payload

    (echo,) = [t for t in json.loads(daemon.ctl("--json", "list").stdout) if t["name"] == "echo"]
    assert (
        echo["schedules"] == ["* * * * * *"]
        and instant(echo["next_run_at"]) > ticks[-1].timestamp()
    )
    assert "NEXT RUN" in daemon.ctl("list").stdout
    entry = schedules(daemon)["* * * * * *"]
    assert (entry["cron"], entry["timezone"], entry["tasks"]) == (
        "* * * * * *",
        "Europe/Berlin",
        ["echo"],
    )
    assert entry["paused"] is False and entry["coalesced"] == 0
    assert entry["last_outcome"] in ("succeeded", "running", "pending")
    assert instant(entry["next_tick"]) > instant(entry["last_tick"]) >= ticks[-1].timestamp()
    table = daemon.ctl("schedules").stdout
    assert "COALESCED" in table and "Europe/Berlin" in table
    assert daemon.stop() == 0


def test_a_slow_task_on_a_fast_schedule_runs_back_to_back_without_overlap(
    taskd_factory: type[Taskd],
) -> None:
    config = (
        'grace_period = "100ms"\n'  # stopping need not wait for the last 3-second run
        '[[schedule]]\nid = "slow"\ncron = "* * * * * *"\ntasks = "slow"\n'
        "payload = { seconds = 3 }\n"
    )
    daemon = taskd_factory(config=config).start()

    def second_run_started() -> bool:
        jobs = jobs_of(daemon, "slow")
        return len(jobs) >= 2 and jobs[1].started_at is not None

    wait_until(second_run_started, timeout=15, what="the second run")
    jobs = jobs_of(daemon, "slow")
    first, second = jobs[0], jobs[1]
    assert first.finished_at is not None and second.started_at is not None
    assert first.finished_at <= second.started_at  # never two at once
    # 3 s of asyncio.sleep, give or take the loop timers' millisecond (wall-clock stamps)
    assert first.finished_at - first.started_at >= 3 - 0.01  # type: ignore[operator]
    assert tick_of(second) > first.finished_at - 1  # the first tick after the run ended
    assert sum(job.status == "running" for job in jobs) <= 1
    entry = schedules(daemon)["slow"]
    assert entry["coalesced"] >= 2  # the ticks during the first run joined it
    assert "joined it" in daemon.log
    assert daemon.stop() == 0


CATCH_UP = """
[[schedule]]
id = "skip"
cron = "* * * * * *"
tasks = "echo"

[[schedule]]
id = "latest"
cron = "* * * * * *"
tasks = "db"
catch_up = "latest"

[[schedule]]
id = "all"
cron = "* * * * * *"
tasks = "nested:deep:send-it"
catch_up = "all"
max_catch_up = 3
"""
TASK_OF = {"skip": "echo", "latest": "db", "all": "nested:deep:send-it"}


def test_catch_up_after_a_stop_across_missed_ticks(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config=CATCH_UP).start()
    for task in TASK_OF.values():
        wait_until(lambda task=task: jobs_of(daemon, task), timeout=10, what=f"a tick of {task}")
    assert daemon.stop() == 0
    last_tick = max(map(tick_of, daemon.stored_jobs()))
    wait_for_clock(last_tick + 4)  # at least four ticks pass while taskd is down
    restarted_at = time.time()
    daemon.start()
    # The scheduler's first look after the restart finds the ticks missed up to it (a
    # start-up slowed by a loaded machine may look a tick or two later): the log says which.
    last_missed = {}
    for name in TASK_OF:
        pattern = rf'schedule "{name}" missed its ticks at (\S+)(?: to (\S+))? \('
        wait_until(
            lambda pattern=pattern: re.search(pattern, daemon.log) is not None,
            what=f"the scheduler's look at {name}",
        )
        found = re.search(pattern, daemon.log)
        assert found is not None
        last_missed[name] = instant(found.group(2) or found.group(1))
    covered = "catch_up = latest: not firing them" in daemon.log
    expected_catch_up = {"skip": 0, "latest": 0 if covered else 1, "all": 3}
    for name, task in TASK_OF.items():

        def settled(
            task: str = task, count: int = expected_catch_up[name], last: float = last_missed[name]
        ) -> bool:
            late = [t for t in map(tick_of, jobs_of(daemon, task)) if t > last]
            early = [j for j in jobs_of(daemon, task) if j.created_at > restarted_at]
            return len(late) >= 1 and len(early) - len(late) >= count

        wait_until(settled, timeout=10, what=f"{name} to catch up")
    for name, task in TASK_OF.items():
        jobs = jobs_of(daemon, task)
        before = [tick_of(job) for job in jobs if job.created_at < restarted_at]
        after = [tick_of(job) for job in jobs if job.created_at > restarted_at]
        last = last_missed[name]
        missed = [float(t) for t in range(math.floor(max(before)) + 1, math.floor(last) + 1)]
        assert len(missed) >= 4 and missed[-1] == last, (name, missed, last)
        caught_up = [tick for tick in after if tick <= last]
        latest = [] if covered else missed[-1:]
        assert caught_up == {"skip": [], "latest": latest, "all": missed[-3:]}[name], name
        regular = [tick for tick in after if tick > last]
        assert regular[0] == last + 1  # then every tick, as before
        assert regular == [regular[0] + n for n in range(len(regular))]
    assert "catch_up = skip: not firing them" in daemon.log
    assert "catch_up = all: firing 3 of them" in daemon.log
    assert daemon.stop() == 0


def test_a_kill_right_after_a_tick_fired_does_not_fire_it_again(
    taskd_factory: type[Taskd],
) -> None:
    # kill -9 just after the tick's jobs were committed, before anything else was written:
    # the restart catches up the ticks missed since, and not that one.
    config = '[[schedule]]\ncron = "* * * * * *"\ntasks = "echo"\ncatch_up = "all"\n'
    daemon = taskd_factory(config=config)
    daemon.start(env={"TASKD_TEST_CRASH_AT": "tick-fired"}, wait=False)
    assert daemon.process is not None
    assert daemon.process.wait(30) == -signal.SIGKILL, daemon.log
    daemon.close()
    (fired,) = daemon.stored_jobs()  # the tick's job was committed before the kill
    killed_at = tick_of(fired)
    # Ended, so that firing its tick again would start a job of its own, not join this one.
    daemon.in_store(lambda store: store.cancel(fired.id))
    wait_for_clock(killed_at + 2)  # at least one tick is missed while taskd is down
    daemon.start()
    wait_until(lambda: len(jobs_of(daemon, "echo")) >= 4, timeout=15, what="ticks after restart")
    ticks = [tick_of(job) for job in jobs_of(daemon, "echo")]
    assert ticks.count(killed_at) == 1 and len(ticks) == len(set(ticks)), ticks
    assert ticks[1] == killed_at + 1  # the missed ones were caught up, from the next one
    assert daemon.stop() == 0


def work_schedule(log: Path, jitter: float = 0.0) -> str:
    """An every-second schedule of the fixture task `work`, which logs each run's job id."""
    extra = f"jitter = {jitter}\n" if jitter else ""
    return (
        '[[schedule]]\nid = "each"\ncron = "* * * * * *"\ntasks = "work"\n'
        f'payload = {{ log = "{log}" }}\n{extra}'
    )


def runs(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def test_a_tick_is_committed_ahead_of_its_time_and_starts_at_it(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    log = short_tmp / "runs.log"
    daemon = taskd_factory(config=work_schedule(log)).start()
    wait_until(lambda: len(runs(log)) >= 3, timeout=15, what="three ticks run")
    assert daemon.stop() == 0
    # Read once stopped: a run may have been logged but not yet recorded a moment before.
    jobs = [job for job in daemon.stored_jobs("succeeded") if job.task == "work"]
    ahead = [job for job in jobs if job.created_at < tick_of(job)]
    assert ahead, [(job.created_at, tick_of(job)) for job in jobs]  # the first may be late
    for job in ahead:  # committed (the store's clock) before the tick, started at it
        assert tick_of(job) - job.created_at <= EARLY + 0.05
        assert job.started_at is not None and job.started_at >= tick_of(job)
        assert job.attempts == 1
    assert sorted(runs(log)) == sorted(job.id for job in jobs)  # each ran once


def test_a_kill_between_a_tick_fired_ahead_and_its_time_runs_it_once_on_restart(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    # kill -9 right after the tick's job was committed and held for this daemon, before
    # the tick: the restart (its worker gone) puts the job back, due at the tick, and runs
    # it once, its attempt not counted twice.
    log = short_tmp / "runs.log"
    config = "lease = 1\n" + work_schedule(log)
    daemon = taskd_factory(config=config)
    daemon.start(env={"TASKD_TEST_CRASH_AT": "tick-held"}, wait=False)
    assert daemon.process is not None
    assert daemon.process.wait(30) == -signal.SIGKILL, daemon.log
    killed_at = time.time()
    daemon.close()
    held = [job for job in daemon.stored_jobs() if job.status == "running"]
    assert len(held) == 1 and held[0].started_at is None, daemon.stored_jobs()
    (job,) = held
    assert job.created_at < tick_of(job)  # committed ahead of the tick
    assert runs(log) == []  # and never started
    daemon.start()
    wait_until(lambda: job.id in runs(log), timeout=20, what="the held tick to run")
    with daemon.client() as client:
        again = client.job(job.id)
        again = client.wait(job.id, timeout=10) if again.status != "succeeded" else again
    assert again.status == "succeeded" and again.attempts == 1 and again.crashes == 0, again
    assert again.started_at is not None and again.started_at > killed_at
    ticks = [tick_of(j) for j in jobs_of(daemon, "work")]
    assert ticks.count(tick_of(job)) == 1, ticks  # the tick fired once
    assert daemon.stop() == 0
    assert runs(log).count(job.id) == 1


def test_pausing_a_schedule_withdraws_its_tick_fired_ahead(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    # With jitter the held job waits up to 5 s past its tick: time to pause it.
    log = short_tmp / "runs.log"
    daemon = taskd_factory(config=work_schedule(log, jitter=5)).start()

    def held() -> Job | None:
        waiting = [
            job
            for job in jobs_of(daemon, "work")
            if job.status == "running" and job.started_at is None and job.run_at > time.time() + 2
        ]
        return waiting[0] if waiting else None

    job = wait_until(held, timeout=60, what="a job held for its jittered tick")
    paused = daemon.ctl("schedules", "pause", "each")
    assert paused.returncode == 0, paused.stderr
    with daemon.client() as client:
        assert client.job(job.id).status == "cancelled"
    wait_for_clock(job.run_at + 1)  # past its time: it did not start
    assert job.id not in runs(log)
    with daemon.client() as client:
        assert client.job(job.id).status == "cancelled"
    assert all(j.status == "cancelled" for j in jobs_of(daemon, "work") if j.id not in runs(log))
    assert daemon.stop() == 0


def test_a_reload_that_changes_a_schedule_withdraws_its_tick_fired_ahead(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    log, other = short_tmp / "runs.log", short_tmp / "other.log"
    daemon = taskd_factory(config=work_schedule(log, jitter=5)).start()

    def held() -> Job | None:
        waiting = [
            job
            for job in jobs_of(daemon, "work")
            if job.status == "running" and job.started_at is None and job.run_at > time.time() + 2
        ]
        return waiting[0] if waiting else None

    job = wait_until(held, timeout=60, what="a job held for its jittered tick")
    daemon.config_file.write_text(work_schedule(other, jitter=5))  # another payload
    reloaded = daemon.ctl("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    with daemon.client() as client:
        assert client.job(job.id).status == "cancelled"
    wait_for_clock(job.run_at + 1)
    assert job.id not in runs(log) and job.id not in runs(other)
    assert "fired ahead, withdrawn" in daemon.log
    assert daemon.stop() == 0


def test_pause_survives_a_restart_and_resume_does_not_catch_up(
    taskd_factory: type[Taskd],
) -> None:
    # "db" every second too: its ticks show that the scheduler went past a tick of echo's.
    config = '[scheduled_tasks]\n"* * * * * *" = "echo"\n"*/1 * * * * *" = "db"\n'
    daemon = taskd_factory(config=config).start()
    wait_until(lambda: jobs_of(daemon, "echo"), timeout=10, what="a tick")
    paused = daemon.ctl("schedules", "pause", "* * * * * *")
    assert paused.returncode == 0, paused.stderr
    assert 'schedule "* * * * * *" is paused' in paused.stdout
    count = len(jobs_of(daemon, "echo"))
    assert daemon.stop() == 0
    daemon.start()
    entry = schedules(daemon)["* * * * * *"]
    assert entry["paused"] is True and entry["next_tick"] is None
    assert "paused" in daemon.ctl("schedules").stdout
    restarted_at = time.time()

    def a_later_tick_fired() -> bool:  # echo's tick would have come round by now
        return any(tick_of(job) >= math.floor(restarted_at) + 2 for job in jobs_of(daemon, "db"))

    wait_until(a_later_tick_fired, timeout=10, what="a tick of the other schedule")
    assert len(jobs_of(daemon, "echo")) == count
    resumed_at = time.time()
    resumed = daemon.ctl("schedules", "resume", "*", "*", "*", "*", "*", "*")  # unquoted works
    assert resumed.returncode == 0 and "is active; next tick" in resumed.stdout
    wait_until(lambda: len(jobs_of(daemon, "echo")) > count, timeout=10, what="a tick")
    assert all(tick_of(job) > resumed_at for job in jobs_of(daemon, "echo")[count:])
    assert daemon.stop() == 0


def test_trigger_fires_now_and_unknown_schedules_exit_4(taskd_factory: type[Taskd]) -> None:
    config = '[[schedule]]\nid = "new-year"\ncron = "0 0 1 1 *"\ntasks = ["echo", "db"]\n'
    daemon = taskd_factory(config=config).start()
    before = schedules(daemon)["new-year"]
    triggered = daemon.ctl("schedules", "trigger", "new-year")
    assert triggered.returncode == 0, triggered.stderr
    assert "echo: started job" in triggered.stdout and "db: started job" in triggered.stdout
    (job,) = jobs_of(daemon, "echo")
    assert job.payload["cron"] == "0 0 1 1 *" and abs(tick_of(job) - time.time()) < 10
    after = schedules(daemon)["new-year"]
    assert after["next_tick"] == before["next_tick"] and after["last_tick"] is None
    assert after["fired_at"] is not None and {j["task"] for j in after["last_jobs"]} == {
        "echo", "db",
    }  # fmt: skip
    by_expression = daemon.ctl("--json", "schedules", "trigger", "0 0 1 1 *")
    assert by_expression.returncode == 0 and json.loads(by_expression.stdout)["id"] == "new-year"
    for action in ("pause", "resume", "trigger"):
        unknown = daemon.ctl("schedules", action, "no-such-schedule")
        assert unknown.returncode == 4, unknown.stderr
        assert 'no schedule with the id or expression "no-such-schedule"' in unknown.stderr
    assert daemon.stop() == 0


STRICT_TASK = """
import msgspec
from taskd import TaskContext, define_task


class Report(msgspec.Struct, forbid_unknown_fields=True):
    sections: int = 3


@define_task
async def report(payload: Report, ctx: TaskContext) -> dict:
    when = ctx.scheduled_time
    return {"sections": payload.sections, "cron": ctx.cron,
            "scheduled_time": when.isoformat() if when else None}
"""


def test_a_strict_payload_type_takes_ticks_and_reads_them_from_ctx(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    tasks = short_tmp / "tasks"
    tasks.mkdir()
    (tasks / "report.py").write_text(STRICT_TASK)
    config = (
        '[[schedule]]\nid = "daily"\ncron = "0 6 * * *"\ntasks = "report"\n'
        'timezone = "Europe/Berlin"\npayload = { sections = 2 }\n'
    )
    daemon = taskd_factory(tasks=tasks, config=config).start()  # the schedule's check passes
    assert daemon.ctl("schedules", "trigger", "daily").returncode == 0
    (job,) = jobs_of(daemon, "report")
    with daemon.client() as client:
        done = client.wait(job.id, timeout=30)
    assert done.status == "succeeded", done.error
    result = done.result
    assert result == {
        "sections": 2,
        "cron": "0 6 * * *",
        "scheduled_time": job.payload["scheduled_time"],
    }
    assert dt.datetime.fromisoformat(result["scheduled_time"]).utcoffset() in (
        dt.timedelta(hours=1), dt.timedelta(hours=2),
    )  # fmt: skip
    ran = daemon.ctl("run", "report")  # not a tick: neither is set
    assert json.loads(ran.stdout) == {"sections": 3, "cron": None, "scheduled_time": None}
    assert daemon.stop() == 0


def test_reload_replaces_schedules_and_a_bad_one_keeps_the_old(
    taskd_factory: type[Taskd],
) -> None:
    daemon = taskd_factory(config='[scheduled_tasks]\n"@hourly" = "echo"\n"@startup" = "db"\n')
    daemon.start()
    wait_until(lambda: jobs_of(daemon, "db"), timeout=10, what="the @startup run")
    for broken, message in (
        ('"61 * * * *" = "echo"', '"61 * * * *": the minute field "61" is not valid'),
        ('"@daily" = "ecoh"', 'names unknown task "ecoh"; did you mean "echo"?'),
        ('"@daily" = "email"', "task email cannot accept this schedule's payload"),
    ):
        daemon.config_file.write_text(f"[scheduled_tasks]\n{broken}\n")
        refused = daemon.ctl("reload")
        assert refused.returncode == 78, refused.stderr
        assert message in refused.stderr and "running configuration stays" in refused.stderr
        assert list(schedules(daemon)) == ["@hourly", "@startup"]
    daemon.config_file.write_text(
        '[scheduled_tasks]\n"@hourly" = "echo"\n"@startup" = "db"\n"*/5 * * * *" = "echo"\n'
    )
    reloaded = daemon.ctl("reload")
    assert reloaded.returncode == 0 and "3 schedules" in reloaded.stdout
    assert list(schedules(daemon)) == ["@hourly", "@startup", "*/5 * * * *"]
    assert len(jobs_of(daemon, "db")) == 1  # @startup fires at start-up, not at reload
    assert daemon.stop() == 0
    daemon.start()
    wait_until(lambda: len(jobs_of(daemon, "db")) == 2, timeout=10, what="@startup again")
    assert [job.payload["cron"] for job in jobs_of(daemon, "db")] == ["@startup", "@startup"]
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('[scheduled_tasks]\n"*/5 * * *" = "echo"', '"*/5 * * *": 4 fields: use 5'),
        ('[scheduled_tasks]\n"@daily" = "nope"', 'names unknown task "nope"'),
        ('timezone = "Mars/Base"\n', 'unknown time zone "Mars/Base"'),
    ],
)
def test_a_bad_schedule_stops_startup(
    taskd_factory: type[Taskd], config: str, message: str
) -> None:
    daemon = taskd_factory(config=config)
    with pytest.raises(AssertionError, match="exited with 78"):
        daemon.start()
    assert message in daemon.log
