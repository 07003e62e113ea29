"""What both listeners (the control socket, taskd.server; the HTTP API, taskd.http.server)
do at their limits: share a budget of bytes held at once over all their connections, and
close a refused connection without losing the refusal. (Who gets a connection, and the
counting and logging of refusals, is taskd.connection_limits.)
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable
from contextlib import suppress

# A refused connection is closed after what its client still sends is read and dropped,
# for LINGER seconds at most; past MAX_LINGERING such connections at once, at once.
LINGER = 2.0
MAX_LINGERING = 64


class ByteBudget:
    """Bytes held at once over all connections (frame or request bodies being received),
    capped at `limit`; sizes up to `exempt` are not counted."""

    def __init__(self, limit: int, *, exempt: int = 0) -> None:
        self._limit = limit
        self._exempt = exempt
        self._used = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def used(self) -> int:
        return self._used

    def take(self, size: int) -> bool:
        """Hold `size` bytes if they fit now; False (nothing held) if they do not."""
        if size <= self._exempt:
            return True
        if self._used + size > self._limit:
            return False
        self._used += size
        return True

    async def wait_for(self, size: int) -> float:
        """Hold `size` bytes, waiting while others hold the budget (one that exceeds it
        alone waits until nothing else is held); the seconds waited."""
        if size <= self._exempt:
            return 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        waited = False
        while self._used and self._used + size > self._limit:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with suppress(ValueError):
                    self._waiters.remove(waiter)
            waited = True
        self._used += size
        return loop.time() - started if waited else 0.0

    def give_back(self, size: int) -> None:
        if size <= self._exempt:
            return
        self._used -= size
        while self._waiters:  # each waiter checks again whether its bytes fit now
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class Lingering:
    """Closes refused connections gently, at most MAX_LINGERING at once."""

    def __init__(self, *, drop_at_most: int, chunk: int) -> None:
        self._drop_at_most = drop_at_most  # bytes read and dropped from one client
        self._chunk = chunk
        self._lingering = 0

    async def close_after(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sent: Awaitable[None]
    ) -> None:
        """Close the connection once `sent` (the refusal) is written, without losing it.

        A socket closed while the client's request sits unread in it is reset, and the reset
        throws away the refusal before the client reads it. So the refusal is followed by an
        end-of-stream, and what the client sends is read and dropped (for LINGER seconds at
        most, by at most MAX_LINGERING refused connections at once) before the close.
        """
        try:
            with suppress(ConnectionError, OSError, TimeoutError):
                await sent
                if self._lingering < MAX_LINGERING and writer.can_write_eof():
                    self._lingering += 1
                    try:
                        writer.write_eof()
                        async with asyncio.timeout(LINGER):
                            dropped = 0
                            while dropped < self._drop_at_most and (
                                data := await reader.read(self._chunk)
                            ):
                                dropped += len(data)
                    finally:
                        self._lingering -= 1
        finally:
            writer.close()
