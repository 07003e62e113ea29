"""The same store tests run against every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from taskd.store import Store
from taskd.store.sqlite import SqliteStore

BACKENDS = ["sqlite"]


async def open_backend(name: str, tmp_path: Path) -> Store:
    if name == "sqlite":
        store = SqliteStore(tmp_path / "jobs.db")
    else:  # pragma: no cover
        raise ValueError(name)
    await store.open()
    return store


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened = await open_backend(request.param, tmp_path)
    yield opened
    await opened.close()
