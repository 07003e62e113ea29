"""The store's connections to PostgreSQL: a small pool that reconnects with backoff.

A connection that fails is dropped and the next use opens another; while the database
cannot be reached, attempts to connect are spaced out (0.5 s doubling up to 30 s) and the
callers in between are told at once instead of each waiting for a timeout. With a test
clock, each connection's session carries it (`taskd.now`) before every use.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import asyncpg

from taskd.store.base import StoreError

logger = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
COMMAND_TIMEOUT = 60.0  # a statement that takes longer fails (the server is hung or gone)
UNREACHABLE_HINT = " (taskd reconnects by itself: try again; nothing was written)"
# What the database said in these SQLSTATE classes is about the connection, not the
# statement: 08 connection exception, 53 insufficient resources, 57 operator intervention
# (shutdown, restart, statement timeout), 58 system error.
CONNECTION_CLASSES = ("08", "53", "57", "58")


# What the driver and the network raise; the store turns them into StoreError.
DRIVER_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


def connection_failed(exc: BaseException) -> bool:
    """Whether an exception says the connection or the server failed (not the statement)."""
    lost = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)
    if isinstance(exc, (*lost, Unreachable)):
        return True
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and sqlstate[:2] in CONNECTION_CLASSES


class Unreachable(StoreError):
    """The database could not be reached lately; taskd tries again after a pause."""


class Connections:
    """Up to `size` connections to one database, opened as needed."""

    def __init__(
        self,
        url: str,
        description: str,
        *,
        size: int,
        connect_timeout: float,
        clock: Callable[[], float] | None = None,
        application: str = "taskd",
    ) -> None:
        self._url = url
        self._application = application  # as pg_stat_activity shows the connections
        self._description = description
        self._connect_timeout = connect_timeout
        self._clock = clock
        # The connections not in use, of `size` (a counter and a queue rather than a
        # Semaphore: a use that finds one free takes it without a coroutine to run).
        self._free = size
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle: list[Any] = []
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_error = ""
        self._closed = False

    async def connect(self) -> Any:
        """A new connection of our own (the listener's), or raise Unreachable."""
        if self._closed:
            raise StoreError(f"job store {self._description} is closed")
        now = time.monotonic()
        if now < self._retry_at:
            raise Unreachable(
                f"job store {self._description} is unreachable ({self._last_error}); "
                f"taskd tries again in {self._retry_at - now:.1f}s"
            )
        try:
            connection = await asyncpg.connect(
                self._url,
                timeout=self._connect_timeout,
                command_timeout=COMMAND_TIMEOUT,
                # Notices are sent as string literals (see store._literal).
                server_settings={
                    "application_name": self._application,
                    "standard_conforming_strings": "on",
                    # Short statements whose cost estimates grow with the pending jobs: a
                    # claim next to 600,000 of them passed jit_above_cost, and compiled its
                    # plan at every execution (~45 ms, for an execution of ~1 ms).
                    "jit": "off",
                },
            )
        except DRIVER_ERRORS as exc:
            self._failed(exc)
            message = f"cannot connect to job store {self._description}: {_describe(exc)}"
            raise Unreachable(message + UNREACHABLE_HINT, at_start_up=message) from exc
        if self._backoff:
            logger.info("job store %s: connected again", self._description)
        self._backoff = self._retry_at = 0.0
        return connection

    def _failed(self, exc: BaseException) -> None:
        self._backoff = min(max(self._backoff * 2, 0.5), MAX_BACKOFF)
        self._retry_at = time.monotonic() + self._backoff
        self._last_error = _describe(exc)
        logger.warning(
            "job store %s: cannot connect (%s); next try in %gs",
            self._description,
            self._last_error,
            self._backoff,
        )

    def acquire(self, *, begin: str = "") -> _Use:
        """A connection for one use (in a transaction it must end, with `begin`: the BEGIN
        statement); one that failed, or was left in a transaction, is closed rather than
        used again."""
        return _Use(self, begin)

    async def _slot(self) -> None:
        """Wait until a use ends and hands its slot over."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed over as we were cancelled
                self._release()
            raise

    def _release(self) -> None:
        """A use ended: its slot goes to the first caller waiting, else back to the free."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def _ready(self, begin: str) -> Any:
        """An idle connection usable as it is (nothing to run first), or None."""
        if begin or self._clock is not None:
            return None
        while self._idle:
            connection = self._idle.pop()
            if not connection.is_closed():
                return connection
        return None

    async def _prepared(self, begin: str) -> Any:
        """A connection, in a transaction if asked, with the test clock if there is one. An
        idle connection the server has dropped (it restarted) is replaced once."""
        prelude = [begin] if begin else []
        if self._clock is not None:
            now = repr(float(self._clock()))
            prelude.append(f"SELECT set_config('taskd.now', '{now}', false)")
        for retry in (True, False):
            fresh = not self._idle
            connection = await self._take()
            if not prelude:
                return connection
            try:
                await connection.execute("; ".join(prelude))
            except DRIVER_ERRORS as exc:
                self._give_back(connection, exc)
                if retry and not fresh and connection_failed(exc):
                    continue
                raise
            return connection
        raise AssertionError("unreachable")  # pragma: no cover

    def _give_back(self, connection: Any, exc: BaseException | None) -> None:
        clean = (
            exc is None
            or isinstance(exc, StoreError)
            or (isinstance(exc, asyncpg.PostgresError) and not connection_failed(exc))
        )
        if isinstance(exc, Exception) and connection_failed(exc):
            self._flush()  # the others may be dead too (a restart): connect anew
        usable = not (self._closed or connection.is_closed() or connection.is_in_transaction())
        if clean and usable:
            self._idle.append(connection)
            if exc is None:  # the server answers: new connections may be tried at once
                self._backoff = self._retry_at = 0.0
        else:
            connection.terminate()

    def _flush(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.terminate()

    async def _take(self) -> Any:
        while self._idle:
            connection = self._idle.pop()
            if not connection.is_closed():
                return connection
        return await self.connect()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            try:
                await asyncio.wait_for(connection.close(), 5)
            except DRIVER_ERRORS:
                connection.terminate()


class _Use:
    """`async with connections.acquire() as connection:` (a class, not a generator: it is
    on the path of every statement)."""

    __slots__ = ("_begin", "_connection", "_connections")

    def __init__(self, connections: Connections, begin: str) -> None:
        self._connections = connections
        self._begin = begin

    async def __aenter__(self) -> Any:
        connections = self._connections
        if connections._free:
            connections._free -= 1
        else:
            await connections._slot()
        try:
            self._connection = connections._ready(self._begin)
            if self._connection is None:
                self._connection = await connections._prepared(self._begin)
        except BaseException:
            connections._release()
            raise
        return self._connection

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self._connections._give_back(self._connection, exc)
        finally:
            self._connections._release()


class Prepared:
    """Statements prepared once on each connection (`prepare`), and run as such: an execution
    then skips the driver's statement cache and its layers (some 10,000 instructions of the
    daemon's, at each lone enqueue). A statement the schema has made stale (a migration by a
    newer daemon) is prepared again."""

    def __init__(self) -> None:
        self._statements: weakref.WeakKeyDictionary[Any, dict[str, Any]] = (
            weakref.WeakKeyDictionary()
        )

    async def fetch(self, connection: Any, sql: str, arguments: Any) -> list[Any]:
        """The rows of `sql` with `arguments` (a sequence), on `connection`."""
        statements = self._statements.get(connection)
        if statements is None:
            statements = self._statements[connection] = {}
        statement = statements.get(sql)
        if statement is None:
            statement = statements[sql] = await connection.prepare(sql)
        try:
            rows: list[Any] = await statement.fetch(*arguments)
        except STALE:
            del statements[sql]
            if connection.is_in_transaction():  # it failed: the caller rolls back
                raise
            return list(await connection.fetch(sql, *arguments))
        return rows


# A prepared statement the schema changed under (its result's type, its tables' columns).
STALE = (asyncpg.InvalidCachedStatementError, asyncpg.OutdatedSchemaCacheError)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
