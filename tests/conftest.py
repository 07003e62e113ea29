from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Taskd, short_tempdir


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def taskd_factory(short_tmp: Path) -> Iterator[type[Taskd]]:
    """Make taskd processes in this test's folder; any still running are killed at the end."""
    started: list[Taskd] = []

    class Factory(Taskd):
        def __init__(self, root: Path | None = None, **kwargs: object) -> None:
            super().__init__(root or short_tmp, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    yield Factory
    for daemon in started:
        if daemon.running:
            daemon.kill()
        daemon.close()


@pytest.fixture
def taskd(taskd_factory: type[Taskd]) -> Iterator[Taskd]:
    """A running taskd on the fixture tasks."""
    daemon = taskd_factory().start()
    yield daemon
    if daemon.running:
        assert daemon.stop() == 0, daemon.log
