"""Who holds the HTTP listener's connections: callers that have shown a token, and the rest.

`max_connections` is split in two. The *authenticated* pool (half, rounded up) holds the
connections that have shown a credential: a request with a valid token or, on a `unix:`
listener, a peer that the access rules allow, known when it connects. The *unauthenticated
share* (`max_connections // 2`) holds every other connection, and every new connection
starts there: until its request arrives, nothing tells a caller with a token from a flood.

- **The share makes room by closing its oldest connection.** A new connection that finds
  the share full takes the place of the connection that has been in it longest, which is
  closed at once; so a flood that fills the share closes its own connections, and a
  caller, whose request follows its connection within milliseconds, has moved to the
  authenticated pool long before as many newer connections have arrived as the share holds.
  The oldest that has sent part of a request head and stalled goes first (a slowloris
  flood's connections), before one that has sent nothing yet or waits between requests: a
  caller held up between connecting and sending keeps its place while such a flood lasts.
- **Except one whose request has not been read yet.** A connection whose first bytes are
  already waiting when it is accepted is not closed for room until they have been read,
  so that a burst of connections cannot push out a caller before taskd has even looked
  at its request. While every connection in the share is such a one, the listener accepts
  no more: the next ones wait in the kernel's queue, for a turn of the event loop (the
  one in which those bytes are read). No new connection is refused.
- **The authenticated pool makes room by closing an idle connection:** the oldest one
  kept alive and waiting for its next request. If none is idle, the request with a token
  gets 503 `busy`, except `/healthz`, which is served on either footing.

No I/O here: taskd.http.server accepts, reads, and closes the connections this names.
"""

from __future__ import annotations

import asyncio
from typing import Generic, Literal, NamedTuple, Protocol, TypeVar


class Member(Protocol):
    @property
    def idle(self) -> bool:
        """Whether it waits for a request, with nothing of one received."""
        ...

    @property
    def in_head(self) -> bool:
        """Whether part of a request's line and headers has come, and not the rest."""
        ...


C = TypeVar("C", bound=Member)


class Closing(NamedTuple, Generic[C]):
    """A connection to close to make room for another, and why."""

    connection: C
    reason: Literal["idle", "unauthenticated_share"]


class Admission(Generic[C]):
    """The two pools of the HTTP listener's connections, oldest first in each."""

    def __init__(self, max_connections: int) -> None:
        self.share = max(1, max_connections // 2)
        self.max_authenticated = max(1, max_connections - self.share)
        self._unauthenticated: dict[C, None] = {}
        self._authenticated: dict[C, None] = {}
        self._unread: set[C] = set()  # accepted with bytes waiting that are not read yet
        self._changed = asyncio.Event()

    @property
    def open(self) -> int:
        return len(self._unauthenticated) + len(self._authenticated)

    @property
    def authenticated_count(self) -> int:
        return len(self._authenticated)

    def authenticated(self, connection: C) -> bool:
        return connection in self._authenticated

    async def wait_for_room(self) -> None:
        """Until a new connection can enter: not while the share is full of unread ones."""
        while len(self._unauthenticated) >= self.share and self._oldest_read() is None:
            self._changed.clear()
            await self._changed.wait()

    async def wait_for_change(self, timeout: float) -> None:
        """Until a connection leaves or is read, or `timeout` seconds have passed."""
        self._changed.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            pass

    def enter(self, connection: C, *, unread: bool, credential: bool) -> Closing[C] | None:
        """Count a new connection; the connection to close to make room for it, if any.

        With a `credential` (a `unix:` listener's allowed peer) it goes to the authenticated
        pool if there is room, or an idle connection to close; else to the share.
        """
        if credential:
            admitted, closing = self._make_room_for_authenticated()
            if admitted:
                self._authenticated[connection] = None
                return closing
        closing = None
        # Two listeners (IPv4 and IPv6) may each have waited for the same room: then the
        # share holds one more for a moment rather than close an unread connection.
        victim = self._victim() if len(self._unauthenticated) >= self.share else None
        if victim is not None:
            self.leave(victim)
            closing = Closing(victim, "unauthenticated_share")
        self._unauthenticated[connection] = None
        if unread:
            self._unread.add(connection)
        return closing

    def read(self, connection: C) -> None:
        """Its first bytes have been read: from now on it may be closed to make room."""
        if connection in self._unread:
            self._unread.discard(connection)
            self._changed.set()

    def authenticate(self, connection: C) -> tuple[bool, Closing[C] | None]:
        """Move a connection that showed a credential to the authenticated pool: whether it
        was moved, and the idle connection to close to make room for it, if any."""
        if connection in self._authenticated:
            return True, None
        admitted, closing = self._make_room_for_authenticated()
        if admitted:
            self._unauthenticated.pop(connection, None)
            self._unread.discard(connection)
            self._authenticated[connection] = None
            self._changed.set()
        return admitted, closing

    def leave(self, connection: C) -> None:
        """The connection is closing (or lingering after a last error): it holds no room."""
        self._unauthenticated.pop(connection, None)
        self._authenticated.pop(connection, None)
        self._unread.discard(connection)
        self._changed.set()

    def _make_room_for_authenticated(self) -> tuple[bool, Closing[C] | None]:
        if len(self._authenticated) < self.max_authenticated:
            return True, None
        idle = next((member for member in self._authenticated if member.idle), None)
        if idle is None:
            return False, None
        self.leave(idle)
        return True, Closing(idle, "idle")

    def _oldest_read(self) -> C | None:
        unread = self._unread
        return next((member for member in self._unauthenticated if member not in unread), None)

    def _victim(self) -> C | None:
        """Whom the share closes for a new connection: the oldest stalled in a request head,
        else the oldest whose first bytes have been read."""
        stalled = next((member for member in self._unauthenticated if member.in_head), None)
        return stalled if stalled is not None else self._oldest_read()
