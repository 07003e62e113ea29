"""The job store backends every store, executor and scheduler test runs against.

PostgreSQL joins BACKENDS once it exists; each backend takes the tests' clock (a server
backend would use it in place of the database's clock).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from taskd.store import Store
from taskd.store.sqlite import SqliteStore

BACKENDS = ["sqlite"]


async def open_backend(name: str, folder: Path, clock: Callable[[], float]) -> Store:
    """A fresh, opened store of the named backend, with its data in `folder`."""
    if name == "sqlite":
        store = SqliteStore(folder / "jobs.db", clock=clock)
    else:  # pragma: no cover
        raise ValueError(f"unknown backend {name}")
    await store.open()
    return store
