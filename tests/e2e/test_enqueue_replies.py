"""Enqueues are answered from their commit (no task per request), through the real daemon:
a client that hangs up with enqueues pending leaves them committed, a connection still has
at most MAX_IN_FLIGHT of them pending, and one pending at a stop is answered
`shutting_down` with its job kept."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator

import pytest

from taskd.server import MAX_IN_FLIGHT
from tests.backends import Backend
from tests.support import RawConnection, Taskd

FAR = 3600.0  # the jobs are not to run while the test looks at them
PIPELINED = 200  # enqueues sent in one write: more than a connection may have in flight


@pytest.fixture
def daemon(taskd_factory: type[Taskd]) -> Iterator[Taskd]:
    """A taskd on SQLite."""
    yield taskd_factory().start()


def enqueues(connection: RawConnection, count: int, tag: str) -> bytes:
    return b"".join(
        connection.request("enqueue", {"task": "echo", "payload": f"{tag}{n}", "delay": FAR})
        for n in range(count)
    )


def payloads(daemon: Taskd) -> list[str]:
    with daemon.client() as client:
        return sorted(job.payload for job in client.jobs(limit=1000, payloads=True))


def test_enqueues_of_a_client_that_hangs_up_are_committed_and_taskd_serves_on(
    backend: Backend,
) -> None:
    daemon = backend.daemon().start()
    for round_ in range(5):
        with RawConnection(daemon.socket) as connection:
            connection.sock.sendall(enqueues(connection, 50, f"r{round_}-"))
        # Gone before any reply: its enqueues were submitted as they arrived.
    expected = sorted(f"r{r}-{n}" for r in range(5) for n in range(50))
    deadline = time.monotonic() + 30
    while payloads(daemon) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert payloads(daemon) == expected
    with RawConnection(daemon.socket) as connection:
        assert "result" in connection.call("enqueue", {"task": "echo", "payload": "after"})
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log and "internal error" not in daemon.log


def test_pipelined_enqueues_over_the_in_flight_limit_are_refused_busy(daemon: Taskd) -> None:
    with RawConnection(daemon.socket) as connection:
        connection.sock.sendall(enqueues(connection, PIPELINED, "p"))
        replies = [connection.reply() for _ in range(PIPELINED)]
    answered = [reply for reply in replies if "result" in reply]
    busy = [reply for reply in replies if "error" in reply]
    assert all(reply["error"]["code"] == "busy" for reply in busy), busy[:1]
    # Read in one go, their commits cannot come between them: the limit holds exactly.
    assert len(answered) == MAX_IN_FLIGHT, [r.get("error") for r in replies][:3]
    assert f"{MAX_IN_FLIGHT} requests in flight" in busy[0]["error"]["message"]
    # Only the answered ones were stored, and each under the id its reply gave.
    ids = {reply["result"]["job_id"] for reply in answered}
    assert len(ids) == MAX_IN_FLIGHT
    with daemon.client() as client:
        stored = client.jobs(limit=1000, payloads=True)
    assert {job.id for job in stored} == ids
    assert daemon.stop() == 0


def test_an_enqueue_pending_at_a_stop_is_answered_shutting_down_and_kept(daemon: Taskd) -> None:
    """Its commit waits for a lock held by another process as SIGTERM comes: the reply
    says taskd is stopping (the job is kept), and the job is there after the restart."""
    holder = sqlite3.connect(daemon.database, isolation_level=None)
    with RawConnection(daemon.socket) as connection:
        holder.execute("BEGIN IMMEDIATE")  # the daemon's writes wait (busy_timeout: 5 s)
        try:
            connection.sock.sendall(enqueues(connection, 3, "stop"))
            # A read sent after them is answered first: the enqueues were read, and
            # submitted, before it; their commit waits for the lock.
            assert "result" in connection.call("list_tasks")
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGTERM)
            replies = [connection.reply() for _ in range(3)]
        finally:
            time.sleep(0.5)
            holder.execute("ROLLBACK")
            holder.close()
    assert [reply["error"]["code"] for reply in replies] == ["shutting_down"] * 3, replies
    assert "kept in the queue" in replies[0]["error"]["message"]
    assert daemon.stop() == 0, daemon.log  # already stopping: waits for its exit
    daemon.start()
    assert payloads(daemon) == ["stop0", "stop1", "stop2"]
    assert daemon.stop() == 0


def test_a_refused_enqueue_is_answered_before_a_pending_one(daemon: Taskd) -> None:
    """A refusal needs no commit: it is sent as the request is read, ahead of the reply of
    an enqueue sent before it that waits for its commit."""
    holder = sqlite3.connect(daemon.database, isolation_level=None)
    with RawConnection(daemon.socket) as connection:
        holder.execute("BEGIN IMMEDIATE")
        try:
            good = connection.request("enqueue", {"task": "echo", "payload": "ok", "delay": FAR})
            bad = connection.request("enqueue", {"task": "no-such-task"})
            connection.sock.sendall(good + bad)
            first = connection.reply()
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        second = connection.reply()
    assert first["id"] == 3 and first["error"]["code"] == "unknown_task", first
    assert second["id"] == 2 and "result" in second, second
    assert daemon.stop() == 0
