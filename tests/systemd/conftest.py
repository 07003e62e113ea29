"""One container for the whole run, with taskd installed in it as the README says."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd import container as machine
from tests.systemd.container import Container
from tests.systemd.service import Taskd, install

KEPT: list[Path] = []  # the folders with a failed run's console and journal


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for folder in KEPT:
        terminalreporter.write_line(f"the container's console and journal: {folder}")


@pytest.fixture(scope="session")
def container(request: pytest.FixtureRequest) -> Iterator[Container]:
    reason = machine.unavailable()
    if reason is not None:
        pytest.skip(reason)
    run = Path(tempfile.mkdtemp(prefix="taskd-test-systemd-", dir="/var/tmp"))
    booted = Container(
        machine.root_filesystem(),
        {machine.ROOT: "/src", machine.wheels(run / "wheels"): "/wheels"},
        run / "console.log",
    )
    try:
        yield booted
    finally:
        if request.session.testsfailed:
            journal = booted.run("journalctl --boot --no-pager", check=False).stdout
            (run / "journal.txt").write_text(journal)
            KEPT.append(run)
        booted.poweroff()
        if not KEPT:
            shutil.rmtree(run)


@pytest.fixture(scope="session")
def taskd(container: Container) -> Taskd:
    """taskd installed and started by the README's "A system service"."""
    return install(container)
