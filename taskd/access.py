"""Who may use the control socket: peer credentials checked against the configuration."""

from __future__ import annotations

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


def peer_of(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(data)
    return pid, uid, gid


def groups_of(pid: int, gid: int) -> set[int]:
    """The primary and supplementary groups of a running process."""
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

    def check(self, pid: int, uid: int, gid: int) -> Peer | None:
        """The peer with its access level, or None if it may not connect."""
        if uid in self.full_users:
            return Peer(pid, uid, gid, "full")
        groups = groups_of(pid, gid) if (self.full_groups or self.readonly_groups) else {gid}
        if groups & self.full_groups:
            return Peer(pid, uid, gid, "full")
        if uid in self.readonly_users or groups & self.readonly_groups:
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


def group_id(name: str) -> int:
    """The id of the group the socket file is given (`socket_group`)."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group: no group named {name!r} on this machine") from None
