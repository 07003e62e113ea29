"""The limits of a request are declared once, on the wire types; the decoder enforces them,
and taskd.limits says in taskd's words which value broke which, with its unit, for the
requests that do not come through the decoder (task code, taskd.pg) and for the socket's
and the HTTP API's errors."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from taskd.limits import enqueue_problem, out_of_limits
from taskd.protocol import EnqueueManyParams, EnqueueParams, JobsParams

YEAR = 365 * 86400


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"delay": 20 * YEAR}, "delay: at most 10 years, got 20 years"),
        ({"delay": -1.0}, "delay: at least 0 seconds, got -1 seconds"),
        ({"run_at": 1e13}, "run_at: at most 9999-12-31T23:59:59Z, got 1e+13"),
        ({"run_at": float("nan")}, "run_at: at most 9999-12-31T23:59:59Z, got nan"),
        ({"priority": 2**40}, "priority: at most 2147483648, got 1099511627776"),
        ({"max_attempts": 0}, "max_attempts: at least 1, got 0"),
        ({"key": ""}, "key: 1 to 1024 characters, got 0"),
        ({"key": "k" * 1025}, "key: 1 to 1024 characters, got 1025"),
    ],
)
def test_what_the_decoder_refuses_is_refused_in_taskds_words(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(msgspec.ValidationError):  # the socket's and the HTTP API's decoder
        msgspec.convert({"task": "t", **fields}, EnqueueParams)
    assert enqueue_problem(fields) is not None and enqueue_problem(fields).startswith(message)


def test_values_within_the_limits_pass() -> None:
    fields = {"delay": 10 * YEAR, "priority": -(2**31), "max_attempts": 1, "key": "k" * 1024}
    msgspec.convert({"task": "t", **fields}, EnqueueParams)
    assert enqueue_problem(fields) is None
    assert enqueue_problem({"delay": None, "key": None}) is None


def test_rules_beyond_the_types() -> None:
    assert enqueue_problem({"delay": 1.0, "run_at": 2.0}) == "give delay or run_at, not both"
    reserved = enqueue_problem({"key": "@run"})
    assert reserved is not None and "keys starting with '@' are reserved for taskd" in reserved


def test_a_limit_deep_in_a_request_is_named_by_its_path() -> None:
    jobs = [{"task": "a"}, {"task": "b", "delay": -1}]
    problem = out_of_limits(EnqueueManyParams, {"jobs": jobs})
    assert problem == "jobs[1].delay: at least 0 seconds, got -1 seconds"
    assert out_of_limits(JobsParams, {"limit": 0}) == "limit: at least 1, got 0"
    assert out_of_limits(JobsParams, {"limit": "many"}) is None  # a type error: msgspec's
