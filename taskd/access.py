"""Who may use the control socket: peer credentials checked against the configuration."""

from __future__ import annotations

import functools
import grp
import os
import pwd
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Literal

from taskd.config import Config, ConfigError
from taskd.models import Peer

Access = Literal["full", "readonly"]
_UCRED = struct.Struct("3i")
# SO_PEERGROUPS (Linux 4.13) is missing from the socket module; its value is fixed by the ABI.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_MAX_PEER_GROUPS_BYTES = 1024  # what socket.getsockopt accepts at most: 256 groups


def peer_of(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(data)
    return pid, uid, gid


def peer_groups(sock: socket.socket, pid: int, gid: int) -> set[int]:
    """The primary and supplementary groups of the peer, as they were when it connected.

    SO_PEERGROUPS reads the credentials the kernel recorded at connect(), so the answer
    cannot be about another process that reused the pid. Kernels without it, and peers in
    more than 256 groups, fall back to /proc.
    """
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _MAX_PEER_GROUPS_BYTES)
    except OSError:
        return groups_of(pid, gid)
    count = len(data) // 4
    return {gid, *struct.unpack(f"{count}I", data[: count * 4])}


def groups_of(pid: int, gid: int) -> set[int]:
    """The primary and supplementary groups of a running process, from /proc."""
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    break
    except (OSError, ValueError):
        pass
    return groups


@functools.lru_cache(maxsize=256)
def user_name(uid: int) -> str:
    """`uid 1000 (ada)` for log lines and messages; the bare uid if it has no name."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


@functools.lru_cache(maxsize=64)
def group_name(gid: int) -> str:
    """`gid 65534 (nogroup)` for messages; the bare gid if it has no name."""
    try:
        return f"gid {gid} ({grp.getgrgid(gid).gr_name})"
    except KeyError:
        return f"gid {gid}"


class AccessPolicy:
    """Allowed: root, the daemon's own user, and the configured users and groups."""

    def __init__(
        self,
        full_users: Iterable[int] = (),
        full_groups: Iterable[int] = (),
        readonly_users: Iterable[int] = (),
        readonly_groups: Iterable[int] = (),
    ) -> None:
        self.full_users = {0, os.getuid(), *full_users}
        self.full_groups = set(full_groups)
        self.readonly_users = set(readonly_users)
        self.readonly_groups = set(readonly_groups)

    @classmethod
    def from_config(cls, config: Config) -> AccessPolicy:
        """Resolve the names in allow_*/readonly_* to ids; unknown names are errors."""
        return cls(
            full_users=_uids(config.allow_users, "allow_users"),
            full_groups=_gids(config.allow_groups, "allow_groups"),
            readonly_users=_uids(config.readonly_users, "readonly_users"),
            readonly_groups=_gids(config.readonly_groups, "readonly_groups"),
        )

    def check(
        self, pid: int, uid: int, gid: int, groups: Callable[[], set[int]] | None = None
    ) -> Peer | None:
        """The peer with its access level, or None if it may not connect.

        `groups` gives the peer's groups; it is called only when a group could matter.
        """
        if uid in self.full_users:
            return Peer(pid, uid, gid, "full")
        member_of = {gid}
        if self.full_groups or self.readonly_groups:
            member_of = groups() if groups is not None else groups_of(pid, gid)
        if member_of & self.full_groups:
            return Peer(pid, uid, gid, "full")
        if uid in self.readonly_users or member_of & self.readonly_groups:
            return Peer(pid, uid, gid, "readonly")
        return None


def _uids(names: Iterable[str | int], setting: str) -> set[int]:
    return _ids(names, setting, "user", lambda name: pwd.getpwnam(name).pw_uid)


def _gids(names: Iterable[str | int], setting: str) -> set[int]:
    return _ids(names, setting, "group", lambda name: grp.getgrnam(name).gr_gid)


def _ids(
    names: Iterable[str | int], setting: str, kind: str, lookup: Callable[[str], int]
) -> set[int]:
    """Numeric ids for user or group names; a name the machine does not know is an error."""
    ids = set()
    for name in names:
        try:
            ids.add(name if isinstance(name, int) else lookup(name))
        except KeyError:
            raise ConfigError(f"{setting}: no {kind} named {name!r} on this machine") from None
    return ids


def group_id(name: str, setting: str = "socket_group") -> int:
    """The id of a group files are given (`socket_group`, `[sqlite] group`)."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"{setting}: no group named {name!r} on this machine") from None
