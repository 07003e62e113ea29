"""What a running task can ask of the daemon (`ctx.run_task`, `ctx.enqueue`): other jobs.

Both go through the submitter like any other request. While a task waits in `run_task`
its job lends its slot (taskd.slots), so that waiting cannot deadlock.
"""

from __future__ import annotations

from typing import Any

import msgspec

from taskd.activity import ActivityRecorder
from taskd.definition import TaskFailed
from taskd.slots import Slots
from taskd.submit import JobRequest, Submitter, encode_payload


class Runtime:
    """The daemon side of `TaskContext` (taskd.definition.TaskRuntime)."""

    def __init__(self, submitter: Submitter, slots: Slots, activity: ActivityRecorder) -> None:
        self._submitter = submitter
        self._slots = slots
        self.progress = activity.progress
        self.log = activity.log

    async def run_task(
        self, parent_id: int, name: str, payload: Any, key: str | None, traceparent: str | None
    ) -> Any:
        request = JobRequest(
            task=name,
            payload=encode_payload(payload),
            origin="task",
            single_flight=True,
            key=key,
            parent_id=parent_id,
            traceparent=traceparent,
        )
        (inserted,) = await self._submitter.submit([request])
        if inserted.job_id == parent_id:
            raise RuntimeError(f"task {name} cannot run_task itself; enqueue it instead")
        async with self._slots.lend(parent_id):
            job = await self._submitter.wait(inserted.job_id)
        if job.status != "succeeded":
            raise TaskFailed(job.id, job.task, job.error or job.status)
        return None if job.result is None else msgspec.msgpack.decode(job.result)

    async def enqueue(
        self, parent_id: int, name: str, payload: Any, options: dict[str, Any]
    ) -> int:
        request = JobRequest(
            task=name,
            payload=encode_payload(payload),
            origin="task",
            parent_id=parent_id,
            **options,
        )
        (inserted,) = await self._submitter.submit([request])
        return inserted.job_id
