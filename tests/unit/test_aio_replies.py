"""AsyncClient's reply reader: frames cut from the bytes however they arrive, split or
together, and a stream it cannot read failing the calls that wait on it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from taskctl import AsyncClient
from taskctl.aio import _Connection
from taskctl.client import CLIENT_MAX_FRAME, hello_params
from taskctl.errors import ProtocolError
from taskd.protocol import HEADER, HELLO, PROTOCOL_VERSION, HelloResult, Reply, encode_frame


class Sent(asyncio.Transport):
    """A transport that keeps what is written, and is closed when told."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: Any) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0


def connected() -> tuple[AsyncClient, _Connection]:
    loop = asyncio.get_running_loop()
    client = AsyncClient("/nonexistent/taskd.sock")
    connection = _Connection(client, loop)
    connection.connection_made(Sent())
    client._connection, client._loop = connection, loop
    return client, connection


def hello(request_id: int) -> bytes:
    return encode_frame(
        Reply(request_id, result=HelloResult(PROTOCOL_VERSION, "t", request_id, "full"))
    )


async def calls(client: AsyncClient, count: int) -> list[asyncio.Task[Any]]:
    tasks = [
        asyncio.create_task(client._send(HELLO.name, hello_params(), None)) for _ in range(count)
    ]
    await asyncio.sleep(0)  # the tasks, started before this, send their requests
    assert len(client._pending) == count
    return tasks


@pytest.mark.parametrize("chunk", [1, 3, 7, 40, 10_000])
async def test_replies_are_read_however_their_bytes_are_cut(chunk: int) -> None:
    client, connection = connected()
    tasks = await calls(client, 5)
    stream = b"".join(hello(request_id) for request_id in (3, 1, 5, 2, 4))
    for start in range(0, len(stream), chunk):
        connection.data_received(stream[start : start + chunk])
    results = await asyncio.gather(*tasks)
    assert [result.pid for result in results] == [1, 2, 3, 4, 5]
    assert not connection._buffer


async def test_a_reply_over_the_client_limit_fails_the_calls_and_hangs_up() -> None:
    client, connection = connected()
    (task,) = await calls(client, 1)
    connection.data_received(HEADER.pack(CLIENT_MAX_FRAME + 1) + b"\x80")
    with pytest.raises(ProtocolError, match="refusing it"):
        await task
    assert connection.transport.is_closing()
    assert client.server is None


async def test_a_hang_up_mid_frame_fails_the_calls_waiting() -> None:
    client, connection = connected()
    (task,) = await calls(client, 1)
    connection.data_received(hello(1)[:2])
    connection.connection_lost(None)
    with pytest.raises(ProtocolError, match="2 bytes read on a total of 4 expected bytes"):
        await task
