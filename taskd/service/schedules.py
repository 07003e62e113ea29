"""The methods on tasks and schedules: list them, pause or resume a task, and pause, resume
or trigger a schedule."""

from __future__ import annotations

import logging

import msgspec

from taskd import protocol
from taskd.models import ScheduleInfo, TaskInfo
from taskd.protocol import (
    ListTasksParams,
    PauseScheduleParams,
    PauseTaskParams,
    ResumeScheduleParams,
    ResumeTaskParams,
    SchedulesParams,
    TaskPauseResult,
    TriggerScheduleParams,
)
from taskd.scheduler import Scheduler
from taskd.service.dispatch import Binding, bind
from taskd.store import Store
from taskd.submit import UnknownTask
from taskd.tasks import TaskRegistry

logger = logging.getLogger(__name__)


class ScheduleMethods:
    """The loaded tasks with their schedules and whether they are paused, and the schedules
    themselves."""

    def __init__(self, scheduler: Scheduler, tasks: TaskRegistry, store: Store) -> None:
        self._scheduler = scheduler
        self._tasks = tasks
        self._store = store

    def bindings(self) -> list[Binding]:
        return [
            bind(protocol.LIST_TASKS, self.list_tasks),
            bind(protocol.SCHEDULES, self.schedules),
            bind(protocol.PAUSE_SCHEDULE, self.pause),
            bind(protocol.RESUME_SCHEDULE, self.resume),
            bind(protocol.TRIGGER_SCHEDULE, self.trigger),
            bind(protocol.PAUSE_TASK, self.pause_task),
            bind(protocol.RESUME_TASK, self.resume_task),
        ]

    async def list_tasks(self, params: ListTasksParams) -> list[TaskInfo]:
        schedules = self._scheduler.task_schedules()
        paused = await self._store.paused_tasks()
        return [
            msgspec.structs.replace(
                task.info(*schedules.get(task.name, ([], None))),
                paused_since=paused.get(task.name),
            )
            for task in self._tasks
        ]

    async def pause_task(self, params: PauseTaskParams) -> TaskPauseResult:
        """No new attempt of the task starts, on any daemon sharing the store."""
        if self._tasks.get(params.task) is None:
            raise UnknownTask(params.task, self._tasks.names())
        before = (await self._store.paused_tasks()).get(params.task)
        since = await self._store.set_task_paused(params.task, True)
        if before is None:
            logger.info("task %s paused: no new job of it starts until it is resumed", params.task)
        return TaskPauseResult(params.task, since, changed=before is None)

    async def resume_task(self, params: ResumeTaskParams) -> TaskPauseResult:
        """The task's jobs start again (a task paused and since unloaded may be resumed)."""
        before = (await self._store.paused_tasks()).get(params.task)
        if before is None and self._tasks.get(params.task) is None:
            raise UnknownTask(params.task, self._tasks.names())
        await self._store.set_task_paused(params.task, False)
        if before is not None:
            logger.info("task %s resumed", params.task)
        return TaskPauseResult(params.task, None, changed=before is not None)

    async def schedules(self, params: SchedulesParams) -> list[ScheduleInfo]:
        return await self._scheduler.schedules()

    async def pause(self, params: PauseScheduleParams) -> ScheduleInfo:
        return await self._scheduler.pause(params.schedule)

    async def resume(self, params: ResumeScheduleParams) -> ScheduleInfo:
        return await self._scheduler.resume(params.schedule)

    async def trigger(self, params: TriggerScheduleParams) -> ScheduleInfo:
        return await self._scheduler.trigger(params.schedule)
