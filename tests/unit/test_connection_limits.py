"""Who gets one more control connection: per-user shares, and room kept for the operators."""

from __future__ import annotations

import logging

import pytest

from taskd.connection_limits import BUSY, LOG_INTERVAL, ConnectionLimits

ROOT, DAEMON, ADA, BOB = 0, 54320, 54321, 54322  # uids without names here


def limits(clock: list[float]) -> ConnectionLimits:
    return ConnectionLimits(
        max_connections=4,
        max_per_user=2,
        operators=frozenset({ROOT, DAEMON}),
        clock=lambda: clock[0],
    )


def test_each_user_gets_a_share_and_all_of_them_max_connections() -> None:
    shares = limits([0.0])
    assert [shares.admit(ADA) for _ in range(2)] == [None, None]
    refusal = shares.admit(ADA)
    assert refusal is not None and "has 2 connections to taskd open" in refusal
    assert "max_connections_per_user" in refusal
    assert [shares.admit(BOB) for _ in range(2)] == [None, None]
    assert shares.admit(54323) == BUSY  # other users hold max_connections between them
    assert (shares.refused_per_user, shares.refused_busy) == (1, 1)
    shares.release(ADA)
    assert shares.admit(54323) is None
    assert dict(shares.by_uid) == {ADA: 1, BOB: 2, 54323: 1}


def test_operators_are_never_shut_out_by_other_users() -> None:
    shares = limits([0.0])
    for uid in (ADA, ADA, BOB, BOB):
        assert shares.admit(uid) is None
    # Root and taskd's user have max_connections of their own, with no per-user share.
    assert [shares.admit(uid) for uid in (ROOT, ROOT, ROOT, DAEMON)] == [None] * 4
    assert shares.admit(ROOT) == BUSY
    assert shares.open == 8


def test_refusals_are_logged_once_a_minute_per_user(caplog: pytest.LogCaptureFixture) -> None:
    clock = [0.0]
    shares = limits(clock)
    shares.admit(ADA)
    shares.admit(ADA)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            shares.admit(ADA)
        clock[0] += LOG_INTERVAL
        shares.admit(ADA)
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "refused a control connection from uid 54321: it has 2 open, the most one user may "
        "have (max_connections_per_user)",
        "refused a control connection from uid 54321: it has 2 open, the most one user may "
        "have (max_connections_per_user); 4 more refused since the last such line",
    ]
