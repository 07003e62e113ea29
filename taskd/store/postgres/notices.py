"""Notifications between the daemons that share a database: LISTEN/NOTIFY.

Each write transaction that others must hear about (work became due, jobs finished, a job
was cancelled) sends one notice on the schema's channel just before it commits; PostgreSQL
delivers it with the commit, and never for a rollback. Every daemon listens on one
dedicated connection. When that connection is lost, notices may have been missed: once it
is back the store says `resync` (everyone reads again what they wait for). A slow timer
checks the connection and resyncs too, the safety net should a notice ever go missing.

A notice is sent only when a node other than the writer's is alive (`schema.NOTIFY_FUNCTION`,
which every notice goes through: the rule has one source, in the writer's transaction): a
lone daemon's writes send none, as nobody else would hear them. Who hears what it needs:
- the writer itself: its own notices were never news to it (they are dropped unread); its
  listeners hear of its writes from the writes themselves (`notes.tell`): its new jobs
  wake its claims, its ends its `run` callers, its cancels its running attempts;
- every other daemon, whatever it waits for (new or retried jobs, ends for its `run`
  callers and subscribers, cancels of the attempts it runs, the live activity its views
  follow, a resume or a webhook's job that made work due): it has registered its node
  before it reads or serves anything (`daemon._join`), and renews it while it runs;
- a daemon that starts while others write: it listens, registers, then waits for the
  writes in flight (NODES_BARRIER_SQL) before it reads. A write that did not see it
  registered held the lock the barrier takes until its commit, so that its reads see what
  that write did; every write after the barrier sees it, and notifies;
- `taskd.outbox` (an application's insert, no node of its own): notifies whenever any node
  is alive. In an application's transaction at REPEATABLE READ or SERIALIZABLE its read of
  the nodes is that of the transaction's snapshot, which may predate a node's start: that
  node then runs the job at its next resync (SAFETY_INTERVAL), as the notice was not sent;
- a node whose row has expired while it still runs (its renewals failed for a lease): it
  is not sent to until it renews; the resync reads again what it missed. A row of a node
  gone but not yet expired is sent to, for nothing, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

MAX_PAYLOAD = 7900  # bytes; PostgreSQL refuses notices of 8000 or more
SAFETY_INTERVAL = 30.0  # seconds between checks of the listening connection (and resyncs)
PING_TIMEOUT = 10.0
MAX_BACKOFF = 30.0

# A node's wait, once registered, for the writes that may have decided without it: each
# took the same lock, shared, before it read the nodes (`schema.NOTIFY_FUNCTION`), and
# holds it until it commits. A statement alone: granted, then released at once.
NODES_BARRIER_SQL = "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || 'nodes', 0))"


class Listener:
    """LISTENs on one connection, reconnects with backoff, and checks it every so often."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Any]],
        channel: str,
        on_notice: Callable[[str], None],
        on_resync: Callable[[], None],
        description: str,
        interval: float = SAFETY_INTERVAL,
    ) -> None:
        self._connect = connect
        self._channel = channel
        self._on_notice = on_notice
        self._on_resync = on_resync
        self._description = description
        self._interval = interval
        self._connection: Any = None
        self._lost = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen (raising if the database cannot be reached), then keep listening."""
        await self._listen()
        self._task = asyncio.create_task(self._watch(), name="taskd-postgres-listener")

    async def _listen(self) -> None:
        connection = await self._connect()
        try:
            await connection.add_listener(self._channel, self._received)
        except BaseException:
            connection.terminate()
            raise
        connection.add_termination_listener(lambda _: self._lost.set())
        self._lost.clear()
        self._connection = connection

    def _received(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        self._on_notice(payload)

    async def _watch(self) -> None:
        while not self._stop.is_set():
            woken = [asyncio.create_task(event.wait()) for event in (self._lost, self._stop)]
            await asyncio.wait(woken, timeout=self._interval, return_when=asyncio.FIRST_COMPLETED)
            for task in woken:
                task.cancel()
            if self._stop.is_set():
                return
            if not self._lost.is_set() and await self._alive():
                self._on_resync()  # the safety net: read again, in case anything went amiss
                continue
            logger.warning("job store %s: lost the connection that listens", self._description)
            await self._reconnect()

    async def _alive(self) -> bool:
        try:
            await self._connection.fetchval("SELECT 1", timeout=PING_TIMEOUT)
        except Exception:
            return False
        return True

    async def _reconnect(self) -> None:
        self._drop()
        backoff = 0.5
        while not self._stop.is_set():
            try:
                await self._listen()
            except Exception as exc:
                logger.warning(
                    "job store %s: cannot listen again (%s); next try in %gs",
                    self._description,
                    exc,
                    backoff,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            logger.info("job store %s: listening again; everyone reads again", self._description)
            self._on_resync()
            return

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._connection is not None:
            try:
                await asyncio.wait_for(self._connection.close(), 5)
            except Exception:
                self._connection.terminate()
            self._connection = None
