"""The store's health: which kinds of write fail now, and when the store is well again."""

from __future__ import annotations

import logging

import pytest

from taskd.models import StoreFailing
from taskd.store import StoreHealth
from tests.support import Clock


def test_a_kind_of_write_fails_until_one_of_its_kind_goes_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock(100.0)
    health = StoreHealth("job store /x.db", clock)
    assert health.report() is None and not health.succeeded("insert")
    with caplog.at_level(logging.INFO):
        health.failed("insert", "disk full")
        clock.now = 105.0
        health.failed("renew", "disk full again")
        assert not health.succeeded("renew")  # a small write fits: inserts still fail
        assert health.report() == StoreFailing(100.0, 2, ["insert"], "disk full again")
        clock.now = 130.0
        assert health.succeeded("insert")
    assert health.report() is None and not health.failing
    assert caplog.text.count("writes to the job store are failing (insert): disk full") == 1
    assert "writes to job store /x.db go through again, after 30 s and 2 failed attempts" in (
        caplog.text
    )
