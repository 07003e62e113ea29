"""Typed exceptions for the error codes of the taskd protocol."""

from __future__ import annotations

from typing import Any

from taskd.models import Job
from taskd.protocol import ErrorCode


class TaskdError(Exception):
    """An error reply from taskd, or a failure to talk to it."""

    code: str = ErrorCode.INTERNAL

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data or {}


class DaemonUnavailable(TaskdError):
    """Nothing answers on the socket (taskd is not running, or another path is meant)."""

    code = "unavailable"


class RequestTimeout(TaskdError):
    """taskd did not answer within the client's timeout (it may be stopped or overloaded);
    the request may still take effect."""

    code = "request_timeout"


class ProtocolError(TaskdError):
    """taskd sent something this client cannot read, or hung up mid-reply."""

    code = "protocol"


class UnknownTask(TaskdError):
    code = ErrorCode.UNKNOWN_TASK


class UnknownJob(TaskdError):
    code = ErrorCode.UNKNOWN_JOB


class UnknownSchedule(TaskdError):
    code = ErrorCode.UNKNOWN_SCHEDULE


class PayloadInvalid(TaskdError):
    """The payload does not match the task's schema; the message names the field."""

    code = ErrorCode.PAYLOAD_INVALID


class InvalidParams(TaskdError):
    code = ErrorCode.INVALID_PARAMS


class PermissionDenied(TaskdError):
    code = ErrorCode.PERMISSION_DENIED


class Conflict(TaskdError):
    """The job is not in a state that allows this (e.g. cancel of a finished job)."""

    code = ErrorCode.CONFLICT


class WaitTimeout(TaskdError):
    code = ErrorCode.TIMEOUT


class ReloadFailed(TaskdError):
    code = ErrorCode.RELOAD_FAILED


class Busy(TaskdError):
    code = ErrorCode.BUSY


class ShuttingDown(TaskdError):
    code = ErrorCode.SHUTTING_DOWN


class StoreFailure(TaskdError):
    code = ErrorCode.STORE_ERROR


class JobFailed(TaskdError):
    """The task ran and failed (or was cancelled); `job` holds its error and attempts."""

    code = "job_failed"

    def __init__(self, job: Job) -> None:
        super().__init__(f"task {job.task} (job {job.id}) {job.status}: {job.error}")
        self.job = job


_BY_CODE: dict[str, type[TaskdError]] = {
    cls.code: cls
    for cls in (
        UnknownTask,
        UnknownJob,
        UnknownSchedule,
        PayloadInvalid,
        InvalidParams,
        PermissionDenied,
        Conflict,
        WaitTimeout,
        ReloadFailed,
        Busy,
        ShuttingDown,
        StoreFailure,
    )
}
_PROTOCOL_CODES = {
    ErrorCode.BAD_FRAME,
    ErrorCode.FRAME_TOO_LARGE,
    ErrorCode.HELLO_REQUIRED,
    ErrorCode.UNSUPPORTED_PROTOCOL,
    ErrorCode.UNKNOWN_METHOD,
}


def error_for(code: str, message: str, data: dict[str, Any] | None = None) -> TaskdError:
    """The exception for an error reply's code."""
    if code in _PROTOCOL_CODES:
        return ProtocolError(message, data)
    cls = _BY_CODE.get(code, TaskdError)
    error = cls(message, data)
    if cls is TaskdError:
        error.code = code
    return error
