"""The job store on PostgreSQL (asyncpg), shared by several daemons on several hosts.

Writes go through one group-committing writer per daemon, as on SQLite: the writes that
arrive together share a transaction, and concurrent enqueues become one INSERT. Reads use
the other pooled connections. "Now" is the database's clock (`{schema}.now()`), unless a
clock is given (tests move theirs): the store then hands it to each session it uses.
Other daemons learn of writes through LISTEN/NOTIFY (`notices`).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from taskd.store.base import StoreError
from taskd.store.core.dialect import Operation, Tx
from taskd.store.core.notes import Notes
from taskd.store.core.notices import decode_notice, encode_notices, notice_of
from taskd.store.core.reads import SEVERAL_STATEMENTS
from taskd.store.core.statements import Statement, Steps, run_steps_async
from taskd.store.core.store import SqlStore, store_write
from taskd.store.postgres.connections import (
    DRIVER_ERRORS,
    Connections,
    Prepared,
    Unreachable,
    connection_failed,
)
from taskd.store.postgres.dialect import PREPARED, PostgresSql, execute, rendered
from taskd.store.postgres.migrate import migrate
from taskd.store.postgres.notices import MAX_PAYLOAD, NODES_BARRIER_SQL, Listener
from taskd.store.postgres.schema import channel

logger = logging.getLogger(__name__)

T = TypeVar("T")

UNREACHABLE = " (the database is unreachable or restarting; taskd reconnects by itself: try again)"


def safe_url(url: str) -> str:
    """The URL without its password, for logs and status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresStore(SqlStore):
    """The shared job store."""

    _key_taken = asyncpg.UniqueViolationError

    def __init__(
        self,
        url: str,
        *,
        schema: str = "taskd",
        pool_size: int = 8,
        connect_timeout: float = 10.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        description = f"{safe_url(url)} (schema {schema})"
        super().__init__(description, description)
        self.schema = schema
        self._connections = Connections(
            url,
            self.description,
            size=pool_size,
            connect_timeout=connect_timeout,
            clock=clock,
            application=f"taskd {schema}",
        )
        self._prepared = Prepared()
        self._sender = secrets.token_hex(6)  # our notices are not news to us
        # How ours begin (an insert's json_build_object, a transaction's `encode_notices`):
        # recognised before decoding them (the sender's check after decoding stays).
        self._own_notices = (f'{{"sender" : "{self._sender}"', f'{{"sender":"{self._sender}"')
        self._sql = PostgresSql(schema, self._sender)
        self._channel = channel(schema)
        self._listener = Listener(
            self._connections.connect,
            self._channel,
            self._on_notice,
            self.events.resync,
            self.description,
        )
        # Three writers, each committing what arrives together: the durable writes; inserts,
        # each a statement that commits (and tells the others) on its own; and claims, in
        # transactions that do not wait for the disk (a claim lost in a crash of the server
        # leaves its jobs pending, to run later; the outcome written after it is durable).
        self._commits = self._group_commit(self._transact, _worth_splitting)
        self._inserts = self._group_commit(self._statements, lambda exc: False)
        self._claims = self._group_commit(partial(self._transact, durable=False), _worth_splitting)
        self._writers = (self._commits, self._inserts, self._claims)

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            async with self._connections.acquire() as db:
                await migrate(db, self.schema, self.description)
            await self._listener.start()
        except StoreError:
            await self.close()
            raise
        except DRIVER_ERRORS as exc:
            await self.close()
            raise StoreError(f"cannot open job store {self.description}: {exc}") from exc
        for writer in self._writers:
            writer.start()

    async def close(self) -> None:
        for writer in self._writers:
            await writer.stop()
        await self._stop_fetching()
        await self._listener.close()
        await self._connections.close()

    async def _transact(
        self, operations: list[tuple[Operation, list[Any]]], notes: Notes, durable: bool = True
    ) -> list[list[Any]]:
        async with self._connections.acquire(begin="BEGIN") as db:
            tx = Tx(self._sql, notes, self.webhooks, self.limit_keys)
            try:
                outputs = [await self._run(db, op(tx, items)) for op, items in operations]
                # The notice goes with the commit: the others hear of it once it holds.
                lazy = "" if durable else "SET LOCAL synchronous_commit TO off; "
                await db.execute(lazy + self._notify_sql(notes) + "COMMIT")
            except BaseException:
                if not db.is_closed() and db.is_in_transaction():
                    with contextlib.suppress(Exception):
                        await db.execute("ROLLBACK")
                raise
        return outputs

    async def _statements(
        self, operations: list[tuple[Operation, list[Any]]], notes: Notes
    ) -> list[list[Any]]:
        """Statements that commit each on their own (and notify the others themselves)."""
        async with self._connections.acquire() as db:
            tx = Tx(self._sql, notes, self.webhooks, self.limit_keys)
            execute = partial(self._execute, db)
            # A loop, not a comprehension: no frame of its own to make at each insert.
            outputs = []
            for op, items in operations:
                outputs.append(await run_steps_async(op(tx, items), execute))
            return outputs

    def _run(self, db: Any, steps: Steps[T]) -> Awaitable[T]:
        return run_steps_async(steps, partial(self._execute, db))

    def _execute(self, db: Any, statement: Statement) -> Awaitable[list[Any]]:
        """Run a statement; those of a lone enqueue as statements prepared on `db`."""
        if statement.sql in PREPARED:
            sql, arguments = rendered(statement.sql, self.schema)
            return self._prepared.fetch(db, sql, arguments(statement.params))
        return execute(db, self.schema, statement)

    def _notify_sql(self, notes: Notes) -> str:
        """The notice to the others, sent with the commit."""
        if (notice := notice_of(notes, self._sender)) is None:
            return ""
        node = "NULL" if self._sql.node is None else _literal(self._sql.node)
        return "".join(
            f"SELECT {self.schema}.notify({_literal(self._channel)}, {node}, {_literal(payload)}); "
            for payload in encode_notices(notice, MAX_PAYLOAD)
        )

    async def _read(self, read: Callable[..., Steps[T]], *args: Any) -> T:
        """A read; tried again once on a new connection if the first one was lost."""
        try:
            return await self._read_once(read, args)
        except DRIVER_ERRORS as exc:
            if not connection_failed(exc) or isinstance(exc, Unreachable):
                raise
        return await self._read_once(read, args)

    async def _read_once(self, read: Callable[..., Steps[T]], args: tuple[Any, ...]) -> T:
        # A read of several statements sees one snapshot (a job's row and its errors as of
        # one moment); one of a single statement needs no transaction, and saves its two
        # round trips.
        snapshot = read in SEVERAL_STATEMENTS
        async with self._connections.acquire(begin=SNAPSHOT if snapshot else "") as db:
            result = await self._run(db, read(self._sql, *args))
            if snapshot:
                await db.execute("COMMIT")
            return result

    def _store_error(self, exc: Exception) -> StoreError | None:
        """The driver's error as a StoreError; a start-up that fails does not reconnect."""
        if not isinstance(exc, DRIVER_ERRORS):
            return None
        message = f"job store {self.description}: {exc}"
        hint = UNREACHABLE if connection_failed(exc) else ""
        return StoreError(message + hint, at_start_up=message)

    def _on_notice(self, payload: str) -> None:
        if payload.startswith(self._own_notices):  # ours (each insert's): no news, not read
            return
        notice = decode_notice(payload)
        if notice is not None and notice.sender != self._sender:
            self._heard(notice.due, notice.finished, notice.cancelled, notice.activity)

    # -- nodes: those sharing the store compare the digests of their schedules ------------

    async def register_node(self, node: str, ttl: float, slots: int = 0) -> str:
        # Our notices go to the other nodes only, once we are one; and the writes that did
        # not see us registered have committed before we read anything.
        worker = await super().register_node(node, ttl, slots)
        self._sql.node = node
        await self._writes_without_us()
        return worker

    @store_write
    async def _writes_without_us(self) -> None:
        """Wait for the writes in flight that may have decided not to notify (NODES_BARRIER_SQL)."""
        async with self._connections.acquire() as db:
            await db.execute(NODES_BARRIER_SQL, self._channel)

    @store_write
    async def announce_schedules(self, worker: str, digest: str) -> None:
        await self._commits.submit(_announce, [(worker, digest)])


def _announce(tx: Tx, items: list[tuple[str, str]]) -> Steps[list[None]]:
    for worker, digest in items:
        yield Statement(
            "UPDATE {s}.nodes SET schedules = :digest WHERE worker = :worker",
            {"worker": worker, "digest": digest},
        )
    return [None] * len(items)


# A read-only transaction whose statements all see the snapshot of its first one.
SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"


def _worth_splitting(exc: Exception) -> bool:
    return not connection_failed(exc)


def _literal(text: str) -> str:
    """A string literal (standard_conforming_strings, PostgreSQL's default since 9.1)."""
    return "'" + text.replace("'", "''") + "'"
