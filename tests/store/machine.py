"""What the store's Hypothesis state machines share: each example gets an event loop, a
fresh store of the machine's backend in a folder of its own and the clock it reads; and
one TestCase per backend, with the machine's settings and time limit."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine

from taskd.store import Store
from tests.backends import BACKENDS, open_backend
from tests.conftest import NOW
from tests.support import Clock


class StoreMachine(RuleBasedStateMachine):
    """A state machine over an open store of `backend`, on a clock that moves only when
    a rule moves it."""

    backend = "sqlite"
    folder_prefix = "tdsm"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = Path(tempfile.mkdtemp(prefix=self.folder_prefix))
        self.clock = Clock(NOW)
        try:
            self.store: Store = self.run(open_backend(self.backend, self.folder, self.clock))
        except BaseException:  # a skip (no PostgreSQL here) too: teardown will not run
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)


def backend_cases(
    machine: type[StoreMachine], prefix: str, chosen: Callable[[str], settings], timeout: float
) -> dict[str, Any]:
    """The machine's TestCase on each backend, by name (`Test<prefix>_<backend>`), for a
    test module's globals: with the Hypothesis settings `chosen` gives for the backend."""
    cases = {}
    for backend in BACKENDS:
        backed = type(f"{prefix}_{backend}", (machine,), {"backend": backend})
        case = backed.TestCase
        case.settings = chosen(backend)
        case.pytestmark = [pytest.mark.timeout(timeout)]
        cases[f"Test{prefix}_{backend}"] = case
    return cases
