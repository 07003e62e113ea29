"""A deadline that moves at every request and is rarely reached: a connection's.

A control connection's reads are bounded by a deadline that moves with each frame (the idle
timeout while it waits for a request, the read timeout while a frame comes in). With
`asyncio.timeout`, each move cancels a timer and schedules another: several per request.
Here a move is an assignment; the one timer is moved only when the deadline comes earlier
than the timer, and when the timer fires before the deadline (which moved on meanwhile) it
is set again for the deadline.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType


class MovingDeadline:
    """The deadline of the awaits of one task inside `async with deadline:`; reaching it
    cancels them, and the block raises TimeoutError (as `asyncio.timeout_at` does)."""

    __slots__ = (
        "_cancelling",
        "_expired",
        "_inside",
        "_loop",
        "_task",
        "_timer",
        "_timer_at",
        "_when",
    )

    def __init__(self, task: asyncio.Task[object]) -> None:
        self._task = task
        self._loop = task.get_loop()
        self._when: float | None = None  # loop time; None: none
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._inside = False
        self._expired = False
        self._cancelling = 0

    def move(self, when: float | None) -> None:
        """Set the deadline to `when` (loop time), or to none."""
        self._when = when
        if self._inside and when is not None and when < self._timer_at:
            self._set_timer(when)

    async def __aenter__(self) -> MovingDeadline:
        self._inside = True
        self._expired = False
        self._cancelling = self._task.cancelling()
        if self._when is not None and self._when < self._timer_at:
            self._set_timer(self._when)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._inside = False
        # The timer stays set: the next block, a moment later, most likely needs it.
        if self._expired:
            self._expired = False
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def close(self) -> None:
        """No more blocks: the timer goes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf

    def _set_timer(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        set_for = self._timer_at
        self._timer = None
        self._timer_at = math.inf
        if not self._inside or self._when is None:
            return  # set again by the next block that has a deadline
        if self._when > set_for:
            self._set_timer(self._when)  # it moved on since the timer was set
            return
        self._expired = True
        self._task.cancel()
