"""The job store backends every store, executor and scheduler test runs against.

Each backend takes the tests' clock: SQLite reads it in place of the system clock, and
PostgreSQL hands it to its sessions in place of the database's clock. PostgreSQL runs
where `TASKD_TEST_POSTGRES` names a database (CI sets it): each store gets a schema of its
own, dropped when it closes. Without the variable these tests skip, saying so; with `CI`
set they fail instead, so that CI never passes without them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from taskd.store import Store
from taskd.store.postgres.store import PostgresStore
from taskd.store.sqlite import SqliteStore
from tests.support import Taskd

BACKENDS = ["sqlite", "postgres"]
POSTGRES_VARIABLE = "TASKD_TEST_POSTGRES"
_schemas = itertools.count()


def postgres_url() -> str:
    """The test database's URL; skips the test (fails it under CI) if none is given."""
    url = os.environ.get(POSTGRES_VARIABLE)
    if url:
        return url
    reason = f"PostgreSQL tests need {POSTGRES_VARIABLE}=postgresql://user@host/db"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run them")
    pytest.skip(reason)


def unique_schema() -> str:
    """A schema name no other test (or test run) uses."""
    return f"t{os.getpid()}_{next(_schemas)}_{secrets.token_hex(3)}"


async def drop_schema(url: str, schema: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await connection.close()


class ThrowawayPostgresStore(PostgresStore):
    """A PostgreSQL store in a schema of its own, dropped when it closes."""

    def __init__(self, url: str, clock: Callable[[], float]) -> None:
        super().__init__(url, schema=unique_schema(), pool_size=4, clock=clock)
        self._url = url

    async def close(self) -> None:
        await super().close()
        await drop_schema(self._url, self.schema)


async def open_backend(name: str, folder: Path, clock: Callable[[], float]) -> Store:
    """A fresh, opened store of the named backend, with its data in `folder`."""
    store: Store
    if name == "sqlite":
        store = SqliteStore(folder / "jobs.db", clock=clock)
    elif name == "postgres":
        store = ThrowawayPostgresStore(postgres_url(), clock)
    else:  # pragma: no cover
        raise ValueError(f"unknown backend {name}")
    await store.open()
    return store


class Backend:
    """Daemons on one store: a SQLite file, or a PostgreSQL schema of its own."""

    def __init__(self, name: str, factory: type[Taskd], root: Path) -> None:
        self.name = name
        self.factory = factory
        self.root = root
        self.url = postgres_url() if name == "postgres" else ""
        self.schema = unique_schema() if name == "postgres" else ""

    def daemon(self, config: str = "", node: str = "a", tasks: Path | None = None) -> Taskd:
        root = self.root / node
        root.mkdir(exist_ok=True)
        if self.name == "postgres":
            config = f'node_id = "{node}"\n{config}\n[postgres]\nschema = "{self.schema}"\n'
        daemon = self.factory(root, config=config, **({"tasks": tasks} if tasks else {}))
        if self.name == "postgres":
            daemon.database = self.url  # type: ignore[assignment]
        else:
            daemon.database = self.root / "taskd.db"
        return daemon

    def close(self) -> None:
        if self.schema:
            asyncio.run(drop_schema(self.url, self.schema))
