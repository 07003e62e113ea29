"""What a failed attempt comes to: the job's error (message and traceback, bounded), logged
with its task and job, and either another attempt after its backoff or the job's failure."""

from __future__ import annotations

import logging
import os
import random
import traceback
from typing import Literal

from taskd.models import Job, cut_utf8
from taskd.policy import DEFAULT_BACKOFF, DEFAULT_MAX_BACKOFF, backoff_delay
from taskd.store import Failure, Outcome
from taskd.tasks import Task

logger = logging.getLogger("taskd.executor")  # the name operators know these lines by

# An attempt's error is kept with the job: its message and traceback are bounded, so that
# a job's errors fit in a reply (the most relevant frames of a traceback are the last).
MAX_ERROR_MESSAGE = 4096  # bytes of UTF-8
MAX_TRACEBACK = 16384  # bytes of UTF-8: its last ones
TASKD_FILES = os.path.dirname(__file__) + os.sep


def failed(
    job: Job,
    task: Task | None,
    kind: Literal["error", "timeout"],
    message: str,
    *,
    worker: str,
    exc: BaseException | None = None,
    final: bool = False,
    delay: float | None = None,
) -> Outcome:
    """The outcome of a failed attempt: "retry" after `delay` (else the task's backoff)
    while attempts are left and the failure is not `final`, else "failed"."""
    trace = _task_traceback(exc) if exc is not None else None
    if trace is not None:
        trace = cut_utf8(trace, MAX_TRACEBACK, mark="...\n", keep_end=True)
    message = cut_utf8(message, MAX_ERROR_MESSAGE)
    error = Failure(kind, message, trace)
    where = f"job {job.id} {job.task} attempt {job.attempts}/{job.max_attempts}"
    if final or task is None or job.attempts >= job.max_attempts:
        logger.error("%s failed: %s%s", where, message, _indent(trace), extra=_fields(job))
        return Outcome(job.id, job.epoch, worker, "failed", error=error, job=job)
    if delay is None:
        delay = backoff_delay(
            job.attempts,
            task.backoff if task.backoff is not None else DEFAULT_BACKOFF,
            task.max_backoff if task.max_backoff is not None else DEFAULT_MAX_BACKOFF,
            random.random(),
        )
    logger.warning(
        "%s failed, retrying in %.1fs: %s%s",
        where,
        delay,
        message,
        _indent(trace),
        extra=_fields(job),
    )
    return Outcome(job.id, job.epoch, worker, "retry", error=error, retry_in=delay, job=job)


def describe(exc: BaseException) -> str:
    """An exception as its error message: its type, and its text if it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _task_traceback(exc: BaseException) -> str:
    """The traceback from the task's own code on: taskd's frames that called it are noise
    to the person reading why their task failed."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(TASKD_FILES):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def _fields(job: Job) -> dict[str, object]:
    """The task and job of a log line, for log_format = "json"."""
    return {"task": job.task, "job_id": job.id}


def _indent(trace: str | None) -> str:
    return "" if not trace else "\n" + trace.rstrip()
