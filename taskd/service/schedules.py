"""The methods on tasks and schedules: list them, and pause, resume or trigger a schedule."""

from __future__ import annotations

from taskd import protocol
from taskd.models import ScheduleInfo, TaskInfo
from taskd.protocol import (
    ListTasksParams,
    PauseScheduleParams,
    ResumeScheduleParams,
    SchedulesParams,
    TriggerScheduleParams,
)
from taskd.scheduler import Scheduler
from taskd.service.dispatch import Binding, bind
from taskd.tasks import TaskRegistry


class ScheduleMethods:
    """The loaded tasks with their schedules, and the schedules themselves."""

    def __init__(self, scheduler: Scheduler, tasks: TaskRegistry) -> None:
        self._scheduler = scheduler
        self._tasks = tasks

    def bindings(self) -> list[Binding]:
        return [
            bind(protocol.LIST_TASKS, self.list_tasks),
            bind(protocol.SCHEDULES, self.schedules),
            bind(protocol.PAUSE_SCHEDULE, self.pause),
            bind(protocol.RESUME_SCHEDULE, self.resume),
            bind(protocol.TRIGGER_SCHEDULE, self.trigger),
        ]

    async def list_tasks(self, params: ListTasksParams) -> list[TaskInfo]:
        schedules = self._scheduler.task_schedules()
        return [task.info(*schedules.get(task.name, ([], None))) for task in self._tasks]

    async def schedules(self, params: SchedulesParams) -> list[ScheduleInfo]:
        return await self._scheduler.schedules()

    async def pause(self, params: PauseScheduleParams) -> ScheduleInfo:
        return await self._scheduler.pause(params.schedule)

    async def resume(self, params: ResumeScheduleParams) -> ScheduleInfo:
        return await self._scheduler.resume(params.schedule)

    async def trigger(self, params: TriggerScheduleParams) -> ScheduleInfo:
        return await self._scheduler.trigger(params.schedule)
