"""Group commit: one writer task commits the writes that arrive together in one transaction.

Each caller submits a write (a batch operation and its items) and gets its results only
after the transaction that holds them has committed. Writes of the same operation that
meet in a batch are merged into one call, so fifty concurrent enqueues become one INSERT.
How a batch becomes a transaction is the store's: it gets the operations in order, each
with its merged items, and runs them in one transaction (SQLite: in its writer thread, in
one hop from the event loop). An operation is a generator of statements (`taskd.store.core`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, Generic, TypeVar

import msgspec

logger = logging.getLogger(__name__)

# Turns of the event loop a batch waits for company before it commits, when the last batch
# had company: a lone caller's write starts at once.
GATHER_TURNS = 2

Item = TypeVar("Item")
Result = TypeVar("Result")
Context = TypeVar("Context")
# A write of one kind, for all its items that met in a batch, which the runner drives inside
# the batch's transaction: one result per item.
Operation = Callable[[Context, list[Item]], Generator[Any, Any, list[Result]]]
# Runs the operations of a batch, each with its items, in one transaction; their results.
Runner = Callable[[list[tuple[Any, list[Any]]]], Awaitable[list[list[Any]]]]
# Settles a write's future once its outcome is known: its results, or its exception.
Finish = Callable[[asyncio.Future[Any], list[Any], Exception | None], None]


def settle(future: asyncio.Future[Any], results: list[Any], exc: Exception | None) -> None:
    """The future gets the write's results, or its exception (unless its caller gave up)."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(results)


class _Write(msgspec.Struct, Generic[Item, Result]):
    # A Struct: built in C, one Python frame less for each write submitted.
    operation: Operation[Any, Item, Result]
    items: Sequence[Item]
    future: asyncio.Future[Any]
    finish: Finish


class GroupCommit(Generic[Context]):
    """Serialises all writes through one task and commits them in batches."""

    def __init__(
        self,
        runner: Runner,
        max_items: int = 2000,
        *,
        worth_splitting: Callable[[Exception], bool] = lambda exc: True,
    ) -> None:
        self._runner = runner
        self._max_items = max_items
        # Whether a failed batch is retried write by write: not when the database is gone,
        # which would fail each write again (after a timeout each, perhaps).
        self._worth_splitting = worth_splitting
        # The writes submitted and not yet taken into a batch (None: stop after them).
        self._queue: collections.deque[_Write[Any, Any] | None] = collections.deque()
        self._arrived: asyncio.Future[None] | None = None  # the writer waits for a write
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._company = True  # the last batch held more than one write

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="taskd-group-commit")

    async def stop(self) -> None:
        """Commit what was submitted before, then stop."""
        if self._task is not None:
            self._put(None)
            await self._task
            self._task = None

    def submit(
        self,
        operation: Operation[Context, Item, Result],
        items: Sequence[Item],
        finish: Finish = settle,
    ) -> asyncio.Future[list[Result]]:
        """Run `operation` on `items` in the next transaction; the future of its results,
        done once it commits. `finish` settles the future, in the writer, as the outcome is
        known (the store's report it to its health, and give errors and results their
        shape there: its callers' callbacks then run one turn of the loop sooner).

        What others must be told about the write (work to do, a job ended) is the runner's
        to tell once it commits, also when the caller has stopped waiting (a client that
        hung up).
        """
        # A future rather than a coroutine: the caller awaits it directly, one frame less to
        # create and to resume for each write (an enqueue passes through a dozen already).
        if self._task is None or self._task.done() or self._loop is None:
            raise RuntimeError("the store is closed")
        future: asyncio.Future[list[Result]] = self._loop.create_future()
        if not items:  # nothing to write: done now
            finish(future, [], None)
            return future
        self._queue.append(_Write(operation, items, future, finish))  # as `_put`, inline
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)
        # A caller that gives up cancels its wait, not the write: the writer commits it and
        # tells what it made known all the same (it only drops a result no one waits for).
        return future

    def _put(self, write: _Write[Any, Any] | None) -> None:
        self._queue.append(write)
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            # Wait for the first write not yet taken (here, not in a coroutine of its own:
            # one frame less to make and to run for each lone write).
            while not self._queue:
                assert self._loop is not None
                self._arrived = self._loop.create_future()
                try:
                    await self._arrived
                finally:
                    self._arrived = None
            first = self._queue.popleft()
            if first is None:
                break
            # Let the loop read what else has arrived (other clients' requests that came
            # while the last transaction committed) before this one starts: one
            # transaction, one sync, for all of them. Not after a batch that found no
            # company: a lone caller's write does not wait for others who are not there.
            if self._company or self._queue:
                for _ in range(GATHER_TURNS):
                    await asyncio.sleep(0)
            batch, size = [first], len(first.items)
            while size < self._max_items and self._queue:
                write = self._queue.popleft()
                if write is None:
                    stopping = True
                    break
                batch.append(write)
                size += len(write.items)
            self._company = len(batch) > 1
            await self._commit(batch)

    async def _commit(self, batch: list[_Write[Any, Any]]) -> None:
        try:
            if len(batch) == 1:  # a lone write (one by one, the common case): nothing to merge
                (write,) = batch
                (output,) = await self._runner([(write.operation, list(write.items))])
                if len(output) != len(write.items):
                    raise RuntimeError(
                        f"{write.operation!r} returned {len(output)} of {len(write.items)}"
                    )
                results = [output]
            else:
                results = await self._merge(batch)
        except Exception as exc:
            if len(batch) == 1 or not self._worth_splitting(exc):
                _finish(batch, [[] for _ in batch], exc)
                return
            # One write spoilt the batch: give every write a transaction of its own, so that
            # only the bad one fails.
            logger.debug("batch of %d writes failed (%s); retrying one by one", len(batch), exc)
            for write in batch:
                await self._commit([write])
            return
        _finish(batch, results, None)

    async def _merge(self, batch: list[_Write[Any, Any]]) -> list[list[Any]]:
        """Run a batch of several writes, those of one operation merged; their results."""
        groups: dict[Operation[Context, Any, Any], list[int]] = {}
        for index, write in enumerate(batch):
            groups.setdefault(write.operation, []).append(index)
        merged = [
            (operation, [item for i in indexes for item in batch[i].items])
            for operation, indexes in groups.items()
        ]
        outputs = await self._runner(merged)
        results: list[list[Any]] = [[] for _ in batch]
        for (operation, items), output, indexes in zip(
            merged, outputs, groups.values(), strict=True
        ):
            if len(output) != len(items):
                raise RuntimeError(f"{operation!r} returned {len(output)} of {len(items)}")
            start = 0
            for i in indexes:
                count = len(batch[i].items)
                results[i] = output[start : start + count]
                start += count
        return results


def _finish(batch: list[_Write[Any, Any]], results: list[list[Any]], exc: Exception | None) -> None:
    """Settle each write's future (in one call for the batch, not one for each write); a
    `finish` that fails fails its write, not the writer."""
    for write, result in zip(batch, results, strict=True):
        try:
            write.finish(write.future, result, exc)
        except Exception as error:
            logger.exception("settling a write of %r failed", write.operation)
            settle(write.future, [], error)
