"""systemd integration without libsystemd: sd_notify, the watchdog, socket activation.

Everything systemd passes in the environment (NOTIFY_SOCKET, WATCHDOG_*, LISTEN_*) is read
once and removed, so that tasks and the processes they start do not act in taskd's name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from taskd.models import counted

logger = logging.getLogger(__name__)
T = TypeVar("T")

SD_LISTEN_FDS_START = 3
STATUS_INTERVAL = 1.0  # seconds: STATUS= is sent at most this often
# A step of start-up that takes longer than this (seconds) tells systemd, then again as often,
# that the start goes on (EXTEND_TIMEOUT_USEC, twice as far ahead): a migration that rebuilds
# a large store outlasts TimeoutStartSec's default of 90 s, and a start killed there would
# begin the migration again at each restart.
START_STEP_NOTICE = 5.0


class Notifier:
    """Sends sd_notify(3) messages to `$NOTIFY_SOCKET`; does nothing when it is unset.

    Sending never blocks: if the receiver does not read (systemd busy or hung, a queue of
    only max_dgram_qlen datagrams), messages are dropped rather than stalling the event loop.
    """

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | bytes | None = None
        self._socket: socket.socket | None = None
        self._dropped = 0
        if address:
            # "@name" is an abstract socket: a leading NUL byte on the wire.
            self._address = b"\0" + address[1:].encode() if address.startswith("@") else address
            self._socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
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
        except BlockingIOError:
            self._dropped += 1
            if self._dropped == 1:
                logger.warning(
                    "sd_notify: nobody reads %s; dropping %r and what follows until it does",
                    os.fsdecode(self._address).replace("\0", "@"),
                    fields,
                )
        except OSError as exc:
            logger.warning("sd_notify %r failed: %s", fields, exc)
        else:
            if self._dropped:
                dropped = counted(self._dropped, "message")
                logger.warning("sd_notify: %s dropped", dropped)
                self._dropped = 0

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    async def starting(self, step: Awaitable[T], status: str) -> T:
        """Await a step of start-up; while it goes on past START_STEP_NOTICE, tell systemd
        so (with `status`), every START_STEP_NOTICE seconds, that the start is not stuck."""
        running = asyncio.ensure_future(step)
        try:
            while not (await asyncio.wait({running}, timeout=START_STEP_NOTICE))[0]:
                usec = int(2 * START_STEP_NOTICE * 1_000_000)
                self.send(f"EXTEND_TIMEOUT_USEC={usec}", f"STATUS={status}")
        finally:
            running.cancel()  # if we were cancelled: the step too
        return running.result()

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    async def keep_watchdog(self, interval: float) -> None:
        """Ping the watchdog every `interval` seconds until cancelled.

        The pings come from the event loop itself, so a task that blocks the loop stops
        them, and systemd restarts a daemon that has stopped responding.
        """
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

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
    """The inherited Unix stream socket to serve: the one named `control`, else the first.

    The other inherited sockets are closed: taskd has no use for them.
    """
    candidates = [
        (name, sock)
        for name, sock in sockets
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
    ]
    chosen = next((sock for name, sock in candidates if name == "control"), None)
    if chosen is None and candidates:
        chosen = candidates[0][1]
    for name, sock in sockets:
        if sock is not chosen:
            logger.warning(
                "ignoring the socket %r systemd passed in: not a Unix stream socket named control",
                name,
            )
            sock.close()
    return chosen


class StatusUpdates:
    """Keeps systemd's `STATUS=` line current: sent when told that something changed, at
    most once per `interval` seconds, and never while nothing changes."""

    def __init__(
        self,
        notifier: Notifier,
        summary: Callable[[], Awaitable[str]],
        interval: float = STATUS_INTERVAL,
    ) -> None:
        self._notifier = notifier
        self._summary = summary
        self._interval = interval
        self._changed = asyncio.Event()
        self._last: str | None = None

    def changed(self) -> None:
        """Something the summary shows may have changed (a job was queued, started, ended)."""
        self._changed.set()

    def follow(self, on_change: Callable[[Callable[[], None]], None]) -> None:
        """Be told of changes through `on_change`, if there is a systemd to tell: without one,
        a job's start and end need not call `changed`."""
        if self._notifier.enabled:
            on_change(self._changed.set)  # what `changed` does, a frame less at each job's end

    def sent(self, text: str) -> None:
        """The summary went out with another message (READY=1): no need to repeat it."""
        self._last = text

    async def run(self) -> None:
        """Send updates until cancelled; waits on `changed()`, so it sleeps while idle."""
        if not self._notifier.enabled:
            return
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                text = await self._summary()
            except Exception as exc:  # the status line is cosmetic: never let it stop taskd
                logger.warning("cannot compute the status for systemd: %s", exc)
            else:
                if text != self._last:
                    self._notifier.status(text)
                    self._last = text
            await asyncio.sleep(self._interval)  # the rate limit; changes meanwhile wait
