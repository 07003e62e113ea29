"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends import BACKENDS, Backend
from tests.support import Taskd


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, taskd_factory: type[Taskd], short_tmp: Path
) -> Iterator[Backend]:
    chosen = Backend(request.param, taskd_factory, short_tmp)
    yield chosen
    chosen.close()
