"""When taskd traces, decided without OpenTelemetry; and the traceparent's form."""

from __future__ import annotations

import msgspec
import pytest

from taskctl import enqueue_params
from taskd.limits import out_of_limits
from taskd.models import Job
from taskd.otel import attempt_span_id, job_trace_id
from taskd.protocol import EnqueueParams, Params, RunParams
from taskd.traceparent import header_traceparent, parse_traceparent
from taskd.tracing import tracing_wanted

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("setting", "environ", "wanted"),
    [
        (None, {}, False),
        (None, {"OTEL_SERVICE_NAME": "shop"}, False),  # a name says nothing of where to send
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        (None, {"OTEL_TRACES_EXPORTER": "console"}, True),
        (None, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, False),
        (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        (True, {}, True),
        (True, {"OTEL_SDK_DISABLED": "true"}, False),
        (None, {"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ],
)
def test_when_taskd_traces(setting: bool | None, environ: dict[str, str], wanted: bool) -> None:
    assert tracing_wanted(setting, environ) is wanted


@pytest.mark.parametrize(
    "value",
    [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",  # short
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # upper case
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # not version 00
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # no trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # no span id
        "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01",
        TRACEPARENT + "-x",
    ],
)
def test_a_malformed_traceparent_is_refused_naming_its_form(value: str) -> None:
    for kind in (EnqueueParams, RunParams):
        problem = out_of_limits(kind, {"task": "t", "traceparent": value})
        assert problem is not None and problem.startswith("traceparent: expected a W3C")
    assert parse_traceparent(value) is None


def test_a_header_is_read_as_the_standard_says() -> None:
    assert header_traceparent(TRACEPARENT.encode()) == TRACEPARENT
    assert header_traceparent(f" {TRACEPARENT} ") == TRACEPARENT
    # A later version: its version-00 fields; version ff and garbage: no parent.
    assert header_traceparent("cc" + TRACEPARENT[2:] + "-more") == TRACEPARENT
    assert header_traceparent("ff" + TRACEPARENT[2:]) is None
    assert header_traceparent("rubbish") is None
    assert header_traceparent(b"\xff" * 55) is None
    assert out_of_limits(EnqueueParams, {"task": "t", "traceparent": TRACEPARENT}) is None


def test_attempt_span_ids_are_the_same_on_every_daemon_and_differ_by_claim() -> None:
    job = Job(7, "t", "running", "enqueue", created_at=1_000_000.25, run_at=0.0, epoch=2)
    again = Job(7, "t", "running", "enqueue", created_at=1_000_000.25, run_at=5.0, epoch=3)
    other = Job(7, "t", "running", "enqueue", created_at=1_000_001.0, run_at=0.0)
    assert job_trace_id(job) == job_trace_id(again) != job_trace_id(other)
    trace = job_trace_id(job)
    ids = {attempt_span_id(trace, job, epoch) for epoch in range(1, 100)}
    assert len(ids) == 99 and 0 not in ids
    assert attempt_span_id(trace, job, 1) == attempt_span_id(trace, again, 1)
    assert job_trace_id(job) < 2**128 and max(ids) < 2**64


def test_a_request_without_a_traceparent_is_one_an_older_daemon_takes() -> None:
    class OlderEnqueueParams(Params):  # `enqueue` before traceparent
        task: str
        payload: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"\x80"))
        delay: float | None = None
        run_at: float | None = None
        priority: int = 0
        max_attempts: int | None = None
        key: str | None = None

    older = msgspec.msgpack.Decoder(OlderEnqueueParams)
    assert older.decode(msgspec.msgpack.encode(enqueue_params("t", {"a": 1}, key="k"))).key == "k"
    sent = msgspec.msgpack.encode(enqueue_params("t", traceparent=TRACEPARENT))
    with pytest.raises(msgspec.ValidationError, match="unknown field `traceparent`"):
        older.decode(sent)
