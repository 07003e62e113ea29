"""The reader of undecodable requests finds the field at fault, beside the params' type."""

from __future__ import annotations

import pytest

from taskd.envelope import deepest_field, field_path, invalid_string, request_head
from taskd.protocol import EnqueueManyParams, EnqueueParams, JobsParams, RunParams

TASK = b"\xa4task\xa4echo"
DEEP = b"\x91" * 3000 + b"\xc0"
BAD = b"\xa1\xff"  # a one-byte string that is not UTF-8


def batch(*items: bytes) -> bytes:
    return b"\x81\xa4jobs" + bytes([0x90 + len(items)]) + b"".join(items)


@pytest.mark.parametrize(
    ("params", "kind", "path", "in_payload"),
    [
        (b"\x82" + TASK + b"\xa3key" + DEEP, EnqueueParams, "$.key", False),
        (b"\x82" + TASK + b"\xa7payload" + DEEP, RunParams, "$.payload", True),
        (batch(b"\x81" + TASK, b"\x82" + TASK + b"\xa3key" + DEEP), EnqueueManyParams,
         "$.jobs[1].key", False),
        (batch(b"\x82" + TASK + b"\xa7payload" + DEEP), EnqueueManyParams,
         "$.jobs[0].payload", True),
        (DEEP, JobsParams, "$", False),  # an array where a map belongs
        (b"\x81\xa4junk" + DEEP, JobsParams, "$.junk", False),
    ],
)  # fmt: skip
def test_the_field_nested_deepest(params: bytes, kind: type, path: str, in_payload: bool) -> None:
    steps, raw = deepest_field(params, kind)
    assert (field_path(steps), raw) == (path, in_payload)


@pytest.mark.parametrize(
    ("params", "kind", "found"),
    [
        (b"\x82\xa4task" + BAD + b"\xa3key\xa1k", RunParams, ("$.task", False)),
        (b"\x82" + TASK + b"\xa7payload" + BAD, RunParams, None),  # the task's business
        (b"\x83" + TASK + b"\xa7payload" + BAD + b"\xa3key" + BAD, RunParams, ("$.key", False)),
        (batch(b"\x81" + TASK, b"\x82" + TASK + b"\xa3key" + BAD), EnqueueManyParams,
         ("$.jobs[1].key", False)),
        (b"\x81" + BAD + b"\x01", JobsParams, ("$", True)),
        (b"\x81\xa6status\x92\xa7pending" + BAD, JobsParams, ("$.status[1]", False)),
        (b"\x81" + TASK, JobsParams, None),
    ],
)  # fmt: skip
def test_the_first_string_that_is_not_utf8(
    params: bytes, kind: type, found: tuple[str, bool] | None
) -> None:
    located = invalid_string(params, kind)
    assert (located and (field_path(located[0]), located[1])) == found


def test_the_head_of_a_request_too_deep_to_decode() -> None:
    body = b"\x83\xa2id\x07\xa6method\xa3run\xa6params\x82" + TASK + b"\xa7payload" + DEEP
    request_id, method, deepest, params = request_head(body)
    assert (request_id, method, deepest) == (7, "run", "params")
    assert params is not None and params.endswith(DEEP)
