"""The dashboard's sign-in sessions: a bounded set, each signed out after an idle time.

A session is what a browser holds instead of a token: a random id in an HttpOnly cookie,
the access of the token it was opened with, and a CSRF token its forms send back. At most
`max_sessions` are held; signing in past that signs out the least recently used session
(logged and counted for `taskctl status`), so that people with a token are never locked
out. Idle sessions are dropped when they are next looked at, or to make room: no timer.
Standard library only.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Literal, NamedTuple

logger = logging.getLogger(__name__)

Access = Literal["full", "readonly"]


class Session(NamedTuple):
    id: str
    access: Access
    csrf: str  # sent back by every state-changing request of this session
    token: str  # the SHA-256 of the token it was opened with (taskd.http.settings.fingerprint)

    def csrf_matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(self.csrf.encode(), given.encode())


class Sessions:
    """The sessions signed in, least recently used first."""

    def __init__(
        self, max_sessions: int, idle: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_sessions = max_sessions
        self.idle = idle
        self._clock = clock
        self._used: OrderedDict[str, tuple[Session, float]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        self._drop_idle()
        return len(self._used)

    def open(self, access: Access, token: str, client: str) -> Session:
        """A new session; the least recently used one is signed out if there is no room."""
        self._drop_idle()
        while len(self._used) >= self.max_sessions:
            self._used.popitem(last=False)
            self.evicted += 1
            logger.warning(
                "dashboard: %d sessions are signed in, as many as max_sessions in [http] "
                "allows; signed out the least recently used one to let %s sign in",
                self.max_sessions,
                client,
            )
        session = Session(secrets.token_urlsafe(32), access, secrets.token_urlsafe(32), token)
        self._used[session.id] = (session, self._clock())
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The session with this id, if signed in and not idle too long; marks it used."""
        if session_id is None or (found := self._used.get(session_id)) is None:
            return None
        session, used = found
        now = self._clock()
        if now - used > self.idle:
            del self._used[session_id]
            return None
        self._used[session_id] = (session, now)
        self._used.move_to_end(session_id)
        return session

    def close(self, session_id: str) -> None:
        self._used.pop(session_id, None)

    def reconfigure(self, idle: float, tokens: Mapping[str, Access]) -> int:
        """After a reload: the new idle time; a session whose token is gone, or now grants
        other access, ends. How many ended."""
        self.idle = idle
        ended = [
            session_id
            for session_id, (session, _) in self._used.items()
            if tokens.get(session.token) != session.access
        ]
        for session_id in ended:
            del self._used[session_id]
        return len(ended)

    def _drop_idle(self) -> None:
        now = self._clock()
        while self._used:
            session_id, (_, used) = next(iter(self._used.items()))
            if now - used <= self.idle:
                break
            del self._used[session_id]
