"""Who gets one more control connection: a fair share per user, and room kept for operators.

Root and taskd's own user (the operators) have `max_connections` connections of their own,
so no other user can shut them out. Every other user may hold `max_per_user` connections,
and all of them together `max_connections`. Refusals are counted and logged by a
`RefusalLog`, which the HTTP listener uses too: with the user's uid, at most once a minute
per user and reason, with the number refused in between.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Hashable

from taskd.access import user_name
from taskd.models import counted

logger = logging.getLogger(__name__)

LOG_INTERVAL = 60.0  # seconds between two log lines about the same user and reason
BUSY = "taskd has too many open connections; try again later"


class RefusalLog:
    """Refusals counted by reason, and logged at most once a minute per key and reason.

    A flood of refusals costs a line a minute, and the next line says how many were refused
    in between; `counts` keeps the totals since start, for `taskctl status`.
    """

    def __init__(
        self,
        what: str,
        log: logging.Logger = logger,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._what = what  # "a control connection"
        self._log = log
        self._clock = clock
        self.counts: Counter[str] = Counter()
        self._logged: dict[tuple[Hashable, str], tuple[float, int]] = {}  # -> (when, unlogged)

    def refused(self, reason: str, who: str, detail: str, *, key: Hashable = None) -> None:
        """Count a refusal for `reason`; log it unless one of `key` was logged lately."""
        self.counts[reason] += 1
        now = self._clock()
        last, unlogged = self._logged.get((key, reason), (None, 0))
        if last is not None and now - last < LOG_INTERVAL:
            self._logged[key, reason] = (last, unlogged + 1)
            return
        since = f"; {unlogged} more refused since the last such line" if unlogged else ""
        self._log.warning("refused %s from %s: %s%s", self._what, who, detail, since)
        self._logged[key, reason] = (now, 0)


class ConnectionLimits:
    """Counts open connections per uid and decides whether one more is let in."""

    def __init__(
        self,
        max_connections: int,
        max_per_user: int,
        *,
        operators: frozenset[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections
        self.max_per_user = max_per_user
        self._operators = operators if operators is not None else frozenset({0, os.getuid()})
        self.by_uid: Counter[int] = Counter()
        self._operators_open = 0
        self._others_open = 0
        self._refusals = RefusalLog("a control connection", clock=clock)

    def admit(self, uid: int) -> str | None:
        """Count a new connection of `uid`; or, if it may not have one, why (for the caller)."""
        operator = uid in self._operators
        open_in_class = self._operators_open if operator else self._others_open
        if open_in_class >= self.max_connections:
            detail = f"taskd has {open_in_class} open (max_connections)"
            self._refusals.refused("max_connections", user_name(uid), detail, key=uid)
            return BUSY
        if not operator and self.by_uid[uid] >= self.max_per_user:
            held = f"it has {self.by_uid[uid]} open, the most one user may have"
            detail = f"{held} (max_connections_per_user)"
            self._refusals.refused("max_connections_per_user", user_name(uid), detail, key=uid)
            return (
                f"{user_name(uid)} has {counted(self.by_uid[uid], 'connection')} to taskd open, "
                "the most one user may have; close some, or ask the administrator to raise "
                "max_connections_per_user in taskd.toml"
            )
        self.by_uid[uid] += 1
        if operator:
            self._operators_open += 1
        else:
            self._others_open += 1
        return None

    def release(self, uid: int) -> None:
        """A connection admitted for `uid` has closed."""
        self.by_uid[uid] -= 1
        if not self.by_uid[uid]:
            del self.by_uid[uid]
        if uid in self._operators:
            self._operators_open -= 1
        else:
            self._others_open -= 1

    @property
    def open(self) -> int:
        return self._operators_open + self._others_open

    @property
    def refused_busy(self) -> int:
        return self._refusals.counts["max_connections"]

    @property
    def refused_per_user(self) -> int:
        return self._refusals.counts["max_connections_per_user"]
