"""A result known later and shared by every request waiting for it: the end of a job that
many `run` callers joined, or the commit of an enqueue.

A handler returns one instead of waiting itself. The control server then keeps only which
requests wait for it (and forgets those of a connection that closes) and, once it is known,
sends it to all of them from one callback, encoded once and in one write per connection; no
task per caller is woken to reply. Callers that wait one by one (the HTTP API, tests) await
`result()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")


def _unchanged(exc: BaseException) -> BaseException | None:
    return None


def _same(result: Any) -> Any:
    return result


class Deferred(msgspec.Struct, Generic[T], eq=False):
    """A result (or an error) that a future gives later, to any number of waiting requests;
    `shape` makes the result of what the future gives (an enqueue's reply of its rows).

    A Struct (built in C: no Python frame for each enqueue), compared and hashed by
    identity (eq=False), as the server keys its waiting requests by it."""

    future: asyncio.Future[Any]
    shape: Callable[[Any], T] = _same
    # The error reply an exception stands for (None: an internal error), set by the
    # dispatch that handed this out: the error codes are given there and nowhere else.
    translate: Callable[[BaseException], BaseException | None] = _unchanged

    async def result(self) -> T:
        """The result, or the exception standing for its error; cancelling the caller
        leaves the result to the other callers."""
        try:
            return self.shape(await asyncio.shield(self.future))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = self.translate(exc)
            if error is None:
                raise
            raise error from None
