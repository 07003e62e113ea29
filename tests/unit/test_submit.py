"""Requests that the submitter refuses before anything is stored."""

from __future__ import annotations

import pytest

from taskd.store import Store
from taskd.submit import InvalidRequest, JobRequest, PayloadInvalid, Submitter
from taskd.tasks import load_tasks
from tests.support import FIXTURE_TASKS

REGISTRY = load_tasks(FIXTURE_TASKS)
SUBMITTER = Submitter(Store.__new__(Store), REGISTRY)  # prepare() never stores


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x91" * 100_000 + b"\xc0", "nested too deeply"),
        (b"\xa2\xff\xfe", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (b"\x92\x01", "not valid msgpack"),
    ],
)
def test_payloads_that_cannot_be_decoded(payload: bytes, message: str) -> None:
    with pytest.raises(PayloadInvalid, match=message):
        SUBMITTER.prepare(JobRequest("echo", payload, "run"))


@pytest.mark.parametrize("run_at", [float("nan"), float("inf"), float("-inf")])
def test_run_at_from_task_code_must_be_a_time(run_at: float) -> None:
    # A client's request is checked as the socket or the HTTP API decodes it; one from task
    # code (ctx.enqueue) is checked here, against the same types.
    with pytest.raises(InvalidRequest, match=r"run_at: at (most|least) "):
        SUBMITTER.prepare(JobRequest("echo", b"\xc0", "task", run_at=run_at))


def test_the_rules_beyond_the_types_hold_for_every_request() -> None:
    with pytest.raises(InvalidRequest, match="not both"):
        SUBMITTER.prepare(JobRequest("echo", b"\xc0", "enqueue", delay=1.0, run_at=2.0))
    with pytest.raises(InvalidRequest, match="reserved for taskd"):
        SUBMITTER.prepare(JobRequest("echo", b"\xc0", "run", key="@mine"))


def test_run_keys_by_concurrency_mode() -> None:
    import msgspec

    from taskd.submit import run_key

    ab = msgspec.msgpack.encode({"a": 1, "b": [1, {"y": 2, "x": 1}]})
    ba = msgspec.msgpack.encode({"b": [1, {"x": 1, "y": 2}], "a": 1})
    other = msgspec.msgpack.encode({"a": 2, "b": [1, {"x": 1, "y": 2}]})
    assert run_key("task", ab) == run_key("task", other) == "@run"
    assert run_key("none", ab) is None
    assert run_key("payload", ab) == run_key("payload", ba) != run_key("payload", other)
    assert (run_key("payload", ab) or "").startswith("@run:")
