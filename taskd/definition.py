"""What a task file uses: `define_task`, `TaskContext`, and the `Retry`/`Fail` signals."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from taskd.models import SINGLE_FLIGHT_MODES, check_limit_key, parse_duration, parse_rate
from taskd.traceparent import current_traceparent

if TYPE_CHECKING:  # logging costs milliseconds that taskctl, which imports taskd, does not pay
    import datetime
    import logging


class Retry(Exception):
    """Raise in a task to try it again after `in_` (seconds or "30s"), or after the backoff.

    The attempt counts: when the job has no attempts left it fails with this message.
    """

    def __init__(
        self, message: str = "the task asked to be retried", *, in_: float | str | None = None
    ):
        super().__init__(message)
        self.delay = None if in_ is None else _seconds(in_, "Retry(in_=...)")


class Fail(Exception):
    """Raise in a task to fail the job now, without the retries it has left."""


class TaskRuntime(Protocol):
    """What a running task can ask of the daemon (taskd.runtime.Runtime provides it)."""

    async def run_task(
        self, parent_id: int, name: str, payload: Any, key: str | None, traceparent: str | None
    ) -> Any: ...

    async def enqueue(
        self, parent_id: int, name: str, payload: Any, options: dict[str, Any]
    ) -> int: ...

    def progress(self, job_id: int, done: float, total: float | None, message: str | None) -> None:
        """Note a job's progress (callable from any thread)."""

    def log(self, job_id: int, level: str, message: str) -> None:
        """Keep a line with the job (callable from any thread)."""


class TaskContext:
    """Passed to a task as its second argument: who it is, and a way to start other tasks.

    In a job a schedule started, `scheduled_time` is the tick's time (an aware datetime in
    the schedule's zone; for @startup and a trigger, when it fired) and `cron` the
    schedule's expression; both are None in other jobs.

    `traceparent` is the W3C traceparent of this attempt's span where taskd traces
    (README, "Tracing"), else the one the job was created with, else None. The jobs the
    task starts (`run_task`, `enqueue`) carry the current span's, which is the attempt's
    unless the task made spans of its own.
    """

    __slots__ = (
        "_logger",
        "_runtime",
        "attempt",
        "cron",
        "job_id",
        "max_attempts",
        "name",
        "scheduled_time",
        "traceparent",
    )

    def __init__(
        self, name: str, job_id: int, attempt: int, max_attempts: int, runtime: TaskRuntime
    ) -> None:
        self.name = name
        self.job_id = job_id
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.scheduled_time: datetime.datetime | None = None
        self.cron: str | None = None
        self.traceparent: str | None = None
        self._runtime = runtime
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose lines are kept with the job (`taskctl logs ID`) and go to taskd's
        log, naming the task and the job (made when a task first uses it)."""
        if self._logger is None:
            keep = functools.partial(self._runtime.log, self.job_id)
            self._logger = task_logger(self.name, self.job_id, keep)
        return self._logger

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Say how far the job is: `done` of `total` (None: unknown), and what it is doing.

        Cheap to call often: taskd records the latest value at most twice a second, and
        `taskctl job ID` shows it.
        """
        for value, what in ((done, "done"), (total, "total")):
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if value is not None and not number:
                raise TypeError(f"progress {what} must be a number, got {value!r}")
        if message is not None and not isinstance(message, str):
            raise TypeError(f"progress message must be a str, got {type(message).__name__}")
        self._runtime.progress(self.job_id, done, total, message)

    async def run_task(self, name: str, payload: Any = None, *, key: str | None = None) -> Any:
        """Run (or join) task `name` like `taskctl run`, wait, and return its result.

        Raises taskd.TaskFailed when that job fails.
        """
        traceparent = current_traceparent() or self.traceparent
        return await self._runtime.run_task(self.job_id, name, payload, key, traceparent)

    async def enqueue(
        self,
        name: str,
        payload: Any = None,
        *,
        delay: float | str | None = None,
        run_at: float | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        key: str | None = None,
        unique_for: float | str | None = None,
        debounce: float | str | None = None,
        max_wait: float | str | None = None,
        after: Sequence[int] = (),
        after_failure: Literal["cancel", "run"] = "cancel",
    ) -> int:
        """Enqueue task `name` like `taskctl enqueue` and return the job id; with `after`,
        the job waits until those jobs have succeeded."""
        options = {
            "debounce": None if debounce is None else _seconds(debounce, "debounce"),
            "max_wait": None if max_wait is None else _seconds(max_wait, "max_wait"),
            "unique_for": None if unique_for is None else _seconds(unique_for, "unique_for"),
            "delay": None if delay is None else _seconds(delay, "delay"),
            "run_at": run_at,
            "priority": priority,
            "max_attempts": max_attempts,
            "key": key,
            "traceparent": current_traceparent() or self.traceparent,
            "after": tuple(after),
            "after_failure": after_failure,
        }
        return await self._runtime.enqueue(self.job_id, name, payload, options)

    def __repr__(self) -> str:
        return f"<TaskContext {self.name} job={self.job_id} attempt={self.attempt}>"


def task_logger(
    name: str, job_id: int, keep: Callable[[str, str], None] | None = None
) -> logging.LoggerAdapter[logging.Logger]:
    """A logger named for the task whose lines start with the job id; `keep(level, text)`
    gets each line at INFO and above (and below, where the logger is enabled for it)."""
    import logging

    logger = logging.getLogger(f"taskd.task.{name}")
    adapter = _job_logger_class()(logger, {"task": name, "job_id": job_id})
    adapter.keep = keep  # type: ignore[attr-defined]
    return adapter


@functools.cache
def _job_logger_class() -> type[logging.LoggerAdapter[logging.Logger]]:
    import logging

    class JobLogger(logging.LoggerAdapter[logging.Logger]):
        keep: Callable[[str, str], None] | None = None

        def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
            extra = dict(self.extra or {})
            kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
            return f"job {extra.get('job_id', '?')}: {msg}", kwargs

        def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
            enabled = self.isEnabledFor(level)
            if self.keep is not None and (enabled or level >= logging.INFO):
                self.keep(logging.getLevelName(level), _line_text(msg, args, kwargs))
            if enabled:
                msg, kwargs = self.process(msg, kwargs)
                self.logger.log(level, msg, *args, **kwargs)

    return JobLogger


def _line_text(msg: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A log call's text as logging would render its message, with the traceback if any."""
    import logging
    import sys

    try:
        text = str(msg) % args if args else str(msg)
    except Exception:
        text = f"{msg!r} % {args!r}"
    exc_info = kwargs.get("exc_info")
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    elif exc_info and not isinstance(exc_info, tuple):
        exc_info = sys.exc_info()
    if isinstance(exc_info, tuple) and exc_info[0] is not None:
        text += "\n" + logging.Formatter().formatException(exc_info)
    return text


class TaskFailed(Exception):
    """A task started with `ctx.run_task` failed; `job_id` and `error` tell which and why."""

    def __init__(self, job_id: int, task: str, error: str | None) -> None:
        super().__init__(f"task {task} (job {job_id}) failed: {error}")
        self.job_id = job_id
        self.task = task
        self.error = error


class TaskDefinition:
    """A function made into a task by `define_task`, with the options it was given."""

    __slots__ = (
        "backoff",
        "concurrency",
        "description",
        "fn",
        "limit_key",
        "limits",
        "max_attempts",
        "max_backoff",
        "name",
        "on_failure",
        "on_success",
        "rate_limit",
        "single_flight",
        "timeout",
        "unique_for",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None,
        description: str | None,
        timeout: float | str | None,
        max_attempts: int | None,
        backoff: float | str | None,
        max_backoff: float | str | None,
        concurrency: int | None,
        rate_limit: str | None = None,
        unique_for: float | str | None = None,
        single_flight: str | None = None,
        on_failure: str | None = None,
        on_success: str | None = None,
        limits: Sequence[str] | None = None,
        limit_key: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"define_task() needs a function, got {type(fn).__name__}")
        self.fn = fn
        self.name = name
        doc = (fn.__doc__ or "").strip().splitlines()
        self.description = description if description is not None else (doc[0] if doc else "")
        self.timeout = _positive(timeout, "timeout")
        self.backoff = None if backoff is None else _seconds(backoff, "backoff")
        self.max_backoff = None if max_backoff is None else _seconds(max_backoff, "max_backoff")
        self.max_attempts = _at_least_one(max_attempts, "max_attempts")
        self.concurrency = _at_least_one(concurrency, "concurrency")
        if rate_limit is not None:
            parse_rate(rate_limit)  # its error names the mistake, at import
        self.rate_limit = rate_limit
        self.unique_for = None if unique_for is None else _seconds(unique_for, "unique_for")
        if single_flight not in (None, *SINGLE_FLIGHT_MODES):
            raise ValueError(
                f"single_flight must be one of {', '.join(map(repr, SINGLE_FLIGHT_MODES))}, "
                f"got {single_flight!r}"
            )
        self.single_flight = single_flight
        self.limits = _limit_names(limits)
        self.limit_key = None if limit_key is None else check_limit_key(limit_key)
        self.on_failure = _task_name(on_failure, "on_failure")
        self.on_success = _task_name(on_success, "on_success")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<TaskDefinition {self.name or self.fn.__qualname__}>"


def define_task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | str | None = None,
    max_attempts: int | None = None,
    backoff: float | str | None = None,
    max_backoff: float | str | None = None,
    concurrency: int | None = None,
    rate_limit: str | None = None,
    unique_for: float | str | None = None,
    single_flight: str | None = None,
    on_failure: str | None = None,
    on_success: str | None = None,
    limits: Sequence[str] | None = None,
    limit_key: str | None = None,
) -> Any:
    """Make a function a task: `@define_task` or `@define_task(description=..., timeout=...)`.

    The function takes `(payload, ctx)`, `(payload)`, `(ctx)` or nothing; the payload is
    validated against the first parameter's annotation. `async def` runs on the daemon's
    event loop, a plain `def` in its thread pool.

    When a schedule starts the task, taskd merges `scheduled_time` (ISO-8601) and `cron`
    into the payload: a `dict` (or unannotated) payload gets both, as in Nitro; a Struct,
    TypedDict or dataclass gets those it declares, so that a strict one
    (`forbid_unknown_fields`) need not declare them. Either way the task can read them as
    `ctx.scheduled_time` (a datetime) and `ctx.cron`.

    `concurrency` and `rate_limit` ("10/s", "600/m", "100/15m": at most that many attempts
    start per period) are counted by the job store across every daemon sharing it.
    `unique_for` ("10m") keeps the key of an enqueue taken that long after its job was
    created, even once it has finished. `single_flight` says which concurrent runs share an
    execution: "task" (all of them, the default), "payload" (those with equal payloads) or
    "none" (each run gets its own job). `limits` names shared limits (`[limits.NAME]` in
    taskd.toml, such as one external API's budget) its jobs also count against.
    `limit_key` ("customer_id", or "customer.id" for a nested field) makes `concurrency`
    and `rate_limit` count per value of that payload field, and the values take turns.

    `on_failure` and `on_success` name tasks (hooks) enqueued, in the transaction that
    records it, when a job of this task fails after its last attempt or succeeds, with the
    payload {"job", "task", "status", "error", "attempts"}.
    """

    def wrap(function: Callable[..., Any]) -> TaskDefinition:
        return TaskDefinition(
            function,
            name=name,
            description=description,
            timeout=timeout,
            max_attempts=max_attempts,
            backoff=backoff,
            max_backoff=max_backoff,
            concurrency=concurrency,
            rate_limit=rate_limit,
            unique_for=unique_for,
            single_flight=single_flight,
            on_failure=on_failure,
            on_success=on_success,
            limits=limits,
            limit_key=limit_key,
        )

    return wrap if fn is None else wrap(fn)


def _seconds(value: float | str, what: str) -> float:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{what} must be seconds >= 0 or a duration such as '30s', got {value!r}")
    return float(value)


def _task_name(value: str | None, what: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{what} must name a task, got {value!r}")
    return value


def _limit_names(value: Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(name, str) and name for name in value):
        raise ValueError(f"limits must be a list of shared limits' names, got {value!r}")
    return tuple(value)


def _positive(value: float | str | None, what: str) -> float | None:
    if value is None:
        return None
    seconds = _seconds(value, what)
    if seconds <= 0:
        raise ValueError(f"{what} must be more than 0 seconds, got {value!r}")
    return seconds


def _at_least_one(value: int | None, what: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value
