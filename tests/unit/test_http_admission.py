"""Who holds the HTTP listener's connections: the unauthenticated share and the rest."""

from __future__ import annotations

import asyncio

import pytest

from taskd.http.admission import Admission, Closing


class Connection:
    """A stand-in for the listener's connection: a name, whether it waits idle, and whether
    it is stalled in the middle of a request head."""

    def __init__(self, name: str, *, idle: bool = False, in_head: bool = False) -> None:
        self.name, self.idle, self.in_head = name, idle, in_head

    def __repr__(self) -> str:
        return self.name


def fill_share(admission: Admission[Connection], prefix: str = "u") -> list[Connection]:
    members = [Connection(f"{prefix}{n}") for n in range(admission.share)]
    for member in members:
        assert admission.enter(member, unread=False, credential=False) is None
    return members


@pytest.mark.parametrize(
    ("max_connections", "share", "authenticated"),
    [(256, 128, 128), (3, 1, 2), (2, 1, 1), (1, 1, 1)],
)
def test_max_connections_is_split_in_two(
    max_connections: int, share: int, authenticated: int
) -> None:
    admission: Admission[Connection] = Admission(max_connections)
    assert (admission.share, admission.max_authenticated) == (share, authenticated)


def test_a_new_connection_takes_the_place_of_the_oldest_in_a_full_share() -> None:
    admission: Admission[Connection] = Admission(6)
    first, second, _ = fill_share(admission)
    newcomer = Connection("new")
    assert admission.enter(newcomer, unread=False, credential=False) == Closing(
        first, "unauthenticated_share"
    )
    assert admission.open == 3
    assert admission.enter(Connection("newer"), unread=False, credential=False) == Closing(
        second, "unauthenticated_share"
    )


def test_one_whose_first_bytes_are_not_read_yet_keeps_its_place() -> None:
    admission: Admission[Connection] = Admission(6)
    unread = Connection("unread")
    assert admission.enter(unread, unread=True, credential=False) is None
    rest = [Connection("a"), Connection("b")]
    for member in rest:
        admission.enter(member, unread=False, credential=False)
    closing = admission.enter(Connection("c"), unread=False, credential=False)
    assert closing == Closing(rest[0], "unauthenticated_share")  # not the older, unread one
    admission.read(unread)
    closing = admission.enter(Connection("d"), unread=False, credential=False)
    assert closing == Closing(unread, "unauthenticated_share")


def test_one_stalled_in_a_request_head_goes_before_one_that_has_sent_nothing() -> None:
    admission: Admission[Connection] = Admission(6)
    silent, stalled, answered = Connection("silent"), Connection("stalled"), Connection("done")
    for member in (silent, stalled, answered):
        admission.enter(member, unread=False, credential=False)
    stalled.in_head = True
    closing = admission.enter(Connection("new"), unread=False, credential=False)
    assert closing == Closing(stalled, "unauthenticated_share")
    closing = admission.enter(Connection("newer"), unread=False, credential=False)
    assert closing == Closing(silent, "unauthenticated_share")  # then the oldest


async def test_the_listener_waits_while_the_share_is_full_of_unread_connections() -> None:
    admission: Admission[Connection] = Admission(4)
    members = [Connection("a"), Connection("b")]
    for member in members:
        admission.enter(member, unread=True, credential=False)
    waiting = asyncio.create_task(admission.wait_for_room())
    await asyncio.sleep(0)
    assert not waiting.done()
    admission.read(members[1])
    await asyncio.wait_for(waiting, 5)
    # A member that leaves makes room too.
    admission.enter(Connection("c"), unread=True, credential=False)  # closes b, read
    waiting = asyncio.create_task(admission.wait_for_room())
    await asyncio.sleep(0)
    assert not waiting.done()
    admission.leave(members[0])
    await asyncio.wait_for(waiting, 5)


def test_a_connection_that_shows_a_token_moves_out_of_the_share() -> None:
    admission: Admission[Connection] = Admission(4)
    caller, other = fill_share(admission)
    assert admission.authenticate(caller) == (True, None)
    assert admission.authenticated(caller) and admission.authenticated_count == 1
    assert admission.enter(Connection("new"), unread=False, credential=False) is None
    closing = admission.enter(Connection("newer"), unread=False, credential=False)
    assert closing == Closing(other, "unauthenticated_share")  # never the caller
    assert admission.open == 3 and admission.authenticated(caller)


def test_a_full_authenticated_pool_closes_its_oldest_idle_connection() -> None:
    admission: Admission[Connection] = Admission(4)
    a, b, c = Connection("a"), Connection("b"), Connection("c")
    for member in (a, b):  # a unix: listener's allowed peers are authenticated at once
        assert admission.enter(member, unread=False, credential=True) is None
    assert admission.authenticated_count == 2
    admission.enter(c, unread=False, credential=False)
    assert admission.authenticate(c) == (False, None)  # a and b are busy
    b.idle = True
    assert admission.authenticate(c) == (True, Closing(b, "idle"))
    assert admission.authenticated(c) and not admission.authenticated(b)
    # A peer allowed at connect that finds no room waits in the share.
    allowed = Connection("allowed")
    assert admission.enter(allowed, unread=False, credential=True) is None
    assert not admission.authenticated(allowed) and admission.open == 3
