"""Which kinds of write to the job store fail now, since when, and why: for the log and status.

A backend reports each write's end here. A kind of write (insert, claim, renew, ...) is
failing from a failed attempt until an attempt of the same kind goes through, so that a
write that still fits (a small one on a full disk) does not hide one that keeps failing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from taskd.models import StoreFailing

logger = logging.getLogger(__name__)


class StoreHealth:
    """The failing kinds of write of one store, and the episode they belong to."""

    def __init__(self, store: str, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._failing: set[str] = set()
        # The same set, read without a call where each write is settled (an enqueue's).
        self.failing_kinds: frozenset[str] | set[str] = self._failing
        self._since = 0.0
        self._failures = 0
        self._error = ""

    @property
    def failing(self) -> bool:
        return bool(self._failing)

    def failed(self, operation: str, error: str) -> None:
        """An attempt of `operation` failed with `error` (its message says what to do)."""
        if not self._failing:
            self._since, self._failures = self._clock(), 0
            logger.error("writes to the job store are failing (%s): %s", operation, error)
        self._failing.add(operation)
        self._failures += 1
        self._error = error

    def succeeded(self, operation: str) -> bool:
        """An attempt of `operation` went through; True if it was the last kind failing."""
        if operation not in self._failing:
            return False
        self._failing.discard(operation)
        if self._failing:
            return False
        logger.warning(
            "writes to %s go through again, after %.0f s and %d failed attempts",
            self._store,
            self._clock() - self._since,
            self._failures,
        )
        return True

    def report(self) -> StoreFailing | None:
        """What `taskctl status` shows; None while every kind of write goes through."""
        if not self._failing:
            return None
        return StoreFailing(
            since=self._since,
            failures=self._failures,
            operations=sorted(self._failing),
            error=self._error,
        )
