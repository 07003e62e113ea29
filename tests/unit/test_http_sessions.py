"""Dashboard sessions: idle expiry, the bound on their number, CSRF tokens (an injected clock)."""

from __future__ import annotations

from taskd.http.sessions import Sessions
from tests.support import Clock


def test_a_session_ends_after_its_idle_time_and_use_keeps_it() -> None:
    clock = Clock(0.0)
    sessions = Sessions(max_sessions=4, idle=60, clock=clock)
    session = sessions.open("full", "t", "client")
    clock.now = 59
    assert sessions.get(session.id) == session  # used: its idle time starts again
    clock.now = 118
    assert sessions.get(session.id) == session
    clock.now = 179
    assert sessions.get(session.id) is None and len(sessions) == 0
    assert sessions.get(None) is None and sessions.get("made-up") is None


def test_past_max_sessions_the_least_recently_used_is_signed_out() -> None:
    clock = Clock(0.0)
    sessions = Sessions(max_sessions=2, idle=600, clock=clock)
    first, second = sessions.open("full", "t", "a"), sessions.open("readonly", "t", "b")
    clock.now = 1
    sessions.get(first.id)  # now `second` is the least recently used
    third = sessions.open("full", "t", "c")
    assert sessions.get(second.id) is None
    assert sessions.get(first.id) == first and sessions.get(third.id) == third
    assert (len(sessions), sessions.evicted) == (2, 1)


def test_idle_sessions_make_room_before_any_is_evicted() -> None:
    clock = Clock(0.0)
    sessions = Sessions(max_sessions=1, idle=10, clock=clock)
    sessions.open("full", "t", "a")
    clock.now = 11
    sessions.open("full", "t", "b")
    assert sessions.evicted == 0


def test_each_session_has_its_own_csrf_token() -> None:
    sessions = Sessions(max_sessions=4, idle=60)
    one, two = sessions.open("full", "t", "a"), sessions.open("full", "t", "b")
    assert one.csrf != two.csrf and one.id != two.id
    assert one.csrf_matches(one.csrf)
    assert not one.csrf_matches(two.csrf) and not one.csrf_matches(None)
    assert not one.csrf_matches("")


def test_a_reload_ends_the_sessions_of_tokens_removed_or_changed() -> None:
    sessions = Sessions(max_sessions=4, idle=60)
    kept, removed = sessions.open("full", "a", "x"), sessions.open("full", "b", "y")
    demoted = sessions.open("full", "c", "z")
    assert sessions.reconfigure(30, {"a": "full", "c": "readonly"}) == 2
    assert sessions.get(kept.id) == kept
    assert sessions.get(removed.id) is None and sessions.get(demoted.id) is None
    assert sessions.idle == 30
