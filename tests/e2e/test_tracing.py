"""Tracing with OpenTelemetry (README, "Tracing (OpenTelemetry)"), through real processes.

A client's span is kept by the SDK's in-memory exporter in this process; taskd, a process
of its own, exports its spans as OTLP/HTTP, configured only by the standard OTEL_*
variables, to a small collector this test runs on 127.0.0.1, which decodes them with
OpenTelemetry's own protobuf types. Why not the console exporter: what it writes to stdout
is not a stable format, and a task's own output goes there too; OTLP is the protocol a
collector speaks, so this checks the path users take.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from taskctl import AsyncClient, InvalidParams, enqueue_params
from taskd.traceparent import format_traceparent
from tests.backends import drop_schema, postgres_url, unique_schema
from tests.http_support import HttpClient, http_config
from tests.support import Taskd, wait_until
from tests.unit.test_imports import loaded_modules

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR

TASKS = {
    "traced.py": """
from opentelemetry import trace

from taskd import TaskContext, define_task


@define_task(backoff=0.05)
async def traced(payload: dict, ctx: TaskContext) -> dict:
    if ctx.attempt == 1:
        raise RuntimeError("the first attempt fails")
    with trace.get_tracer("tasks").start_as_current_span("inside the task"):
        pass
    queued = await ctx.enqueue("leaf")
    ran = await ctx.run_task("leaf")
    return {"traceparent": ctx.traceparent, "queued": queued, "ran": ran}
""",
    "leaf.py": """
from opentelemetry import trace

from taskd import TaskContext, define_task


@define_task
def leaf(ctx: TaskContext) -> str | None:  # a plain function: it runs in a thread
    with trace.get_tracer("tasks").start_as_current_span("inside a thread"):
        pass
    return ctx.traceparent
""",
}


class Collector:
    """An OTLP/HTTP trace receiver: every span POSTed to /v1/traces, as plain dicts."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.resources: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.receive(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def environment(self) -> dict[str, str]:
        """What taskd is told: the standard variables only (and a short batch delay)."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_SERVICE_NAME": "taskd-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1",
        }

    def receive(self, request: ExportTraceServiceRequest) -> None:
        with self._changed:
            for resource_spans in request.resource_spans:
                self.resources.append(_attributes(resource_spans.resource.attributes))
                for scope in resource_spans.scope_spans:
                    self.spans += [_span(span) for span in scope.spans]
            self._changed.notify_all()

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float = 30.0
    ) -> Any:
        with self._changed:
            found = self._changed.wait_for(lambda: predicate(self.spans), timeout)
            assert found, json.dumps(self.spans, indent=1)
            return found

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _span(span: Any) -> dict[str, Any]:
    return {
        "name": span.name,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent": span.parent_span_id.hex(),
        "attributes": _attributes(span.attributes),
        "status": span.status.code,
        "status_message": span.status.message,
        "events": [(event.name, _attributes(event.attributes)) for event in span.events],
        "links": [
            (link.trace_id.hex(), link.span_id.hex(), _attributes(link.attributes))
            for link in span.links
        ],
    }


@pytest.fixture
def collector() -> Iterator[Collector]:
    made = Collector()
    yield made
    made.close()


@pytest.fixture
def tasks(short_tmp: Path) -> Path:
    folder = short_tmp / "tasks"
    folder.mkdir()
    for name, text in TASKS.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture(params=["sqlite", "postgres"])
def daemon(
    request: pytest.FixtureRequest, taskd_factory: type[Taskd], tasks: Path
) -> Iterator[Callable[..., Taskd]]:
    """A taskd on the tracing tasks (`config`: more of taskd.toml), on each store in turn."""
    url = schema = None
    if request.param == "postgres":
        url, schema = postgres_url(), unique_schema()

    def make(config: str = "", tasks_folder: Path = tasks) -> Taskd:
        text = f'node_id = "tracer"\n{config}\n'
        if schema is not None:
            text += f'[postgres]\nschema = "{schema}"\n'
        made = taskd_factory(tasks=tasks_folder, config=text)
        if url is not None:
            made.database = url  # type: ignore[assignment]
        return made

    yield make
    if url is not None and schema is not None:
        asyncio.run(drop_schema(url, schema))


@pytest.fixture
def client_tracer() -> Iterator[tuple[Any, InMemorySpanExporter]]:
    """A tracer of this process (not the global one), whose spans stay in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("client"), exporter
    provider.shutdown()


def _traceparent(span: Any) -> str:
    context = span.get_span_context()
    return format_traceparent(context.trace_id, context.span_id, int(context.trace_flags))


def runs_of(spans: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    return [span for span in spans if span["name"] == f"taskd.run {task}"]


def test_each_attempt_is_a_span_under_the_client_and_a_retry_links_to_the_first(
    daemon: Callable[..., Taskd],
    collector: Collector,
    client_tracer: tuple[Any, InMemorySpanExporter],
) -> None:
    tracer, client_spans = client_tracer
    # A @startup schedule: its tick is a span, and its job that span's child.
    taskd = daemon('[scheduled_tasks]\n"@startup" = "leaf"').start(env=collector.environment())
    with tracer.start_as_current_span("checkout") as checkout, taskd.client() as client:
        outcome = client.run_job("traced", {}, max_attempts=2)
        job = client.wait(outcome.job.id, 60)
    assert job.status == "succeeded", job.error
    assert job.traceparent == _traceparent(checkout)  # stored with the job
    (kept,) = client_spans.get_finished_spans()
    trace_id = f"{kept.context.trace_id:032x}"
    parent_id = f"{kept.context.span_id:016x}"

    spans = collector.wait_for(
        lambda spans: len(runs_of(spans, "traced")) == 2 and len(runs_of(spans, "leaf")) == 3
        and any(span["name"].startswith("taskd.tick") for span in spans)
        and sum(span["name"] == "inside a thread" for span in spans) == 3 and spans
    )  # fmt: skip
    first, second = sorted(runs_of(spans, "traced"), key=lambda s: s["attributes"]["taskd.attempt"])
    expected = {
        "taskd.task": "traced",
        "taskd.job_id": job.id,
        "taskd.max_attempts": 2,
        "taskd.node": "tracer",  # node_id
        "taskd.origin": "run",
    }
    for number, attempt in enumerate((first, second), 1):
        attributes = attempt["attributes"]
        assert (attempt["trace_id"], attempt["parent"]) == (trace_id, parent_id)
        assert attributes | expected == attributes and attributes["taskd.attempt"] == number
        assert attributes["taskd.worker"].startswith("tracer/")  # node/N
    assert first["attributes"]["taskd.outcome"] == "retry"
    assert first["attributes"]["taskd.error.kind"] == "error"
    assert first["attributes"]["taskd.retry_in"] >= 0
    assert second["attributes"]["taskd.outcome"] == "succeeded"
    assert "taskd.error.kind" not in second["attributes"]
    # The failure: status ERROR, and the exception recorded.
    assert first["status"] == STATUS_ERROR
    assert "RuntimeError: the first attempt fails" in first["status_message"]
    ((event, details),) = first["events"]
    assert event == "exception" and details["exception.type"] == "RuntimeError"
    assert details["exception.message"] == "the first attempt fails"
    assert first["links"] == []
    # The retry: no error, and a link to the first attempt.
    assert second["status"] != STATUS_ERROR and second["events"] == []
    assert second["links"] == [(trace_id, first["span_id"], {"taskd.link": "first attempt"})]

    # The jobs the task started (ctx.enqueue, ctx.run_task) run under its attempt's span,
    # which the task saw as ctx.traceparent.
    assert job.result["traceparent"].startswith(f"00-{trace_id}-{second['span_id']}-")
    with taskd.client() as client:
        started = {j.id for j in client.jobs(task="leaf") if j.parent_id == job.id}
    children = {
        span["attributes"]["taskd.job_id"]: span
        for span in runs_of(spans, "leaf")
        if span["attributes"]["taskd.origin"] == "task"
    }
    assert set(children) == started and job.result["queued"] in started
    for child in children.values():
        assert (child["trace_id"], child["parent"]) == (trace_id, second["span_id"])
    (ran,) = started - {job.result["queued"]}
    assert job.result["ran"].startswith(f"00-{trace_id}-{children[ran]['span_id']}-")
    # Spans a task makes are the attempt's children, on the loop and in a thread alike.
    (inside,) = [span for span in spans if span["name"] == "inside the task"]
    assert (inside["trace_id"], inside["parent"]) == (trace_id, second["span_id"])
    in_threads = {span["parent"] for span in spans if span["name"] == "inside a thread"}
    assert {span["span_id"] for span in children.values()} <= in_threads

    # The tick: a span of its own, the parent of its job's attempt.
    (tick,) = [span for span in spans if span["name"].startswith("taskd.tick")]
    assert tick["name"] == "taskd.tick @startup" and tick["parent"] == ""
    assert tick["attributes"]["taskd.schedule"] == "@startup"
    assert tick["attributes"]["taskd.fired"] is True
    (ticked,) = [s for s in runs_of(spans, "leaf") if s["attributes"]["taskd.origin"] == "schedule"]
    assert (ticked["trace_id"], ticked["parent"]) == (tick["trace_id"], tick["span_id"])
    assert ticked["attributes"]["taskd.job_id"] in tick["attributes"]["taskd.job_ids"]
    assert collector.resources[0]["service.name"] == "taskd-under-test"
    assert taskd.stop() == 0, taskd.log


def test_a_job_created_without_a_trace_gets_one_of_its_own_for_all_its_attempts(
    daemon: Callable[..., Taskd], collector: Collector
) -> None:
    taskd = daemon().start(env=collector.environment())
    with taskd.client() as client:
        job = client.wait(client.enqueue("traced", {}, max_attempts=2).job_id, 60)
    assert job.status == "succeeded" and job.traceparent is None
    spans = collector.wait_for(lambda spans: len(runs_of(spans, "traced")) == 2 and spans)
    first, second = sorted(runs_of(spans, "traced"), key=lambda s: s["attributes"]["taskd.attempt"])
    assert first["parent"] == second["parent"] == ""  # roots, of one trace
    assert first["trace_id"] == second["trace_id"]
    assert second["links"] == [
        (first["trace_id"], first["span_id"], {"taskd.link": "first attempt"})
    ]
    assert taskd.stop() == 0, taskd.log


def test_the_traceparent_is_stored_from_every_way_in(
    daemon: Callable[..., Taskd],
    client_tracer: tuple[Any, InMemorySpanExporter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without tracing in taskd the traceparent is still kept, and passed on to the jobs a
    task starts; an invalid one is refused, naming the field."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    tracer, _ = client_tracer
    fixture = Path(__file__).parents[1] / "fixtures" / "tasks"
    taskd = daemon(http_config(), tasks_folder=fixture).start()
    other = TRACEPARENT.replace("b7ad", "c8be")
    with taskd.client() as client:
        explicit = client.enqueue("echo", {}, traceparent=TRACEPARENT).job_id
        with tracer.start_as_current_span("caller") as caller:
            ambient = client.enqueue("echo", {}).job_id
            (batched,) = client.enqueue_many([enqueue_params("echo", {})])
        untraced = client.enqueue("echo", {}).job_id

        async def enqueue_async() -> int:
            async with AsyncClient(str(taskd.socket)) as asynchronous:
                with tracer.start_as_current_span("async caller"):
                    return (await asynchronous.enqueue("echo", {})).job_id

        in_async = asyncio.run(enqueue_async())
        with pytest.raises(InvalidParams, match="traceparent: expected a W3C traceparent"):
            client.enqueue("echo", {}, traceparent="00-not-a-traceparent")
        # A task's jobs carry its own job's traceparent, taskd not tracing.
        parent = client.run_job("child", {}, traceparent=other).job
        stored = {job.id: job.traceparent for job in client.jobs(limit=100)}
    assert stored[explicit] == TRACEPARENT
    shown_job = taskd.ctl("job", str(explicit))
    assert f"trace:     {TRACEPARENT}" in shown_job.stdout, shown_job.stdout
    assert stored[ambient] == stored[batched.job_id] == _traceparent(caller)
    assert stored[untraced] is None
    assert stored[in_async] is not None and stored[in_async] != stored[ambient]
    assert parent.status == "succeeded", parent.error
    with taskd.client() as client:
        children = [job for job in client.jobs(task="echo") if job.parent_id == parent.id]
    assert len(children) == 2 and {job.traceparent for job in children} == {other}

    # taskctl: --traceparent, else $TRACEPARENT (a malformed one is ignored).
    flag = taskd.ctl("enqueue", "echo", "--traceparent", TRACEPARENT)
    variable = taskd.ctl("enqueue", "echo", env={"TRACEPARENT": other})
    malformed = taskd.ctl("enqueue", "echo", env={"TRACEPARENT": "rubbish"})
    refused = taskd.ctl("enqueue", "echo", "--traceparent", "00-abc")
    assert refused.returncode != 0 and "traceparent" in refused.stderr, refused.stderr
    with taskd.client() as client:
        shown = [client.job(int(done.stdout)).traceparent for done in (flag, variable, malformed)]
    assert shown == [TRACEPARENT, other, None]

    # HTTP: the `traceparent` header (a malformed one is ignored); a body's own wins.
    http = HttpClient.of(taskd)
    header = {"traceparent": TRACEPARENT}
    enqueued = http.post("/jobs", {"task": "echo"}, headers=header).json()["job_id"]
    body_wins = http.post("/jobs", {"task": "echo", "traceparent": other}, headers=header)
    ignored = http.post("/jobs", {"task": "echo"}, headers={"traceparent": "00-zz"})
    ran = http.get("/_nitro/tasks/echo", headers=header)
    assert ran.status == 200, ran.body
    with taskd.client() as client:
        assert client.job(enqueued).traceparent == TRACEPARENT
        assert client.job(body_wins.json()["job_id"]).traceparent == other
        assert client.job(ignored.json()["job_id"]).traceparent is None
        assert client.job(int(ran.headers["taskd-job-id"])).traceparent == TRACEPARENT
    assert taskd.stop() == 0, taskd.log


def test_without_otel_settings_nothing_of_opentelemetry_is_imported(
    taskd_factory: type[Taskd], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The extra is installed here; taskd, taskctl and the clients still never load it
    unless tracing is asked for (`-X importtime` lists every module a process imports)."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    taskd = taskd_factory().start(env={"PYTHONPROFILEIMPORTTIME": "1"})
    with taskd.client() as client:
        parent = client.run_job("child", {}).job  # ctx.run_task and ctx.enqueue too
    assert parent.status == "succeeded", parent.error
    done = taskd.ctl("enqueue", "echo", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0 and "taskctl" in done.stderr, done.stderr
    assert "opentelemetry" not in done.stderr
    socket = str(taskd.socket)
    modules = loaded_modules(
        f"from taskctl import Client; Client({socket!r}).run('echo', {{}}); "
        "from taskd.outbox import enqueue"
    )
    assert not any(module.startswith("opentelemetry") for module in modules)
    assert taskd.stop() == 0
    assert "| taskd.daemon" in taskd.log  # importtime's lines are there
    assert "opentelemetry" not in taskd.log


def test_otel_true_without_the_extra_exits_78_naming_it(short_tmp: Path) -> None:
    # A real taskd process in which OpenTelemetry cannot be imported, as after a plain
    # `pip install taskd`.
    (short_tmp / "taskd.toml").write_text("otel = true\n")
    blocked = "import sys; sys.modules['opentelemetry'] = None; from taskd.cli import main; "
    command = [sys.executable, "-c", blocked + "sys.exit(main(sys.argv[1:]))",
               "--socket", str(short_tmp / "s.sock"), "--tasks", str(short_tmp),
               "--database", str(short_tmp / "taskd.db")]  # fmt: skip
    started = subprocess.run(
        [*command, "--config", str(short_tmp / "taskd.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 78, started.stderr
    lines = started.stderr.splitlines()
    assert len(lines) == 1 and "pip install 'taskd[otel]'" in lines[0], started.stderr
    assert lines[0].startswith("taskd: otel = true: ")
    assert not (short_tmp / "s.sock").exists()


def test_an_exporter_that_is_not_installed_exits_78(short_tmp: Path) -> None:
    started = subprocess.run(
        [sys.executable, "-m", "taskd", "--socket", str(short_tmp / "s.sock"),
         "--tasks", str(short_tmp), "--database", str(short_tmp / "taskd.db")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "zipkin"},
    )  # fmt: skip
    assert started.returncode == 78, started.stderr
    assert "OTEL_TRACES_EXPORTER=zipkin: no span exporter 'zipkin' is installed" in started.stderr
    # `taskd --check` says so too; and what it would export to, when it can.
    for exporter, status, said in [
        ("zipkin", 78, "no span exporter 'zipkin' is installed"),
        ("otlp,console", 0, "tracing: on, exporting to otlp, console"),
    ]:
        checked = subprocess.run(
            [sys.executable, "-m", "taskd", "--check", "--tasks", str(short_tmp)],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "OTEL_TRACES_EXPORTER": exporter},
        )  # fmt: skip
        assert checked.returncode == status and said in checked.stdout + checked.stderr


def test_otel_variables_without_the_extra_are_a_warning(taskd_factory: type[Taskd]) -> None:
    taskd = taskd_factory()
    # The daemon's interpreter cannot import OpenTelemetry: a sitecustomize hides it.
    hide = taskd.root / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['opentelemetry'] = None\n")
    path = os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")]))
    taskd.start(env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": path})
    wait_until(lambda: "taskd runs without tracing" in taskd.log, what="the warning")
    assert "pip install 'taskd[otel]'" in taskd.log
    with taskd.client() as client:
        assert client.run("echo", {"a": 1}) == {"a": 1}
    assert taskd.stop() == 0


def test_an_unreachable_collector_holds_up_neither_jobs_nor_the_exit_for_long(
    taskd_factory: type[Taskd],
) -> None:
    closed = socket.socket()  # bound, not listening: connections are refused
    closed.bind(("127.0.0.1", 0))
    try:
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        taskd = taskd_factory().start(env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
        with taskd.client() as client:
            assert client.run("echo", {"n": 1}) == {"n": 1}  # spans wait in the queue
        began = time.monotonic()
        assert taskd.stop() == 0, taskd.log
    finally:
        closed.close()
    assert time.monotonic() - began < 20  # 5 s for the spans, and the usual stop
    assert "the last spans could not be sent within a few seconds" in taskd.log
