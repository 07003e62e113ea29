"""sd_notify, the watchdog interval, inherited sockets and the STATUS= updater, in isolation."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskd.systemd import (
    Notifier,
    StatusUpdates,
    inherited_sockets,
    pick_control_socket,
    watchdog_interval,
)


@pytest.fixture
def receiver(short_tmp: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(short_tmp / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_nothing_is_sent_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("fine")  # no socket, no error
    notifier.close()


def test_messages_reach_a_path_socket_and_the_variable_is_removed(
    monkeypatch: pytest.MonkeyPatch, receiver: tuple[str, socket.socket]
) -> None:
    path, sock = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()
    assert "NOTIFY_SOCKET" not in os.environ  # tasks must not report in taskd's name
    notifier.ready("3 running")
    assert sock.recv(4096) == f"READY=1\nSTATUS=3 running\nMAINPID={os.getpid()}".encode()
    notifier.reloading()
    fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))
    assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0
    notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    notifier.close()


def test_abstract_notify_socket() -> None:
    name = f"taskd-unit-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        notifier = Notifier(f"@{name}")
        notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        notifier.close()


def test_a_vanished_notify_socket_is_logged_not_raised(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(short_tmp / "gone.sock"))
    notifier.status("x")
    assert "sd_notify ('STATUS=x',) failed" in caplog.text
    notifier.close()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("400000", None, 0.2),
        ("400000", "self", 0.2),
        ("400000", "1", None),  # meant for another process
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert watchdog_interval() == expected
    assert "WATCHDOG_USEC" not in os.environ and "WATCHDOG_PID" not in os.environ


INHERIT = """
import json, os, socket, sys
from taskd.systemd import inherited_sockets, pick_control_socket
for target, fd in zip((3, 4, 5), map(int, sys.argv[1:])):
    os.dup2(fd, target)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="3",
                  LISTEN_FDNAMES="metrics:control:log")
found = inherited_sockets()
chosen = pick_control_socket(found)
print(json.dumps({
    "names": [name for name, _ in found],
    "chosen": chosen.getsockname() if chosen else None,
    "inheritable": os.get_inheritable(chosen.fileno()) if chosen else None,
    "left": [k for k in os.environ if k.startswith("LISTEN_")],
}))
"""


def test_inherited_sockets_pick_the_one_named_control(short_tmp: Path) -> None:
    metrics = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(str(short_tmp / "control.sock"))
    control.listen()
    log = open(short_tmp / "not-a-socket", "w")  # noqa: SIM115
    fds = [metrics.fileno(), control.fileno(), log.fileno()]
    try:
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(INHERIT), *map(str, fds)],
            pass_fds=fds, capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        metrics.close()
        control.close()
        log.close()
    found = json.loads(result.stdout)
    assert found == {
        "names": ["metrics", "control"],  # the file is no socket: skipped
        "chosen": str(short_tmp / "control.sock"),
        "inheritable": False,  # tasks' child processes do not get it
        "left": [],
    }, result.stderr


def test_inherited_sockets_for_another_process_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert inherited_sockets() == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ


def test_pick_control_socket_without_names_takes_the_first_unix_stream() -> None:
    datagram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    assert pick_control_socket([("unknown", datagram), ("unknown", stream)]) is stream
    assert datagram.fileno() == -1  # closed: of no use to taskd
    stream.close()
    assert pick_control_socket([]) is None


class _Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__("@unused")
        self.sent: list[tuple[float, str]] = []

    def send(self, *fields: str) -> None:
        self.sent.append((asyncio.get_running_loop().time(), "\n".join(fields)))


def test_status_updates_follow_changes_only_for_a_systemd_to_tell(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without $NOTIFY_SOCKET nothing is sent: a job's start and end call no listener for it."""

    async def summary() -> str:
        return "idle"

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for notifier, listeners in ((Notifier(), 0), (_Recorder(), 1)):
        followed: list[object] = []
        StatusUpdates(notifier, summary).follow(followed.append)
        assert len(followed) == listeners
        notifier.close()


async def test_status_updates_are_sent_on_change_at_most_once_per_interval() -> None:
    notifier = _Recorder()
    state = {"text": "idle", "calls": 0}

    async def summary() -> str:
        state["calls"] += 1
        return state["text"]

    updates = StatusUpdates(notifier, summary, interval=0.1)
    updates.sent("idle")
    runner = asyncio.create_task(updates.run())
    await asyncio.sleep(0.25)
    assert state["calls"] == 0  # nothing changed: not even a look
    for n in range(50):
        state["text"] = f"{n} running"
        updates.changed()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.25)
    times = [at for at, _ in notifier.sent]
    # 0.5 s of changes (longer on a loaded machine), sent at most once per 0.1 s.
    assert len(times) >= 4, notifier.sent
    assert all(b - a >= 0.09 for a, b in itertools.pairwise(times))
    assert notifier.sent[-1][1] == "STATUS=49 running"
    updates.changed()  # same text: not sent again
    await asyncio.sleep(0.15)
    assert notifier.sent[-1][1] == "STATUS=49 running" and len(notifier.sent) == len(times)
    runner.cancel()
    notifier.close()


async def test_a_failing_summary_is_logged_and_the_updates_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = _Recorder()
    outcomes: list[str | Exception] = [RuntimeError("store closed"), "back"]

    async def summary() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    updates = StatusUpdates(notifier, summary, interval=0.01)
    runner = asyncio.create_task(updates.run())
    updates.changed()
    await asyncio.sleep(0.05)
    updates.changed()
    await asyncio.sleep(0.05)
    assert "cannot compute the status for systemd: store closed" in caplog.text
    assert [text for _, text in notifier.sent] == ["STATUS=back"]
    assert not runner.done()
    runner.cancel()
    notifier.close()


def test_a_receiver_that_does_not_read_never_blocks_the_sender(
    receiver: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    path, sock = receiver
    notifier = Notifier(path)
    started = time.monotonic()
    for n in range(200):  # far more than the queue holds (net.unix.max_dgram_qlen)
        notifier.status(str(n))
    assert time.monotonic() - started < 1.0
    assert caplog.text.count("nobody reads") == 1
    while True:  # systemd catches up: the next message gets through, the loss is told
        sock.settimeout(0.01)
        try:
            sock.recv(4096)
        except TimeoutError:
            break
    notifier.status("back")
    assert sock.recv(4096) == b"STATUS=back"
    assert "messages dropped" in caplog.text
    notifier.close()
