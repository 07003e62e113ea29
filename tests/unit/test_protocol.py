"""Every message of the wire protocol survives a round trip; error replies are well formed."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from taskctl.client import decode_result
from taskctl.errors import PayloadInvalid, ProtocolError, UnknownTask, error_for
from taskd.models import (
    AttemptError,
    BatchInfo,
    FiredJob,
    Job,
    JobLogs,
    LogLine,
    ScheduleInfo,
    Status,
    TaskCounts,
    TaskInfo,
)
from taskd.protocol import (
    HEADER,
    METHODS,
    BatchParams,
    Call,
    CancelParams,
    EnqueueManyParams,
    EnqueueManyResult,
    EnqueueParams,
    EnqueueResult,
    ErrorCode,
    HelloParams,
    HelloResult,
    JobParams,
    JobsParams,
    ListTasksParams,
    LogsParams,
    MetricsParams,
    PauseScheduleParams,
    PauseTaskParams,
    PruneParams,
    PruneResult,
    RawReply,
    ReloadParams,
    ReloadResult,
    Reply,
    Request,
    ResumeScheduleParams,
    ResumeTaskParams,
    RetryParams,
    RpcError,
    RunParams,
    RunResult,
    SchedulesParams,
    StatusParams,
    SubscribeParams,
    SubscribeResult,
    TaskPauseResult,
    TimelineEvent,
    TriggerScheduleParams,
    UnsubscribeParams,
    WaitParams,
    WhyParams,
    WhyResult,
    encode_frame,
)

PAYLOAD = msgspec.Raw(msgspec.msgpack.encode({"to": "a@example.com", "n": [1, 2.5, None]}))
JOB = Job(
    id=7, task="jobs:send-email", status="failed", origin="enqueue", created_at=1.5, run_at=2.5,
    payload={"to": "x"}, result=None, error="ValueError: boom", attempts=3, max_attempts=3,
    key="k", started_at=3.0, finished_at=4.0,
    errors=[AttemptError(1, "error", "ValueError: boom", 3.5, "Traceback ...")],
)  # fmt: skip
TASK = TaskInfo(
    name="hello", description="d", file="/t/hello.py", schedules=["* * * * *"], next_run_at=60.0
)
SCHEDULE = ScheduleInfo(
    id="nightly", cron="30 2 * * *", timezone="Europe/Berlin", tasks=["a", "b"], catch_up="all",
    max_catch_up=3, paused=True, next_tick=100.0, last_tick=50.0, fired_at=50.5,
    last_outcome="failed", coalesced=4,
    last_jobs=[FiredJob("a", 7, joined=True, status="failed"), FiredJob("b", 8, status=None)],
)  # fmt: skip
STATUS = Status(
    version="0.1.0", pid=1, started_at=1.0, uptime=2.0, database="sqlite:/x", socket="/s",
    tasks_dir="/t", workers=4, counts={"pending": 2}, running=[JOB],
    tasks=[TaskCounts(task="hello", counts={"pending": 2}, oldest_pending_age=1.0)],
)  # fmt: skip

SAMPLES: dict[str, tuple[Any, Any]] = {
    "hello": (HelloParams(protocol=1, client="t"), HelloResult(1, "taskd/0.1.0", 42, "full")),
    "list_tasks": (ListTasksParams(), [TASK]),
    "run": (RunParams(task="hello", payload=PAYLOAD, key="k", detach=True), RunResult(JOB, True)),
    "enqueue": (
        EnqueueParams(task="t", payload=PAYLOAD, delay=5.0, priority=-3, max_attempts=2, key="u"),
        EnqueueResult(9, False),
    ),
    "enqueue_many": (
        EnqueueManyParams([EnqueueParams(task="t"), EnqueueParams(task="u", run_at=10.0)]),
        EnqueueManyResult([EnqueueResult(1, False), EnqueueResult(1, True)]),
    ),
    "batch": (
        BatchParams(id=3),
        BatchInfo(
            3,
            total=2,
            ended=1,
            counts={"succeeded": 1, "running": 1},
            created_at=1.0,
            on_finish="t",
        ),
    ),
    "job": (JobParams(id=7), JOB),
    "jobs": (JobsParams(status=["failed", "pending"], task="t", limit=5), [JOB, JOB]),
    "wait": (WaitParams(id=7, timeout=1.5, after_attempt=1), JOB),
    "cancel": (CancelParams(id=7), JOB),
    "retry": (RetryParams(id=7), JOB),
    "status": (StatusParams(), STATUS),
    "prune": (PruneParams(older_than=60.0), PruneResult(3)),
    "reload": (ReloadParams(), ReloadResult(tasks=3, schedules=1)),
    "schedules": (
        SchedulesParams(),
        [SCHEDULE, ScheduleInfo("@startup", "@startup", "UTC", ["a"])],
    ),
    "pause_schedule": (PauseScheduleParams(schedule="nightly"), SCHEDULE),
    "pause_task": (PauseTaskParams(task="hello"), TaskPauseResult("hello", 1.5, changed=True)),
    "resume_task": (ResumeTaskParams(task="hello"), TaskPauseResult("hello", None, changed=False)),
    "resume_schedule": (ResumeScheduleParams(schedule="*/5 * * * *"), SCHEDULE),
    "trigger_schedule": (TriggerScheduleParams(schedule="nightly"), SCHEDULE),
    "metrics": (MetricsParams(), "# HELP taskd_jobs Jobs\n# TYPE taskd_jobs gauge\n"),
    "logs": (LogsParams(id=7), JobLogs(7, [LogLine(1, 0, 5.0, "INFO", "hi")], dropped=2)),
    "subscribe": (SubscribeParams(job=7, logs=False), SubscribeResult(events=3, dropped=1)),
    "unsubscribe": (UnsubscribeParams(id=3), True),
    "why": (
        WhyParams(id=7),
        WhyResult(
            id=7,
            task="report",
            status="pending",
            reason="delayed",
            message="job 7 (report) waits for its delay",
            until=1_700_000_100.0,
            timeline=[TimelineEvent(1_700_000_000.0, "created", message="by enqueue")],
        ),
    ),
}


def test_every_method_has_a_sample() -> None:
    assert set(SAMPLES) == set(METHODS)


def normalise(value: Any) -> Any:
    """Raw payloads compare by their decoded value."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_request_and_reply_round_trip(method: str) -> None:
    params_type = METHODS[method].params
    params, result = SAMPLES[method]
    frame = encode_frame(Request(11, method, msgspec.Raw(msgspec.msgpack.encode(params))))
    (size,) = HEADER.unpack(frame[:4])
    assert size == len(frame) - 4
    request = msgspec.msgpack.decode(frame[4:], type=Request)
    assert (request.id, request.method) == (11, method)
    decoded = msgspec.msgpack.decode(request.params, type=params_type)
    assert normalise(decoded) == normalise(params)

    reply = encode_frame(Reply(11, result=result))
    assert normalise(decode_result(method, reply[4:], 11)) == normalise(result)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_call_is_the_request_its_params_encoded_first_would_be(method: str) -> None:
    """Clients encode a request in one go (`Call`): the daemon reads the same bytes."""
    params, _ = SAMPLES[method]
    encoded_first = Request(11, method, msgspec.Raw(msgspec.msgpack.encode(params)))
    assert encode_frame(Call(11, method, params)) == encode_frame(encoded_first)


def test_error_reply_becomes_typed_exception() -> None:
    frame = encode_frame(Reply(3, error=RpcError(ErrorCode.UNKNOWN_TASK, "no such task").body()))
    with pytest.raises(UnknownTask, match="no such task"):
        decode_result("run", frame[4:], 3)
    body = msgspec.msgpack.decode(frame[4:], type=RawReply)
    assert body.error is not None and body.error.code == "unknown_task"


def test_reply_without_id_and_garbage() -> None:
    frame = encode_frame(Reply(None, error=RpcError(ErrorCode.BAD_FRAME, "bad").body()))
    with pytest.raises(ProtocolError):
        decode_result("job", frame[4:], 1)
    with pytest.raises(ProtocolError):
        decode_result("job", b"\xc1garbage", 1)
    wrong_shape = encode_frame(Reply(1, result={"not": "a job"}))
    with pytest.raises(ProtocolError, match="unexpected shape"):
        decode_result("job", wrong_shape[4:], 1)


def test_params_refuse_unknown_fields_and_wrong_types() -> None:
    with pytest.raises(msgspec.ValidationError, match="tsak"):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"tsak": "x"}), type=RunParams)
    with pytest.raises(msgspec.ValidationError, match="id"):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"id": "7"}), type=JobParams)


def test_error_codes_are_stable() -> None:
    # Clients in other languages branch on these strings: changing one breaks them.
    assert sorted(code.value for code in ErrorCode) == sorted([
        "bad_frame", "frame_too_large", "hello_required", "unsupported_protocol",
        "unknown_method", "invalid_params", "unknown_task", "unknown_job", "unknown_schedule",
        "payload_invalid", "conflict", "timeout", "permission_denied", "reload_failed", "busy",
        "shutting_down", "store_error", "internal",
    ])  # fmt: skip
    assert isinstance(error_for("payload_invalid", "m"), PayloadInvalid)
    assert error_for("something_new", "m").code == "something_new"
