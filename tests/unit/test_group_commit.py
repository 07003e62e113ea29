"""GroupCommit settles each write's future through its `finish`, in the writer: a finish
that fails fails its write, never the writer (the daemon's every later write goes on)."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import pytest

from taskd.store.batching import GroupCommit


def echo(context: Any, items: list[int]) -> Generator[Any, Any, list[int]]:
    return items
    yield


async def run(operations: list[tuple[Any, list[Any]]]) -> list[list[Any]]:
    return [list(items) for _, items in operations]


async def test_a_finish_settles_the_future_with_what_it_makes_of_the_outcome() -> None:
    commits: GroupCommit[Any] = GroupCommit(run)
    commits.start()

    def doubled(future: asyncio.Future[Any], results: list[Any], exc: Exception | None) -> None:
        future.set_result([2 * result for result in results])

    assert await commits.submit(echo, [1, 2], doubled) == [2, 4]
    assert await commits.submit(echo, [3]) == [3]
    await commits.stop()


async def test_a_finish_that_fails_fails_its_write_not_the_writer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    commits: GroupCommit[Any] = GroupCommit(run)
    commits.start()

    def broken(future: asyncio.Future[Any], results: list[Any], exc: Exception | None) -> None:
        raise ValueError("cannot shape")

    with pytest.raises(ValueError, match="cannot shape"):
        await commits.submit(echo, [1], broken)
    assert await commits.submit(echo, [2]) == [2]
    await commits.stop()
    assert "settling a write" in caplog.text
