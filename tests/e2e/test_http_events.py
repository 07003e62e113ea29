"""`GET /jobs/ID/logs` and `GET /events` (Server-Sent Events) against a real taskd."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.http_support import READONLY_TOKEN, HttpClient, http_config, http_port, http_stats
from tests.support import Taskd, wait_until


@pytest.fixture
def daemon(taskd_factory: type[Taskd]) -> Taskd:
    config = http_config(max_event_streams=2, event_heartbeat="300ms")
    return taskd_factory(config=config).start()


class Stream:
    """One `GET /events`, read as Server-Sent Events: (event, data) or ("comment", text)."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.response = response

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        kind: str | None = None
        while line := self.response.readline():
            text = line.decode().rstrip("\n")
            if text.startswith(":"):
                yield "comment", text[1:].strip()
            elif text.startswith("event: "):
                kind = text.removeprefix("event: ")
            elif text.startswith("data: "):
                assert kind is not None, text
                yield kind, json.loads(text.removeprefix("data: "))
                kind = None

    def until(self, done: Callable[[list[tuple[str, Any]]], bool]) -> list[tuple[str, Any]]:
        seen: list[tuple[str, Any]] = []
        for item in self:
            seen.append(item)
            if done(seen):
                return seen
        raise AssertionError(f"the stream ended after {seen[-5:]}")


@contextmanager
def events(daemon: Taskd, query: str = "", token: str = READONLY_TOKEN) -> Iterator[Stream]:
    connection = http.client.HTTPConnection("127.0.0.1", http_port(daemon), timeout=30)
    try:
        connection.request("GET", "/events" + query, headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        assert response.headers["content-type"] == "text/event-stream"
        yield Stream(response)
        response.close()
    finally:
        connection.close()


def test_a_jobs_logs_over_http_are_taskctls(daemon: Taskd) -> None:
    done = daemon.ctl("--json", "run", "chatty", "--payload", '{"lines": 3}')
    job_id = json.loads(done.stdout)["id"]
    api = HttpClient.of(daemon, token=READONLY_TOKEN)  # reading needs no more
    reply = api.get(f"/jobs/{job_id}/logs")
    assert reply.status == 200
    told = json.loads(daemon.ctl("--json", "logs", str(job_id)).stdout)
    for line in (*reply.json()["lines"], *told["lines"]):
        line.pop("at")  # Unix seconds over HTTP, ISO-8601 from taskctl
    assert reply.json() | {"lines": []} == told | {"lines": []}
    messages = [line["message"] for line in reply.json()["lines"]]
    assert messages == [line["message"] for line in told["lines"]] == ["line 0", "line 1", "line 2"]
    missing = api.get("/jobs/999999/logs")
    assert missing.status == 404 and missing.error["code"] == "unknown_job"


def test_events_stream_a_tasks_jobs_with_a_read_only_token(daemon: Taskd) -> None:
    with events(daemon, "?task=chatty") as stream:
        assert next(iter(stream)) == ("subscribed", _event("subscribed"))
        daemon.ctl("enqueue", "echo", "--payload", "{}")
        job_id = json.loads(
            daemon.ctl("--json", "enqueue", "chatty", "--payload", '{"lines": 2}').stdout
        )["job_id"]
        seen = stream.until(lambda seen: ("state", _state(job_id, "succeeded")) in seen)
    assert [data["line"]["message"] for kind, data in seen if kind == "log"] == [
        "line 0",
        "line 1",
    ]
    for kind, data in seen:
        assert kind in ("comment", "changed") or data["task"] == "chatty", (kind, data)
        assert kind in ("comment", "changed") or data["job_id"] == job_id


def test_a_reader_that_falls_behind_gets_a_dropped_event(daemon: Taskd) -> None:
    with events(daemon) as stream:
        daemon.ctl("run", "chatty", "--payload", '{"lines": 5000}')  # 5000 events at once
        seen = stream.until(lambda seen: any(kind == "dropped" for kind, _ in seen))
    dropped = next(data["dropped"] for kind, data in seen if kind == "dropped")
    lines = [kind for kind, _ in seen if kind == "log"]
    assert dropped > 4000 and len(lines) <= 256, (dropped, len(lines))


def test_heartbeats_keep_a_quiet_stream_open(daemon: Taskd) -> None:
    with events(daemon, "?job=999999") as stream:
        seen = stream.until(lambda seen: [kind for kind, _ in seen].count("comment") >= 3)
    assert {data for kind, data in seen if kind == "comment"} == {"keepalive"}


def test_streams_are_bounded_counted_and_end_cleanly_when_taskd_stops(daemon: Taskd) -> None:
    with events(daemon) as first, events(daemon, "?logs=false") as second:
        next(iter(first)), next(iter(second))
        assert http_stats(daemon)["event_streams"] == 2
        refused = HttpClient.of(daemon).get("/events")
        assert refused.status == 503 and refused.error["code"] == "busy"
        assert "max_event_streams" in refused.error["message"]
        assert HttpClient.of(daemon).get("/jobs").status == 200  # others still get through
        stats = http_stats(daemon)
        assert (stats["event_streams"], stats["max_event_streams"]) == (2, 2)
        assert stats["refused_event_streams"] == 1
        metrics = daemon.ctl("metrics").stdout
        assert "taskd_http_event_streams 2.0" in metrics
        ended: list[list[tuple[str, Any]]] = []
        reader = threading.Thread(target=lambda: ended.append(list(first)))
        reader.start()
        assert daemon.stop() == 0
        reader.join(30)
        # The response ends as a response does (no cut-off: http.client would raise).
        assert ended and ended[0][-1] == ("comment", "taskd is stopping"), ended


def test_a_stream_closed_by_its_reader_is_let_go(daemon: Taskd) -> None:
    with events(daemon) as stream:
        next(iter(stream))
    wait_until(lambda: http_stats(daemon)["event_streams"] == 0, what="the stream to end")


def _event(kind: str, **fields: Any) -> dict[str, Any]:
    plain = {"kind": kind, "job_id": None, "task": None, "status": None}
    return {**plain, "progress": None, "line": None, "dropped": 0, **fields}


def _state(job_id: int, status: str) -> dict[str, Any]:
    return _event("state", job_id=job_id, task="chatty", status=status)
