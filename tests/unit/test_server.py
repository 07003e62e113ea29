"""The control server's shared receive budget for large frames."""

from __future__ import annotations

import asyncio

from taskd.protocol import MAX_HELLO_FRAME
from taskd.server import _ReceiveBudget

MIB = 1024 * 1024


async def test_small_frames_never_wait_for_the_budget() -> None:
    budget = _ReceiveBudget(10 * MIB)
    assert await budget.acquire(10 * MIB) == 0.0
    assert await asyncio.wait_for(budget.acquire(MAX_HELLO_FRAME), 0.1) == 0.0
    assert budget.used == 10 * MIB
    budget.release(MAX_HELLO_FRAME)
    budget.release(10 * MIB)
    assert budget.used == 0


async def test_large_frames_wait_until_the_budget_has_room() -> None:
    budget = _ReceiveBudget(10 * MIB)
    await budget.acquire(6 * MIB)
    await budget.acquire(4 * MIB)
    third = asyncio.create_task(budget.acquire(5 * MIB))
    fourth = asyncio.create_task(budget.acquire(5 * MIB))
    await asyncio.sleep(0.05)
    assert not third.done() and not fourth.done()
    budget.release(6 * MIB)  # room for one of them
    await asyncio.sleep(0.01)
    assert [third.done(), fourth.done()].count(True) == 1
    budget.release(4 * MIB)
    waited = await asyncio.wait_for(asyncio.gather(third, fourth), 1)
    assert all(seconds >= 0.04 for seconds in waited)
    assert budget.used == 10 * MIB


async def test_a_waiter_that_gives_up_takes_nothing() -> None:
    budget = _ReceiveBudget(10 * MIB)
    await budget.acquire(8 * MIB)
    waiter = asyncio.create_task(budget.acquire(8 * MIB))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    budget.release(8 * MIB)
    assert budget.used == 0
    assert await asyncio.wait_for(budget.acquire(9 * MIB), 0.1) == 0.0
