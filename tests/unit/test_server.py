"""The control server's shared receive budget for large frames (taskd.stream_limits),
replies it cannot build, and methods answered at once (no task per request)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from taskd.access import AccessPolicy
from taskd.deferred import Deferred
from taskd.protocol import (
    DEFAULT_MAX_FRAME,
    HEADER,
    MAX_HELLO_FRAME,
    EnqueueParams,
    ErrorCode,
    Params,
    Request,
    RpcError,
    encode_frame,
)
from taskd.server import (
    MAX_IN_FLIGHT,
    AtOnce,
    ControlServer,
    SocketInUse,
    bind_socket,
    release_socket,
)
from taskd.stream_limits import ByteBudget
from tests.support import short_tempdir

MIB = 1024 * 1024


@contextlib.asynccontextmanager
async def served(
    handler: Callable[[str, Params], Awaitable[Any]],
    max_connections: int = 4,
    read_timeout: float = 5,
    *,
    at_once: AtOnce | None = None,
    idle_timeout: float = 300.0,
) -> AsyncIterator[tuple[ControlServer, str]]:
    """A control server answering with `handler`, started on a socket of its own; its path."""
    server = ControlServer(
        handler,
        AccessPolicy(),
        server_name="test",
        max_frame=DEFAULT_MAX_FRAME,
        max_connections=max_connections,
        read_timeout=read_timeout,
        at_once=at_once,
        idle_timeout=idle_timeout,
    )
    folder = short_tempdir()
    try:
        listener, lock = bind_socket(folder / "s.sock", 0o600, None)
        await server.start(listener)
        try:
            yield server, str(folder / "s.sock")
        finally:
            await server.close()
            os.close(lock)
    finally:
        shutil.rmtree(folder)


def frames(requests: list[tuple[int, str, dict[str, Any]]]) -> bytes:
    return b"".join(
        encode_frame(Request(request_id, method, msgspec.Raw(msgspec.msgpack.encode(params))))
        for request_id, method, params in requests
    )


async def read_reply(reader: asyncio.StreamReader) -> Any:
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    return msgspec.msgpack.decode(await reader.readexactly(size))


async def test_small_frames_never_wait_for_the_budget() -> None:
    budget = ByteBudget(10 * MIB, exempt=MAX_HELLO_FRAME)
    assert await budget.wait_for(10 * MIB) == 0.0
    assert await asyncio.wait_for(budget.wait_for(MAX_HELLO_FRAME), 0.1) == 0.0
    assert budget.used == 10 * MIB
    budget.give_back(MAX_HELLO_FRAME)
    budget.give_back(10 * MIB)
    assert budget.used == 0


async def test_large_frames_wait_until_the_budget_has_room() -> None:
    budget = ByteBudget(10 * MIB, exempt=MAX_HELLO_FRAME)
    await budget.wait_for(6 * MIB)
    await budget.wait_for(4 * MIB)
    third = asyncio.create_task(budget.wait_for(5 * MIB))
    fourth = asyncio.create_task(budget.wait_for(5 * MIB))
    await asyncio.sleep(0.05)
    assert not third.done() and not fourth.done()
    budget.give_back(6 * MIB)  # room for one of them
    await asyncio.sleep(0.01)
    assert [third.done(), fourth.done()].count(True) == 1
    budget.give_back(4 * MIB)
    waited = await asyncio.wait_for(asyncio.gather(third, fourth), 1)
    assert all(seconds >= 0.04 for seconds in waited)
    assert budget.used == 10 * MIB


async def test_a_waiter_that_gives_up_takes_nothing() -> None:
    budget = ByteBudget(10 * MIB, exempt=MAX_HELLO_FRAME)
    await budget.wait_for(8 * MIB)
    waiter = asyncio.create_task(budget.wait_for(8 * MIB))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    budget.give_back(8 * MIB)
    assert budget.used == 0
    assert await asyncio.wait_for(budget.wait_for(9 * MIB), 0.1) == 0.0


def test_taking_at_once_refuses_what_does_not_fit_now() -> None:
    """The HTTP listener's bodies: refused (503), not waited for, when the budget is full."""
    budget = ByteBudget(10 * MIB)
    assert budget.take(6 * MIB) and not budget.take(5 * MIB) and budget.used == 6 * MIB
    budget.give_back(6 * MIB)
    assert budget.take(5 * MIB) and budget.used == 5 * MIB


class _OutOfMemory(dt.tzinfo):
    """A time zone whose offset cannot be had: encoding a time in it raises MemoryError."""

    def utcoffset(self, when: dt.datetime | None) -> dt.timedelta:
        raise MemoryError


async def test_a_reply_that_cannot_be_built_is_answered_with_an_error() -> None:
    async def handler(method: str, params: Params) -> Any:
        return dt.datetime(2026, 1, 1, tzinfo=_OutOfMemory())

    async with served(handler) as (_, path):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(frames([(1, "hello", {"protocol": 1}), (2, "status", {})]))
        async with asyncio.timeout(10):  # no reply at all was the bug
            replies = [await read_reply(reader) for _ in range(2)]
        assert "result" in replies[0]
        assert replies[1]["id"] == 2 and replies[1]["error"]["code"] == "internal"
        assert "the reply could not be encoded: MemoryError" in replies[1]["error"]["message"]
        writer.close()


def test_a_released_socket_leaves_no_files_and_can_be_taken_again() -> None:
    folder = short_tempdir()
    path = folder / "s.sock"
    try:
        listener, lock = bind_socket(path, 0o600, None)
        with pytest.raises(SocketInUse, match="another taskd is already serving"):
            bind_socket(path, 0o600, None)
        listener.close()
        release_socket(path, lock)
        assert list(folder.iterdir()) == []
        listener, lock = bind_socket(path, 0o600, None)
        listener.close()
        release_socket(path, lock)
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("piece", [1, 3, 5, 1000])
async def test_frames_are_read_however_their_bytes_are_cut(piece: int) -> None:
    """Frames split over many writes, and several in one, are each read and answered."""

    async def handler(method: str, params: Params) -> Any:
        return method

    async with served(handler) as (_, path):
        reader, writer = await asyncio.open_unix_connection(path)
        requests = [(1, "hello", {"protocol": 1}), (2, "status", {}), (3, "list_tasks", {})]
        stream = frames(requests)
        for start in range(0, len(stream), piece):
            writer.write(stream[start : start + piece])
            await asyncio.sleep(0)  # a turn of the loop: the server reads this piece alone
        async with asyncio.timeout(10):
            replies = {reply["id"]: reply for reply in [await read_reply(reader) for _ in requests]}
        assert replies[1]["result"]["server"] == "test"
        assert replies[2]["result"] == "status" and replies[3]["result"] == "list_tasks"
        writer.close()


async def test_a_frame_waits_for_the_shared_budget_and_is_read_once_there_is_room() -> None:
    """Four connections hold the budget with frames they do not finish; a fifth's frame
    waits for room, which comes when they are cut off after read_timeout, and is then read
    and answered: its wait for the budget does not count against its own read_timeout."""

    async def handler(method: str, params: Params) -> Any:
        return method

    size = 13 * MIB  # four of them hold 52 of the 64 MiB; a fifth does not fit
    async with served(handler, max_connections=8, read_timeout=0.5) as (_, path):
        streams = [await asyncio.open_unix_connection(path) for _ in range(5)]
        for reader, writer in streams:
            writer.write(frames([(1, "hello", {"protocol": 1})]))
            await read_reply(reader)
        for _, writer in streams[:4]:
            writer.write(HEADER.pack(size) + b"x")  # a frame begun, never finished
        await asyncio.sleep(0)  # a turn of the loop: the server reads them
        # A whole frame of `size` bytes (a request with a field too many: read, it is
        # answered under its id; cut off, with an error of no id).
        body = msgspec.msgpack.encode({"id": 2, "method": "status", "params": {}, "x": "y" * size})
        last_reader, last_writer = streams[4]
        last_writer.write(HEADER.pack(len(body)) + body)
        async with asyncio.timeout(10):
            replies = [await read_reply(reader) for reader, _ in streams[:4]]
            last = await read_reply(last_reader)
        assert all("not completed within 0.5s" in r["error"]["message"] for r in replies)
        assert last["id"] == 2 and "not a valid request" in last["error"]["message"], last
        for _, writer in streams:
            writer.close()


async def test_a_connection_whose_peer_hangs_up_mid_request_is_let_go() -> None:
    """Its request is cancelled, and nothing (no idle timer) keeps the connection alive."""
    started = asyncio.Event()

    async def handler(method: str, params: Params) -> Any:
        started.set()
        await asyncio.Event().wait()  # a wait that never ends by itself

    async with served(handler) as (server, path):
        _, writer = await asyncio.open_unix_connection(path)
        writer.write(frames([(1, "hello", {"protocol": 1}), (2, "status", {})]))
        async with asyncio.timeout(10):
            await started.wait()
        (connection,) = server._connections
        (request,) = connection.in_flight
        writer.close()
        async with asyncio.timeout(10):
            await asyncio.gather(request, return_exceptions=True)
        assert request.cancelled()
        await asyncio.sleep(0)  # a turn of the loop: the request's callbacks run
        assert not server._connections
        assert connection.timer is None  # an idle timer would hold it for idle_timeout


class Commits:
    """Answers `enqueue` at once, as the daemon's dispatch does: a refusal raised, or a
    Deferred result whose future the test settles (the write's commit)."""

    answered_at_once = frozenset({"enqueue"})

    def __init__(self) -> None:
        self.pending: list[asyncio.Future[int]] = []
        self.arrived = asyncio.Event()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.pending) < count:
                self.arrived.clear()
                await self.arrived.wait()

    def answer_at_once(self, method: str, params: Params) -> Any:
        assert isinstance(params, EnqueueParams)
        if params.task == "bad":
            raise RpcError(ErrorCode.UNKNOWN_TASK, "unknown task 'bad'")
        future = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        self.arrived.set()
        deferred: Deferred[dict[str, int]] = Deferred(future, lambda job: {"job_id": job})
        deferred.translate = lambda exc: RpcError(ErrorCode.STORE_ERROR, str(exc))
        return deferred


async def never_awaited(method: str, params: Params) -> Any:
    raise AssertionError(f"{method} is answered at once, not by the awaited handler")


def enqueue(request_id: int, task: str = "t") -> tuple[int, str, dict[str, Any]]:
    return (request_id, "enqueue", {"task": task})


async def test_methods_answered_at_once_are_replied_from_their_future_with_no_task() -> None:
    """Refused as they arrive, else answered once their write's future is done (an error
    as its translation says), with no asyncio task per request; the connection is busy
    (no idle timer) while any is pending; over MAX_IN_FLIGHT pending they are refused."""
    commits = Commits()
    async with served(never_awaited, at_once=commits, idle_timeout=0.2) as (server, path):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(frames([(1, "hello", {"protocol": 1})]))
        await read_reply(reader)
        tasks = len(asyncio.all_tasks())
        count = MAX_IN_FLIGHT + 2
        writer.write(frames([enqueue(2, "bad"), *(enqueue(n) for n in range(3, 3 + count))]))
        async with asyncio.timeout(10):
            early = [await read_reply(reader) for _ in range(3)]  # the refusals come at once
        assert early[0]["id"] == 2 and early[0]["error"]["code"] == "unknown_task"
        assert [reply["error"]["code"] for reply in early[1:]] == ["busy", "busy"]
        assert len(commits.pending) == MAX_IN_FLIGHT
        assert len(asyncio.all_tasks()) == tasks  # none per request
        await asyncio.sleep(0.4)  # over idle_timeout: pending requests keep it open
        (connection,) = server._connections
        assert connection.busy and not connection.transport.is_closing()
        commits.pending[0].set_exception(OSError("disk full"))
        for job, future in enumerate(commits.pending[1:], 1):
            future.set_result(job)
        async with asyncio.timeout(10):
            replies = {
                reply["id"]: reply
                for reply in [await read_reply(reader) for _ in range(MAX_IN_FLIGHT)]
            }
        assert replies[3]["error"]["code"] == "store_error"
        assert all(
            replies[n + 3] == {"id": n + 3, "result": {"job_id": n}}
            for n in range(1, MAX_IN_FLIGHT)
        )
        assert not connection.busy and not server._waiting
        writer.close()


async def enqueued(
    path: Path, commits: Commits, *ids: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has said hello and sent enqueues of these ids, now submitted."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(frames([(1, "hello", {"protocol": 1}), *(enqueue(i) for i in ids)]))
    await read_reply(reader)
    await commits.wait_for(len(ids))
    return reader, writer


class Unencodable(Commits):
    """As Commits, with a result that cannot be encoded."""

    def answer_at_once(self, method: str, params: Params) -> Any:
        deferred = super().answer_at_once(method, params)
        deferred.shape = lambda job: dt.datetime(2026, 1, 1, tzinfo=_OutOfMemory())
        return deferred


async def test_a_deferred_result_that_cannot_be_encoded_is_answered_with_an_error() -> None:
    """One request waiting for it (an enqueue's: its result is encoded in its reply frame)
    gets an internal error in its place."""
    commits = Unencodable()
    async with served(never_awaited, at_once=commits) as (_, path):
        reader, writer = await enqueued(path, commits, 2)
        commits.pending[0].set_result(1)
        async with asyncio.timeout(10):
            reply = await read_reply(reader)
        assert reply["id"] == 2 and reply["error"]["code"] == "internal"
        assert "the reply could not be encoded: MemoryError" in reply["error"]["message"]
        writer.close()


async def test_a_peer_that_hangs_up_with_writes_pending_leaves_nothing_behind() -> None:
    """The writes go on (the future is the store's); the connection and its waits go."""
    commits = Commits()
    async with served(never_awaited, at_once=commits) as (server, path):
        reader, writer = await enqueued(path, commits, 2, 3)
        writer.write_eof()  # hung up: taskd closes its end (and lets the connection go)
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
        assert not server._connections
        for future in commits.pending:
            future.set_result(1)
        await asyncio.sleep(0)  # a turn of the loop: the futures' callbacks run
        assert not server._waiting


async def test_writes_pending_at_close_are_answered_shutting_down() -> None:
    commits = Commits()
    async with served(never_awaited, at_once=commits) as (server, path):
        reader, writer = await enqueued(path, commits, 2)
        await server.close()  # REPLY_GRACE, then shutting_down
        reply = await read_reply(reader)
        assert reply["id"] == 2 and reply["error"]["code"] == "shutting_down"
        commits.pending[0].set_result(1)  # committed later: nothing more is sent
        await asyncio.sleep(0)
        assert await reader.read() == b""
        writer.close()
