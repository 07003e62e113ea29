"""The scheduler over every store backend, driven by an injected clock: no real waiting."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest

from taskd.config import Config, load_config
from taskd.daemon import Engine, build_engine
from taskd.models import WEBHOOK_TASK, Job, WebhookRule
from taskd.news import DaemonNews
from taskd.scheduler import (
    MISSED_COUNTED,
    MISSED_LISTED,
    AmbiguousSchedule,
    Scheduler,
    UnknownSchedule,
    plan_firings,
)
from taskd.schedules import ScheduleSpec, load_schedules
from taskd.store import JobFilter, ScheduleState, Store
from taskd.submit import Submitter
from taskd.tasks import TaskRegistry, load_tasks
from tests.support import FIXTURE_TASKS, Clock

T = dt.datetime(2026, 6, 1, 10, 0, tzinfo=dt.UTC).timestamp()  # a whole minute, UTC
EVERY_SECOND = '[scheduled_tasks]\n"* * * * * *" = "echo"\n'
MISSED_RULE = WebhookRule("http://127.0.0.1:9/hooks", frozenset({"schedule.missed"}), ("e*",))


class Harness:
    """A store, the tasks, and schedulers made over them with the store's fake clock."""

    def __init__(
        self, store: Store, clock: Clock, registry: TaskRegistry, worker: str, tmp_path: Path
    ) -> None:
        self.store = store
        self.registry = registry
        self.tmp_path = tmp_path
        self.clock = clock
        self.clock.now = T + 0.2
        self.worker = worker
        self.submitter = Submitter(store, registry)
        self.finish_jobs = True  # run the jobs each step fires to their end
        self.engine = self.make_engine()

    def specs(self, text: str) -> list[ScheduleSpec]:
        file = self.tmp_path / "taskd.toml"
        file.write_text(text)
        config, _ = load_config(file)
        return load_schedules(config, self.registry)

    async def scheduler(self, text: str, started_at: float | None = None) -> Scheduler:
        # Ticks fire at their time (early=0): the tests step the clock to exact moments.
        scheduler = Scheduler(
            self.store, self.submitter, started_at=started_at, clock=self.clock, early=0.0
        )
        await scheduler.load(self.specs(text))
        return scheduler

    async def at(self, scheduler: Scheduler, moment: float) -> float | None:
        """Set the clock, fire what is due, and (unless told not to) run the jobs."""
        self.clock.now = moment
        delay = await scheduler.run_due()
        await self.finish()
        return delay

    async def finish(self) -> None:
        if self.finish_jobs:
            await asyncio.wait_for(self.engine.executor.run(until_idle=True), 10)

    async def jobs(self, task: str | None = None) -> list[Job]:
        return list(reversed(await self.store.list_jobs(JobFilter(task=task, limit=1000))))

    async def ticks(self, task: str | None = None) -> list[float]:
        """The scheduled_time of each job's payload, oldest job first, as Unix seconds."""
        return [scheduled(job) for job in await self.jobs(task)]

    async def state(self, schedule_id: str) -> ScheduleState:
        states = {s.id: s for s in await self.store.schedule_states()}
        return states[schedule_id]

    def make_engine(self) -> Engine:
        config = Config(workers=4, lease=30, quarantine_after=3, max_stuck_threads=4)
        return build_engine(self.store, self.registry, DaemonNews(), self.worker, config)


def payload(job: Job) -> dict[str, object]:
    decoded = msgspec.msgpack.decode(job.payload)
    assert isinstance(decoded, dict)
    return decoded


def scheduled(job: Job) -> float:
    return dt.datetime.fromisoformat(str(payload(job)["scheduled_time"])).timestamp()


@pytest.fixture
async def harness(store: Store, clock: Clock, tmp_path: Path) -> AsyncIterator[Harness]:
    worker = await store.register_node("test", ttl=30)
    made = Harness(store, clock, load_tasks(FIXTURE_TASKS), worker, tmp_path)
    yield made
    await made.engine.stop(5)


@pytest.fixture
async def running(harness: Harness) -> AsyncIterator[Callable[[], Engine]]:
    """Runs an executor in the background for tests whose jobs must finish."""
    started: list[tuple[Engine, asyncio.Task[None]]] = []

    def start() -> Engine:
        harness.finish_jobs = False
        engine = harness.make_engine()
        started.append((engine, asyncio.create_task(engine.executor.run())))
        return engine

    yield start
    for engine, task in started:
        await engine.stop(5)
        await task


# -- the pure rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("catch_up", "due", "expected"),
    [
        ("skip", [1.0, 2.0, 3.0], ([], None)),  # all missed: nothing
        ("skip", [1.0, 2.0, 10.0], ([], 10.0)),  # the latest is on time
        ("latest", [1.0, 2.0, 3.0], ([3.0], None)),
        ("latest", [1.0, 2.0, 10.0], ([], 10.0)),  # the on-time run covers the missed ones
        ("all", [1.0, 2.0, 3.0, 4.0], ([2.0, 3.0, 4.0], None)),  # max 3, the latest ones
        ("all", [1.0, 2.0, 10.0], ([1.0, 2.0], 10.0)),
        ("all", [], ([], None)),
    ],
)
def test_plan_firings(
    catch_up: str, due: list[float], expected: tuple[list[float], float | None]
) -> None:
    assert plan_firings(catch_up, 3, due, on_time_after=5.0) == expected  # type: ignore[arg-type]


# -- ticks --------------------------------------------------------------------------------


async def test_each_tick_fires_a_job_with_its_own_scheduled_time(harness: Harness) -> None:
    scheduler = await harness.scheduler(EVERY_SECOND, started_at=T)
    assert await harness.at(scheduler, T + 0.2) == pytest.approx(0.8)  # sleep until T+1
    assert await harness.jobs() == []
    for second in (1, 2, 3):
        assert await harness.at(scheduler, T + second + 0.001) == pytest.approx(0.999)
    jobs = await harness.jobs("echo")
    assert [scheduled(job) for job in jobs] == [T + 1, T + 2, T + 3]
    assert payload(jobs[0]) == {
        "scheduled_time": "2026-06-01T10:00:01+00:00",
        "cron": "* * * * * *",
    }
    assert {job.origin for job in jobs} == {"schedule"}
    assert [job.created_at for job in jobs] == [T + 1.001, T + 2.001, T + 3.001]
    state = await harness.state("* * * * * *")
    assert (state.last_tick, state.covered_until, state.coalesced) == (T + 3, T + 3.001, 0)


async def test_time_zone_and_static_payload(harness: Harness) -> None:
    harness.clock.now = T - 1
    scheduler = await harness.scheduler(
        '[[schedule]]\ncron = "0 12 * * *"\ntasks = "slow"\ntimezone = "Europe/Berlin"\n'
        "payload = { seconds = 0 }\n"
    )
    (info,) = await scheduler.schedules()
    assert info.next_tick == T  # 12:00 in Berlin (CEST) is 10:00 UTC
    await harness.at(scheduler, T + 0.01)
    (job,) = await harness.jobs()
    assert payload(job) == {
        "scheduled_time": "2026-06-01T12:00:00+02:00", "cron": "0 12 * * *", "seconds": 0,
    }  # fmt: skip


async def test_a_tick_joins_the_run_still_pending(harness: Harness) -> None:
    harness.finish_jobs = False  # nothing executes jobs: the first stays pending
    scheduler = await harness.scheduler(EVERY_SECOND, started_at=T)
    for second in (1, 2, 3):
        await harness.at(scheduler, T + second)
    (job,) = await harness.jobs()
    assert scheduled(job) == T + 1 and job.status == "pending"
    (info,) = await scheduler.schedules()
    assert info.coalesced == 2 and info.last_outcome == "pending"
    assert [(j.id, j.joined) for j in info.last_jobs] == [(job.id, True)]
    assert (await harness.state(info.id)).coalesced == 2  # persisted


async def test_several_tasks_run_as_separate_jobs_and_one_failing_spares_the_others(
    harness: Harness,
) -> None:
    scheduler = await harness.scheduler('[scheduled_tasks]\n"* * * * *" = ["echo", "fail"]\n')
    await harness.at(scheduler, T + 60)
    jobs = {job.task: job for job in await harness.jobs()}
    assert (jobs["echo"].status, jobs["fail"].status) == ("succeeded", "failed")
    assert scheduled(jobs["echo"]) == scheduled(jobs["fail"]) == T + 60
    (info,) = await scheduler.schedules()
    assert info.last_outcome == "failed"
    assert {(j.task, j.status) for j in info.last_jobs} == {
        ("echo", "succeeded"), ("fail", "failed"),
    }  # fmt: skip


# -- missed ticks --------------------------------------------------------------------------


async def restart_after_downtime(harness: Harness, catch_up: str, max_catch_up: int = 3) -> None:
    """Fire T+1, "stop" until T+10.5, start a new scheduler: ticks T+2..T+10 were missed."""
    text = (
        f'[[schedule]]\ncron = "* * * * * *"\ntasks = "echo"\ncatch_up = "{catch_up}"\n'
        f"max_catch_up = {max_catch_up}\n"
    )
    first = await harness.scheduler(text, started_at=T)
    await harness.at(first, T + 1.001)
    for job in await harness.jobs():  # ended before the "restart", whoever runs the jobs
        await asyncio.wait_for(harness.submitter.wait(job.id), 10)
    harness.clock.now = T + 10.5
    second = await harness.scheduler(text, started_at=T + 10.5)
    await harness.at(second, T + 10.55)
    await second.settle()
    await harness.at(second, T + 11.001)


async def test_skip_fires_nothing_for_ticks_missed_while_down(harness: Harness) -> None:
    await restart_after_downtime(harness, "skip")
    assert await harness.ticks() == [T + 1, T + 11]


async def test_latest_fires_the_most_recent_missed_tick_once(harness: Harness) -> None:
    await restart_after_downtime(harness, "latest")
    assert await harness.ticks() == [T + 1, T + 10, T + 11]
    latest = (await harness.jobs())[1]
    assert latest.created_at == T + 10.55  # fired at start-up


async def test_all_fires_the_latest_missed_ticks_one_run_after_another(
    harness: Harness, running: Callable[[], Engine]
) -> None:
    running()
    await restart_after_downtime(harness, "all", max_catch_up=4)
    assert await harness.ticks() == [T + 1, T + 7, T + 8, T + 9, T + 10, T + 11]
    jobs = await harness.jobs()
    assert len({job.id for job in jobs}) == 6  # each missed tick ran, none joined another
    caught_up = jobs[1:5]
    for before, after in itertools.pairwise(caught_up):
        assert before.finished_at is not None and after.started_at is not None
        assert before.finished_at <= after.started_at  # back to back, never overlapping


def iso_utc(instant: float) -> str:
    return dt.datetime.fromtimestamp(instant, dt.UTC).isoformat()


async def missed_events(harness: Harness) -> list[dict[str, object]]:
    """The schedule parts of the schedule.missed deliveries in the store, oldest first."""
    events = []
    for job in await harness.jobs(WEBHOOK_TASK):
        delivery = payload(job)
        assert delivery["event"] == "schedule.missed", delivery
        body = msgspec.json.decode(str(delivery["body"]))
        assert body["event"] == "schedule.missed"
        events.append(body["schedule"])
    return events


@pytest.mark.parametrize(
    ("catch_up", "missed", "fired"),
    [
        ("skip", range(2, 11), None),  # T+2..T+10 went by unfired
        ("latest", range(2, 10), 10),  # T+10 fired, in the transaction that reports the rest
        ("all", range(2, 7), 7),  # T+7..T+10 caught up (max_catch_up = 4)
    ],
)
async def test_missed_ticks_are_reported_once_as_a_webhook_event(
    harness: Harness,
    running: Callable[[], Engine],
    catch_up: str,
    missed: range,
    fired: int | None,
) -> None:
    harness.store.webhooks = (MISSED_RULE,)
    if catch_up == "all":
        running()  # the caught-up ticks run one after another
    await restart_after_downtime(harness, catch_up, max_catch_up=4)
    await harness.at(await harness.scheduler(EVERY_SECOND, started_at=T + 11.5), T + 12.001)
    (event,) = await missed_events(harness)  # none for the ticks on time, none on a restart
    assert event == {
        "id": "* * * * * *",
        "tasks": ["echo"],
        "missed": [iso_utc(T + n) for n in missed],
        "count": len(missed),
        "count_exact": True,
        "last": iso_utc(T + missed[-1]),
        "fired": None if fired is None else iso_utc(T + fired),
    }


async def test_a_long_gap_lists_the_first_missed_ticks_and_counts_up_to_a_bound(
    harness: Harness,
) -> None:
    harness.store.webhooks = (MISSED_RULE,)
    scheduler = await harness.scheduler(EVERY_SECOND, started_at=T)
    await harness.at(scheduler, T + 1.001)
    await harness.at(scheduler, T + 3600.3)  # T+3600 is on time, T+2..T+3599 were missed
    (event,) = await missed_events(harness)
    assert event["missed"] == [iso_utc(T + n) for n in range(2, 2 + MISSED_LISTED)]
    assert event["count"] == MISSED_COUNTED and event["count_exact"] is False
    assert event["last"] == iso_utc(T + 3599) and event["fired"] == iso_utc(T + 3600)


async def test_two_daemons_report_the_same_missed_ticks_once(harness: Harness) -> None:
    harness.store.webhooks = (MISSED_RULE,)
    first = await harness.scheduler(EVERY_SECOND, started_at=T)
    await harness.at(first, T + 1.001)
    harness.clock.now = T + 10.5
    daemons = [await harness.scheduler(EVERY_SECOND, started_at=T + 10.5) for _ in range(2)]
    await asyncio.gather(*(daemon.run_due() for daemon in daemons))
    (event,) = await missed_events(harness)
    assert event["count"] == 9


async def test_no_rule_for_the_schedule_no_event(harness: Harness) -> None:
    harness.store.webhooks = (msgspec.structs.replace(MISSED_RULE, tasks=("reports:*",)),)
    await restart_after_downtime(harness, "skip")
    assert await missed_events(harness) == []


async def test_a_schedule_that_never_fired_catches_up_from_when_it_was_first_seen(
    harness: Harness,
) -> None:
    text = '[[schedule]]\ncron = "* * * * * *"\ntasks = "echo"\ncatch_up = "latest"\n'
    await harness.scheduler(text, started_at=T)  # seen at T+0.2, then "stopped"
    harness.clock.now = T + 5.5
    scheduler = await harness.scheduler(text, started_at=T + 5.5)
    await harness.at(scheduler, T + 5.6)
    assert await harness.ticks() == [T + 5]


async def test_a_clock_jump_forward_fires_no_burst(harness: Harness) -> None:
    scheduler = await harness.scheduler(EVERY_SECOND, started_at=T)
    await harness.at(scheduler, T + 1.001)
    await harness.at(scheduler, T + 3600.3)  # suspended for an hour, or the clock was set
    await harness.at(scheduler, T + 3601.001)
    assert await harness.ticks() == [T + 1, T + 3600, T + 3601]


async def test_a_tick_noticed_too_late_counts_as_missed(harness: Harness) -> None:
    text = '[scheduled_tasks]\n"0 * * * *" = "echo"\n'
    scheduler = await harness.scheduler(text, started_at=T)
    await harness.at(scheduler, T + 3600 + 120)  # woke two minutes after the hour
    assert await harness.ticks() == []  # catch_up = skip
    text = '[[schedule]]\ncron = "0 * * * *"\ntasks = "db"\ncatch_up = "latest"\n'
    scheduler = await harness.scheduler(text, started_at=T)
    await harness.at(scheduler, T + 2 * 3600 + 120)
    assert await harness.ticks("db") == [T + 2 * 3600]
    await harness.at(scheduler, T + 3 * 3600 + 0.5)  # half a second late is on time
    assert await harness.ticks("db") == [T + 2 * 3600, T + 3 * 3600]


async def test_a_clock_jump_backwards_never_fires_a_tick_twice(harness: Harness) -> None:
    scheduler = await harness.scheduler(EVERY_SECOND, started_at=T)
    for moment in (T + 1, T + 2, T - 100, T + 1.5, T + 2.5, T + 3):
        await harness.at(scheduler, moment)
    assert await harness.ticks() == [T + 1, T + 2, T + 3]
    harness.clock.now = T - 50  # and a restart while the clock is behind
    again = await harness.scheduler(EVERY_SECOND, started_at=T - 50)
    for moment in (T - 49, T + 3, T + 4):
        await harness.at(again, moment)
    assert await harness.ticks() == [T + 1, T + 2, T + 3, T + 4]


# -- control -------------------------------------------------------------------------------


async def test_pause_is_remembered_and_resume_does_not_catch_up(harness: Harness) -> None:
    text = '[[schedule]]\ncron = "* * * * * *"\ntasks = "echo"\ncatch_up = "all"\n'
    scheduler = await harness.scheduler(text, started_at=T)
    await harness.at(scheduler, T + 1)
    info = await scheduler.pause("* * * * * *")
    assert info.paused and info.next_tick is None
    assert await harness.at(scheduler, T + 2) is None  # nothing to wake up for
    harness.clock.now = T + 5.5  # restart: still paused, nothing caught up
    scheduler = await harness.scheduler(text, started_at=T + 5.5)
    assert (await scheduler.schedules())[0].paused
    await harness.at(scheduler, T + 6)
    harness.clock.now = T + 8.5
    info = await scheduler.resume("  *  * * * * * ")
    assert not info.paused and info.next_tick == T + 9
    harness.clock.now = T + 8.6  # and a restart right after resuming: still nothing owed
    scheduler = await harness.scheduler(text, started_at=T + 8.6)
    await harness.at(scheduler, T + 8.7)
    await harness.at(scheduler, T + 9)
    await scheduler.settle()
    assert await harness.ticks() == [T + 1, T + 9]


async def test_trigger_fires_now_and_leaves_the_schedule_alone(harness: Harness) -> None:
    harness.finish_jobs = False  # the runs stay pending
    scheduler = await harness.scheduler(
        '[[schedule]]\nid = "new-year"\ncron = "@yearly"\ntasks = ["echo", "db"]\n'
    )
    (before,) = await scheduler.schedules()
    await scheduler.pause("new-year")
    harness.clock.now = T + 42
    info = await scheduler.trigger("@yearly")  # by expression; paused or not
    assert [job.task for job in info.last_jobs] == ["echo", "db"]
    assert info.fired_at == T + 42 and info.last_tick is None
    assert {scheduled(job) for job in await harness.jobs()} == {T + 42}
    await scheduler.resume("new-year")
    assert (await scheduler.schedules())[0].next_tick == before.next_tick
    again = await scheduler.trigger("new-year")  # the first runs are still pending
    assert again.coalesced == 2 and all(job.joined for job in again.last_jobs)


async def test_unknown_and_ambiguous_references(harness: Harness) -> None:
    scheduler = await harness.scheduler(
        '[[schedule]]\nid = "a"\ncron = "@daily"\ntasks = "echo"\n'
        '[[schedule]]\nid = "b"\ncron = "@daily"\ntasks = "db"\n'
    )
    with pytest.raises(UnknownSchedule, match='no schedule with the id or expression "nope"'):
        await scheduler.pause("nope")
    with pytest.raises(AmbiguousSchedule, match='"a", "b"'):
        await scheduler.trigger("@daily")


async def test_reload_keeps_the_state_of_schedules_that_stay(harness: Harness) -> None:
    scheduler = await harness.scheduler(
        '[scheduled_tasks]\n"* * * * * *" = "echo"\n"@hourly" = "db"\n', started_at=T
    )
    await harness.at(scheduler, T + 1)
    await scheduler.pause("@hourly")
    harness.clock.now = T + 1.5
    await scheduler.replace(
        harness.specs('[scheduled_tasks]\n"* * * * * *" = ["echo", "db"]\n"@daily" = "echo"\n')
    )
    infos = {info.id: info for info in await scheduler.schedules()}
    assert list(infos) == ["* * * * * *", "@daily"]
    assert infos["* * * * * *"].last_tick == T + 1 and infos["* * * * * *"].next_tick == T + 2
    assert infos["* * * * * *"].tasks == ["echo", "db"]
    await scheduler.replace(harness.specs('[scheduled_tasks]\n"@hourly" = "db"\n'))
    (hourly,) = await scheduler.schedules()
    assert hourly.paused  # its state was kept in the store while it was gone
    assert scheduler.task_schedules() == {"db": (["@hourly"], None)}


async def test_startup_schedules_fire_once_per_start(harness: Harness) -> None:
    text = '[scheduled_tasks]\n"@startup" = "echo"\n'
    for start in (1, 2):
        scheduler = await harness.scheduler(text)
        harness.clock.now = T + start
        await scheduler.fire_startup()
        assert await harness.at(scheduler, T + start) is None  # nothing else to do, ever
    jobs = await harness.jobs()
    assert [payload(job)["cron"] for job in jobs] == ["@startup", "@startup"]
    assert [scheduled(job) for job in jobs] == [T + 1, T + 2]


async def test_the_loop_sleeps_until_woken_and_stops(harness: Harness) -> None:
    scheduler = await harness.scheduler(EVERY_SECOND + '"@startup" = "db"\n', started_at=T)
    fired = asyncio.Event()
    harness.store.events.on_due(lambda _: fired.set())
    loop = asyncio.create_task(scheduler.run())
    await asyncio.wait_for(fired.wait(), 10)  # @startup fires first
    fired.clear()
    assert len(await harness.jobs()) == 1
    harness.clock.now = T + 1.0  # the fake clock reached the tick; real time did not
    scheduler.wake()
    await asyncio.wait_for(fired.wait(), 10)
    assert await harness.ticks("echo") == [T + 1]
    await asyncio.wait_for(scheduler.stop(), 5)
    assert loop.done()
    await loop


async def test_a_resumed_schedule_wakes_the_loop(harness: Harness) -> None:
    scheduler = await harness.scheduler(EVERY_SECOND, started_at=T)
    await scheduler.pause("* * * * * *")
    fired = asyncio.Event()
    harness.store.events.on_due(lambda _: fired.set())
    loop = asyncio.create_task(scheduler.run())
    await asyncio.sleep(0)  # the loop runs until it sleeps its longest: nothing ticks
    harness.clock.now = T + 5.9
    await scheduler.resume("* * * * * *")  # next tick T+6, a tenth of a second away
    harness.clock.now = T + 6.0
    await asyncio.wait_for(fired.wait(), 10)  # not after the 30 s sleep
    assert await harness.ticks() == [T + 6]
    await scheduler.stop()
    await loop


# -- several daemons on one store ----------------------------------------------------------


async def test_a_tick_fires_once_however_many_schedulers_run_it(harness: Harness) -> None:
    here = await harness.scheduler(EVERY_SECOND, started_at=T)
    there = await harness.scheduler(EVERY_SECOND, started_at=T)  # another daemon
    harness.clock.now = T + 1.001
    await asyncio.gather(here.run_due(), there.run_due())  # both see T+1 due at once
    await harness.finish()
    await harness.at(there, T + 2.001)
    assert await here.run_due() == pytest.approx(0.999)  # T+2 is dealt with: next is T+3
    await harness.at(here, T + 5.5)  # T+3, T+4 missed (skip), T+5 on time
    await harness.at(there, T + 5.5)
    assert await harness.ticks() == [T + 1, T + 2, T + 5]
    infos = [(await s.schedules())[0] for s in (here, there)]
    assert [(i.last_tick, i.next_tick, i.coalesced) for i in infos] == [(T + 5, T + 6, 0)] * 2


async def test_pause_and_resume_are_shared_through_the_store(harness: Harness) -> None:
    here = await harness.scheduler(EVERY_SECOND, started_at=T)
    there = await harness.scheduler(EVERY_SECOND, started_at=T)
    await harness.at(here, T + 1)
    await there.pause("* * * * * *")
    await harness.at(here, T + 2)  # here reads the state before firing: paused
    assert await harness.ticks() == [T + 1]
    assert (await here.schedules())[0].paused
    harness.clock.now = T + 4.5
    await there.resume("* * * * * *")
    (info,) = await here.schedules()  # here learns of it when it reads the state
    assert not info.paused and info.next_tick == T + 5
    await harness.at(here, T + 5)
    assert await harness.ticks() == [T + 1, T + 5]
