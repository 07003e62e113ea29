from __future__ import annotations

import shutil
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from taskd.store import Store
from tests.backends import BACKENDS, open_backend
from tests.support import Clock, Taskd, short_tempdir

NOW = 1_000_000.0  # where the tests' clock starts


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "nspawn: boots a Debian container with systemd-nspawn (make test-systemd)"
    )
    # A shell starts a background job (`make test &` in a script) with SIGINT ignored, and
    # the processes the tests start would inherit that: taskctl could not be stopped with
    # Ctrl-C. A handler of our own is not inherited across exec; each child gets the default.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def clock() -> Callable[[], float]:
    """The store's clock: it stands still at NOW until the test moves it. A test module
    whose tests need real time overrides this fixture with `time.time`."""
    return Clock(NOW)


@pytest.fixture(params=BACKENDS)
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Callable[[], float]
) -> AsyncIterator[Store]:
    """An open job store of each backend in turn."""
    opened = await open_backend(request.param, tmp_path, clock)
    yield opened
    await opened.close()


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
