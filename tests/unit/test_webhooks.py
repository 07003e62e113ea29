"""The webhook client's bounds against real local sockets, and which rules take an event."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from taskd.models import WebhookRule
from taskd.store.core.webhooks import wants
from taskd.webhooks import MAX_RESPONSE, post, sign

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(answer: Answer) -> AsyncIterator[str]:
    """A local server's URL; once done, it waits for its connections to end (closed)."""
    ended: list[asyncio.Future[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ended.append(done := asyncio.get_running_loop().create_future())
        try:
            await answer(reader, writer)
        finally:
            writer.close()
            done.set_result(None)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/hook?x=1"
        await asyncio.wait_for(asyncio.gather(*ended), 10)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))  # fmt: skip
    return head + await reader.readexactly(length)


@pytest.fixture
async def huge() -> AsyncIterator[str]:
    sent = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent.append(await read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
        try:
            for _ in range(1000):  # more than taskd reads; it stops and closes
                writer.write(b"x" * 10000)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        writer.close()

    async for url in serve(answer):
        yield url
    assert b"POST /hook?x=1 HTTP/1.1" in sent[0] and sent[0].endswith(b"{}")


async def test_a_response_is_read_up_to_its_limit(huge: str) -> None:
    status, quoted = await post(huge, [], b"{}", timeout=10)
    assert status == 200 and quoted.startswith("xxx") and len(quoted) <= 200
    assert MAX_RESPONSE == 64 * 1024


async def test_a_silent_server_times_out() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # no answer; the end comes when taskd gives up and closes
        writer.close()

    async for url in serve(answer):
        with pytest.raises(TimeoutError):
            await post(url, [], b"{}", timeout=0.3)


async def test_a_redirect_is_not_followed() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    async for url in serve(answer):
        assert (await post(url, [], b"{}"))[0] == 302


def test_the_signature_is_the_hex_hmac_sha256_of_the_body() -> None:
    expected = hmac.new(b"k", b"body", hashlib.sha256).hexdigest()
    assert sign(b"k", b"body") == expected


@pytest.mark.parametrize(
    ("events", "tasks", "event", "task", "taken"),
    [
        ({"job.failed"}, (), "job.failed", "a", True),
        ({"job.failed"}, (), "job.succeeded", "a", False),
        ({"job.failed"}, ("reports:*",), "job.failed", "reports:build", True),
        ({"job.failed"}, ("reports:*",), "job.failed", "mail", False),
        ({"batch.finished"}, ("reports:*",), "batch.finished", None, False),
        ({"batch.finished"}, (), "batch.finished", None, True),
    ],
)
def test_which_rules_take_an_event(
    events: set[str], tasks: tuple[str, ...], event: str, task: str | None, taken: bool
) -> None:
    assert wants(WebhookRule("http://x", frozenset(events), tasks), event, task) is taken
