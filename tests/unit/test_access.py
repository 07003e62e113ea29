"""The access policy and the socket file's permissions, without a daemon."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from taskd import server
from taskd.access import AccessPolicy, peer_groups, peer_of, user_name


def test_root_and_own_user_always_get_full_access() -> None:
    policy = AccessPolicy()
    assert policy.check(10, 0, 0) is not None
    own = policy.check(10, os.getuid(), os.getgid())
    assert own is not None and own.access == "full"
    assert policy.check(10, 4242, 4242) is None


def test_users_and_groups() -> None:
    policy = AccessPolicy(
        full_users=[1001], full_groups=[2001], readonly_users=[1002], readonly_groups=[2002]
    )
    member_of = {2002}

    def groups() -> set[int]:
        return member_of

    assert policy.check(1, 1001, 5, groups).access == "full"  # type: ignore[union-attr]
    assert policy.check(1, 1002, 5, groups).access == "readonly"  # type: ignore[union-attr]
    assert policy.check(1, 1003, 5, groups).access == "readonly"  # type: ignore[union-attr]
    member_of = {2001, 2002}
    assert policy.check(1, 1003, 5, groups).access == "full"  # type: ignore[union-attr]
    member_of = {5}
    assert policy.check(1, 1003, 5, groups) is None


def test_groups_are_not_looked_up_when_no_group_is_configured() -> None:
    def groups() -> set[int]:
        raise AssertionError("looked up")

    assert AccessPolicy(full_users=[7]).check(1, 7, 7, groups) is not None
    assert AccessPolicy().check(1, 8, 8, groups) is None


def test_peer_credentials_of_a_socket_pair() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert peer_of(left) == (os.getpid(), os.getuid(), os.getgid())
        assert peer_groups(left, os.getpid(), os.getgid()) == {os.getgid(), *os.getgroups()}


def test_user_name() -> None:
    assert user_name(0) == "uid 0 (root)"
    assert user_name(4_000_000_000) == "uid 4000000000"


def test_socket_is_never_more_open_than_0600_before_it_has_its_group(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real_chown = os.chown

    def chown(path: str | Path, uid: int, gid: int) -> None:
        seen.append(stat.S_IMODE(os.stat(path).st_mode))
        real_chown(path, uid, gid)

    monkeypatch.setattr(server.os, "chown", chown)
    mask = os.umask(0o022)
    os.umask(mask)
    path = short_tmp / "run" / "taskd.sock"
    sock, lock = server.bind_socket(path, 0o660, os.getgid())
    try:
        assert seen[-1] == 0o600  # the socket, just before it gets its group
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
        assert os.umask(mask) == mask  # the process umask is back as it was
    finally:
        sock.close()
        os.close(lock)
