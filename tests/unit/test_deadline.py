"""A connection's moving deadline (taskd.deadline): reached, it ends the block with
TimeoutError; moved on before it is reached, it does not; moved earlier, it comes earlier."""

from __future__ import annotations

import asyncio

import pytest

from taskd.deadline import MovingDeadline


def _deadline() -> MovingDeadline:
    task = asyncio.current_task()
    assert task is not None
    return MovingDeadline(task)


async def test_a_deadline_reached_ends_the_block_with_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    deadline = _deadline()
    deadline.move(loop.time() + 0.01)
    never = loop.create_future()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadline:
            await never
    assert loop.time() - started >= 0.009
    # The task is not left cancelled: it goes on awaiting.
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0)
    deadline.close()


async def test_a_deadline_moved_on_is_not_reached_at_its_old_time() -> None:
    loop = asyncio.get_running_loop()
    deadline = _deadline()
    deadline.move(loop.time() + 0.02)
    done = loop.create_future()
    # Moved on at 10 ms to 60 ms from the start; the work ends at 40 ms, after the old time.
    loop.call_later(0.01, lambda: deadline.move(loop.time() + 0.05))
    loop.call_later(0.04, done.set_result, "finished")
    async with deadline:
        assert await done == "finished"
    deadline.close()


async def test_a_deadline_moved_earlier_comes_earlier() -> None:
    loop = asyncio.get_running_loop()
    deadline = _deadline()
    deadline.move(loop.time() + 60)
    never = loop.create_future()
    loop.call_later(0.01, lambda: deadline.move(loop.time()))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(10):  # a fallback: the deadline comes long before
            async with deadline:
                await never
    deadline.close()


async def test_no_deadline_outside_the_block_nor_when_there_is_none() -> None:
    loop = asyncio.get_running_loop()
    deadline = _deadline()
    deadline.move(loop.time() + 0.01)
    async with deadline:
        pass
    # Reached while nothing awaits inside the block: nothing is cancelled.
    outside = loop.create_future()
    loop.call_later(0.03, outside.set_result, None)
    await outside
    deadline.move(None)
    later = loop.create_future()
    loop.call_later(0.03, later.set_result, "no deadline")
    async with deadline:
        assert await later == "no deadline"
    deadline.close()


async def test_an_outer_timeout_is_not_taken_for_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    deadline = _deadline()
    deadline.move(loop.time() + 60)
    never = loop.create_future()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            async with deadline:
                await never
    deadline.close()
