"""systemd integration without libsystemd: sd_notify, the watchdog, socket activation."""

from __future__ import annotations

import logging
import os
import socket
import stat
import time

logger = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify(3) messages to `$NOTIFY_SOCKET`; does nothing when it is unset."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | bytes | None = None
        self._socket: socket.socket | None = None
        if address:
            # "@name" is an abstract socket: a leading NUL byte on the wire.
            self._address = b"\0" + address[1:].encode() if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        os.environ.pop("NOTIFY_SOCKET", None)  # tasks must not talk to systemd in our name

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *fields: str) -> None:
        if self._socket is None or self._address is None:
            return
        message = "\n".join(fields).encode()
        try:
            self._socket.sendto(message, self._address)
        except OSError as exc:
            logger.warning("sd_notify %r failed: %s", fields, exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval() -> float | None:
    """Seconds between keep-alive pings systemd expects (half its WatchdogSec), or None."""
    usec = os.environ.pop("WATCHDOG_USEC", None)
    pid = os.environ.pop("WATCHDOG_PID", None)
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        interval = int(usec) / 1_000_000
    except ValueError:
        logger.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        return None
    return interval / 2 if interval > 0 else None


def inherited_sockets() -> list[tuple[str, socket.socket]]:
    """Listening sockets passed by systemd (`LISTEN_FDS`), with their names.

    The variables are removed so that tasks, and processes they start, do not inherit them.
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    names = os.environ.pop("LISTEN_FDNAMES", None)
    if not count or pid != str(os.getpid()):
        return []
    try:
        total = int(count)
    except ValueError:
        logger.warning("ignoring LISTEN_FDS=%r: not a number", count)
        return []
    labels = names.split(":") if names else []
    found = []
    for index in range(total):
        fd = SD_LISTEN_FDS_START + index
        label = labels[index] if index < len(labels) else "unknown"
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if not stat.S_ISSOCK(mode):
            continue
        os.set_inheritable(fd, False)
        found.append((label, socket.socket(fileno=fd)))
    return found


def pick_control_socket(sockets: list[tuple[str, socket.socket]]) -> socket.socket | None:
    """The inherited Unix stream socket to serve: the one named `control`, else the first."""
    candidates = [
        (name, sock)
        for name, sock in sockets
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
    ]
    for name, sock in candidates:
        if name == "control":
            return sock
    return candidates[0][1] if candidates else None
