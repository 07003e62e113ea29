"""The spans taskd makes (the `otel` extra; README, "Tracing (OpenTelemetry)").

Imported only when taskd traces (taskd.tracing decides): the daemon's parts hold a `Tracing`
or None, and check for None once per attempt or tick.

- Each attempt of a job is a span `taskd.run TASK` (kind CONSUMER), a child of the
  traceparent the job was created with (the caller's span), with the attributes
  `taskd.task`, `taskd.job_id`, `taskd.attempt`, `taskd.node`, `taskd.worker`; a failed
  attempt has status ERROR and its exception recorded. While the task runs, its span is
  the current one: spans the task makes are its children, and so are the jobs it starts.
- An attempt after the first links to the first attempt's span. Attempt spans have ids
  derived from the job (and from the claim, `epoch`): every daemon can name the first
  attempt's span without storing it. A job created without a traceparent has a trace id
  derived from it, so that all its attempts are in one trace.
- A tick of a schedule (or a trigger) is a span `taskd.tick SCHEDULE` (kind PRODUCER),
  whose jobs are its children.

Spans go to the exporters the standard OTEL_* variables name (OTLP by default), through
a BatchSpanProcessor: a bounded queue, exported by a thread of its own, so that neither
the event loop nor a job ever waits for the collector.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import threading
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

import taskd
from taskd.config import ConfigError
from taskd.models import Job
from taskd.store import Outcome
from taskd.traceparent import format_traceparent, parse_traceparent

EXTRA_HINT = "pip install 'taskd[otel]'"
SHUTDOWN_TIMEOUT = 5.0  # seconds the last spans may take to go out as taskd exits
# OTEL_TRACES_EXPORTER=otlp is one of these, by OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL; gRPC
# when neither is set, as the OpenTelemetry SDK for Python has it.
OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}

# The ids the next span gets (trace id, span id): set around the start of an attempt's span.
_planned: ContextVar[tuple[int, int] | None] = ContextVar("taskd_planned_ids", default=None)


class _PlannedIds(IdGenerator):
    """Random ids, except for the span taskd starts with ids it derived."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        planned = _planned.get()
        return planned[1] if planned is not None else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        planned = _planned.get()
        return planned[0] if planned is not None else self._random.generate_trace_id()


def _derived(*parts: object, size: int) -> int:
    """A non-zero id of `size` bytes from the parts."""
    digest = hashlib.sha256(":".join(map(repr, parts)).encode()).digest()
    return int.from_bytes(digest[:size], "big") or 1


def job_trace_id(job: Job) -> int:
    """The trace of a job created without a traceparent (the same on every daemon)."""
    return _derived("taskd-job", job.id, job.created_at, size=16)


def attempt_span_id(trace_id: int, job: Job, epoch: int) -> int:
    """The span id of the attempt that claim `epoch` of the job ran."""
    return _derived("taskd-attempt", trace_id, job.id, job.created_at, epoch, size=8)


def exporter_entries(environ: Mapping[str, str]) -> list[tuple[str, EntryPoint]]:
    """The span exporters OTEL_TRACES_EXPORTER names (default: otlp), each with the entry
    point that makes it; ConfigError naming one that is not installed."""
    names = [n.strip() for n in (environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")]
    entries = []
    for name in filter(None, names):
        if name == "none":
            continue
        entry = name
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc"
            ).strip()
            if protocol not in OTLP_BY_PROTOCOL:
                raise ConfigError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: taskd exports OTLP as "
                    f"{' or '.join(OTLP_BY_PROTOCOL)}"
                )
            entry = OTLP_BY_PROTOCOL[protocol]
        found = list(entry_points(group="opentelemetry_traces_exporter", name=entry))
        if not found:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER={name}: no span exporter {entry!r} is installed "
                f"({EXTRA_HINT} installs otlp; console comes with it)"
            )
        entries.append((name, found[0]))
    return entries


def exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The span exporters OTEL_TRACES_EXPORTER names, made as the OpenTelemetry SDK makes
    them: each reads its own OTEL_EXPORTER_* settings."""
    made = []
    for name, entry in exporter_entries(environ):
        try:
            made.append(entry.load()())
        except Exception as exc:
            raise ConfigError(f"OTEL_TRACES_EXPORTER={name}: the exporter failed: {exc}") from exc
    return made


def resource(environ: Mapping[str, str]) -> Resource:
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, with service.name "taskd" unless
    they give one."""
    found = Resource.create({"service.version": taskd.__version__})
    named = str(found.attributes.get("service.name", ""))
    if not named or named.startswith("unknown_service"):
        found = found.merge(Resource({"service.name": "taskd"}))
    return found


class _Span:
    """A span, and its W3C traceparent for the jobs made under it."""

    __slots__ = ("span", "traceparent")

    def __init__(self, span: Span) -> None:
        self.span = span
        context = span.get_span_context()
        self.traceparent = format_traceparent(
            context.trace_id, context.span_id, int(context.trace_flags)
        )


class AttemptSpan(_Span):
    """The span of one attempt, current while its task runs."""

    __slots__ = ()

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """The span is the current one (of the task's coroutine, and of its thread)."""
        token = otel_context.attach(trace.set_span_in_context(self.span))
        try:
            yield
        finally:
            otel_context.detach(token)

    def caught(self, exc: BaseException) -> None:
        """The task raised `exc` (recorded as the span's exception)."""
        self.span.record_exception(exc)

    def ended(self, outcome: Outcome) -> None:
        """The attempt came to `outcome`: the span ends, with an error if it failed."""
        span = self.span
        span.set_attribute("taskd.outcome", outcome.status)
        if outcome.error is not None:
            span.set_attribute("taskd.error.kind", outcome.error.kind)
            span.set_status(Status(StatusCode.ERROR, outcome.error.message))
            if outcome.status == "retry":
                span.set_attribute("taskd.retry_in", outcome.retry_in)
        span.end()

    def stopped(self) -> None:
        """The attempt was stopped (cancelled, taken over, or the daemon stopped)."""
        self.span.set_attribute("taskd.outcome", "stopped")
        self.span.end()


class Tracing:
    """This daemon's tracer: the spans of attempts and ticks."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("taskd", taskd.__version__)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Tracing:
        """A TracerProvider as the OTEL_* variables describe it (sampler, exporters, batch
        settings, resource), made the global one, so that task code's spans join taskd's."""
        made = exporters(environ)
        provider = TracerProvider(
            resource=resource(environ), id_generator=_PlannedIds(), shutdown_on_exit=False
        )
        for exporter in made:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        return cls(provider)

    def attempt(self, job: Job, worker: str) -> AttemptSpan:
        """Start the span of the attempt `job` (as claimed) is about to run."""
        parent = parse_traceparent(job.traceparent) if job.traceparent is not None else None
        if parent is not None:
            trace_id, parent_id, flags = parent
            caller = SpanContext(trace_id, parent_id, is_remote=True, trace_flags=TraceFlags(flags))
            context = trace.set_span_in_context(NonRecordingSpan(caller))
        else:
            trace_id, flags = job_trace_id(job), TraceFlags.SAMPLED
            context = otel_context.Context()  # a root: not the span of whoever claimed it
        links = []
        if job.epoch > 1:
            first = SpanContext(
                trace_id,
                attempt_span_id(trace_id, job, 1),
                is_remote=True,
                trace_flags=TraceFlags(flags),
            )
            links.append(Link(first, {"taskd.link": "first attempt"}))
        node, _, _ = worker.rpartition("/")
        attributes: dict[str, Any] = {
            "taskd.task": job.task,
            "taskd.job_id": job.id,
            "taskd.attempt": job.attempts,
            "taskd.max_attempts": job.max_attempts,
            "taskd.node": node or worker,
            "taskd.worker": worker,
            "taskd.origin": job.origin,
        }
        token = _planned.set((trace_id, attempt_span_id(trace_id, job, job.epoch)))
        try:
            span = self._tracer.start_span(
                f"taskd.run {job.task}",
                context=context,
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                links=links,
                record_exception=False,
                set_status_on_exception=False,
            )
        finally:
            _planned.reset(token)
        return AttemptSpan(span)

    @contextlib.contextmanager
    def tick(self, schedule: str, cron: str, tick: float, *, regular: bool) -> Iterator[TickSpan]:
        """The span of a schedule's firing (a tick, or a trigger when not `regular`)."""
        attributes: dict[str, Any] = {
            "taskd.schedule": schedule,
            "taskd.cron": cron,
            "taskd.scheduled_time": dt.datetime.fromtimestamp(tick, dt.UTC).isoformat(),
            "taskd.trigger": not regular,
        }
        span = self._tracer.start_span(
            f"taskd.tick {schedule}",
            context=otel_context.Context(),
            kind=SpanKind.PRODUCER,
            attributes=attributes,
        )
        try:
            yield TickSpan(span)
        finally:
            span.end()

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
        """Send the spans still queued, for `timeout` seconds at most (an unreachable
        collector does not hold up taskd's exit); whether that was done in time."""
        closing = threading.Thread(target=self._provider.shutdown, daemon=True)
        closing.start()
        closing.join(timeout)
        return not closing.is_alive()


class TickSpan(_Span):
    """The span of one firing of a schedule (a tick or a trigger)."""

    __slots__ = ()

    def fired(self, fired: bool, job_ids: list[int], joined: int) -> None:
        self.span.set_attribute("taskd.fired", fired)
        self.span.set_attribute("taskd.job_ids", job_ids)
        self.span.set_attribute("taskd.joined", joined)

    def failed(self, message: str) -> None:
        self.span.set_status(Status(StatusCode.ERROR, message))
