"""Many callers of one run over several connections: one execution, and every caller
answered with it (the control server answers them all from one callback)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from taskd.server import MAX_IN_FLIGHT
from tests.support import RawConnection, Taskd

CONNECTIONS = 4
CALLERS = 50  # a connection (MAX_IN_FLIGHT is 128)


def test_callers_of_one_run_on_many_connections_share_its_end(taskd: Taskd, tmp_path: Path) -> None:
    release = tmp_path / "release"
    os.mkfifo(release)  # the task runs until the test writes to it
    run = {"task": "slow", "payload": {"until": str(release), "seconds": 0}}
    connections = [RawConnection(taskd.socket) for _ in range(CONNECTIONS)]
    replies: list[dict[str, Any]] = []
    try:
        for connection in connections:
            frames = [connection.request("run", run) for _ in range(CALLERS)]
            connection.sock.sendall(
                b"".join([*frames, connection.request("run", {**run, "detach": True})])
            )
        last_ids = []
        for connection in connections:
            # The detached run, sent after the others, is answered once it is stored: by
            # then every run before it on the connection has joined the execution.
            reply = connection.reply()
            assert reply["result"]["joined"], reply
            last_ids.append(reply["id"])
            replies.append(reply)
        gone = connections.pop()  # a caller that hangs up takes nothing from the others
        gone.sock.close()
        release.write_bytes(b"go")
        for connection in connections:
            answered = [connection.reply() for _ in range(CALLERS)]
            assert {reply["id"] for reply in answered} == set(range(2, 2 + CALLERS))
            replies += answered
    finally:
        for connection in connections:
            connection.sock.close()
    jobs = {reply["result"]["job"]["id"] for reply in replies}
    assert len(jobs) == 1, jobs
    assert [reply["result"]["joined"] for reply in replies].count(False) <= 1
    ended = [reply for reply in replies if reply["id"] not in last_ids]
    assert len(ended) == CALLERS * (CONNECTIONS - 1)
    assert {reply["result"]["job"]["status"] for reply in ended} == {"succeeded"}


def test_runs_waiting_for_their_end_count_against_a_connections_bound(
    taskd: Taskd, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    os.mkfifo(release)
    run = {"task": "slow", "payload": {"until": str(release), "seconds": 0}}
    with RawConnection(taskd.socket) as connection:
        waiting = [connection.request("run", run) for _ in range(MAX_IN_FLIGHT - 1)]
        connection.sock.sendall(
            b"".join([*waiting, connection.request("run", {**run, "detach": True})])
        )
        assert connection.reply()["result"]["joined"]  # the runs before it wait for the end
        connection.sock.sendall(connection.request("run", run) + connection.request("run", run))
        refused = connection.reply()  # the one over the bound, at once
        assert refused["id"] == MAX_IN_FLIGHT + 3, refused
        assert refused["error"]["code"] == "busy", refused
        release.write_bytes(b"go")
        answered = [connection.reply() for _ in range(MAX_IN_FLIGHT)]
    assert {reply["result"]["job"]["status"] for reply in answered} == {"succeeded"}
