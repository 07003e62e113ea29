"""A frozen daemon (SIGSTOP, a hung disk) does not hang its callers: they give up after
--request-timeout (or `timeout=`), and `wait --timeout` is enforced by the client too."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from taskctl import AsyncClient, Client, RequestTimeout
from tests.support import Taskd


@pytest.fixture
def frozen(taskd: Taskd) -> Iterator[Taskd]:
    """The daemon, stopped with SIGSTOP until the test ends."""
    assert taskd.process is not None
    os.kill(taskd.process.pid, signal.SIGSTOP)
    try:
        yield taskd
    finally:
        os.kill(taskd.process.pid, signal.SIGCONT)


def test_taskctl_gives_up_on_a_frozen_daemon(taskd: Taskd) -> None:
    enqueued = taskd.ctl("enqueue", "echo", "--delay", "1h")
    assert enqueued.returncode == 0, enqueued.stderr
    job_id = enqueued.stdout.strip()
    assert taskd.process is not None
    os.kill(taskd.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        listed = taskd.ctl("--request-timeout", "2s", "list", timeout=30)
        took = time.monotonic() - started
        assert listed.returncode == 75, listed.stderr
        assert "did not answer hello within 2.0s: it may be stopped, frozen or overloaded" in (
            listed.stderr
        )
        assert "--request-timeout" in listed.stderr
        assert 2 <= took < 10

        started = time.monotonic()
        waited = taskd.ctl("wait", job_id, "--timeout", "2s", timeout=30)
        took = time.monotonic() - started
        assert waited.returncode == 75, waited.stderr  # 2s, plus the client's 2s margin
        assert "did not answer" in waited.stderr
        assert 4 <= took < 12
    finally:
        os.kill(taskd.process.pid, signal.SIGCONT)
    # Awake again, it answers as before; a wait that runs out is the daemon's timeout (124).
    assert taskd.ctl("--request-timeout", "2s", "list").returncode == 0
    waited = taskd.ctl("wait", job_id, "--timeout", "1s")
    assert waited.returncode == 124, waited.stderr


def test_python_clients_give_up_after_their_timeout(frozen: Taskd) -> None:
    with Client(str(frozen.socket), timeout=1) as client, pytest.raises(RequestTimeout):
        client.list_tasks()

    async def call() -> None:
        async with AsyncClient(str(frozen.socket), timeout=1) as client:
            await client.list_tasks()

    with pytest.raises(RequestTimeout, match=r"did not answer hello within 1\.0s"):
        asyncio.run(call())
