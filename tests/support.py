"""Test helpers: a real taskd process, the real taskctl, and waiting without sleeping."""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import msgspec

from taskctl import Client
from taskd.models import Job, JobStatus
from taskd.protocol import PROTOCOL_VERSION, Request, encode_frame
from taskd.store import JobFilter, Store, store_for

T = TypeVar("T")

FIXTURE_TASKS = Path(__file__).parent / "fixtures" / "tasks"
BIN = Path(sys.executable).parent
TASKCTL = str(BIN / "taskctl") if (BIN / "taskctl").exists() else None


class Clock:
    """A clock that stands still until a test moves it (`clock.now = ...`)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def short_tempdir() -> Path:
    """A private folder with a short path: Unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Wait for a condition that has no event to wait on (a file a task writes, say)."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def wait_for_clock(instant: float) -> None:
    """Wait until the wall clock (`time.time()`) has passed `instant`: for time that must go
    by with nothing running to report it (schedule ticks missed while taskd is down)."""
    while (left := instant - time.time()) > 0:
        time.sleep(left)


SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


class Taskd:
    """One taskd process on a temporary folder; readiness comes from its sd_notify READY=1.

    It receives taskd's sd_notify datagrams on a socket of its own (a path, or an abstract
    `@name` with `abstract_notify`). With `activation` taskd runs under
    systemd-socket-activate, which creates the socket and starts taskd at the first
    connection, passing the socket as a file descriptor named `control`.
    """

    def __init__(
        self,
        root: Path,
        tasks: Path = FIXTURE_TASKS,
        config: str = "",
        *,
        socket_path: Path | None = None,
        log_level: str = "debug",
        activation: bool = False,
        abstract_notify: bool = False,
    ) -> None:
        self.root = root
        self.tasks = tasks
        self.socket = socket_path or root / "taskd.sock"
        self.database = root / "taskd.db"
        self.config_file = root / "taskd.toml"
        self.log_file = root / "taskd.log"
        self.config_file.write_text(config)
        self.log_level = log_level
        self.activation = activation
        self.abstract_notify = abstract_notify
        self.extra_args: list[str] = []  # more taskd flags, e.g. --allow-empty-store
        self.run_as: list[str] = []  # a command that runs taskd as another user (setpriv ...)
        # stdout and stderr to a pipe nobody reads (it fills after 64 KiB), in place of the log
        # file; once taskd has exited, `close()` reads what the pipe holds into `unread`.
        self.unread_pipe = False
        self.unread = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.notifications: list[str] = []
        self.received_at: list[float] = []  # time.monotonic() of each notification
        self._notify: socket.socket | None = None

    def command(self) -> list[str]:
        return [
            *self.run_as, sys.executable, "-m", "taskd",
            "--config", str(self.config_file),
            "--tasks", str(self.tasks),
            "--database", str(self.database),
            "--socket", str(self.socket),
            "--log-level", self.log_level,
            *self.extra_args,
        ]  # fmt: skip

    def _bind_notify_socket(self) -> str:
        """Listen for sd_notify datagrams; the NOTIFY_SOCKET value that reaches us."""
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if self.abstract_notify:
            name = f"taskd-test-{os.getpid()}-{id(self)}"
            self._notify.bind(b"\0" + name.encode())
            return f"@{name}"
        notify_path = self.root / "notify.sock"
        notify_path.unlink(missing_ok=True)
        self._notify.bind(str(notify_path))
        return str(notify_path)

    def start(
        self,
        timeout: float = 60.0,  # a loaded machine, beside another test run, can take 30 s
        env: dict[str, str] | None = None,
        *,
        wait: bool = True,
        preexec_fn: Callable[[], Any] | None = None,
    ) -> Taskd:
        """Start taskd and wait for READY=1 (with `wait=False`, return at once; under
        socket activation, once the socket exists, since taskd starts at the first call)."""
        variables = {"NOTIFY_SOCKET": self._bind_notify_socket(), **(env or {})}
        command = self.command()
        environment = {**os.environ, **variables}
        environment.pop("TASKD_SOCKET", None)
        if self.activation:
            assert SOCKET_ACTIVATE, "systemd-socket-activate is not installed"
            # It passes taskd only the variables named with -E (and PATH, HOME, ...); its
            # own environment keeps no NOTIFY_SOCKET, so that it cannot report for taskd.
            settings = [f"--setenv={name}={value}" for name, value in variables.items()]
            command = [SOCKET_ACTIVATE, f"--listen={self.socket}", "--fdname=control",
                       *settings, *command]  # fmt: skip
            environment.pop("NOTIFY_SOCKET", None)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE if self.unread_pipe else log,
                stderr=subprocess.STDOUT,
                env=environment,
                preexec_fn=preexec_fn,
            )
        try:
            if self.activation:
                wait_until(self.socket.exists, timeout, "systemd-socket-activate's socket")
            elif wait:
                self.wait_for_notification("READY=1", timeout)
                if not self.unread_pipe and self.log_level in ("debug", "info"):
                    # What taskd logged before READY, its log thread writes soon after,
                    # unless a task ends the process first (os._exit: nothing more is written).
                    ready, process = f"ready (pid {self.process.pid})", self.process
                    wait_until(lambda: ready in self.log or process.poll() is not None,
                               timeout, "taskd's ready line")  # fmt: skip
        except BaseException:
            self.close()
            raise
        return self

    def _receive(self, timeout: float) -> str | None:
        assert self._notify is not None
        self._notify.settimeout(timeout)
        try:
            message = self._notify.recv(4096).decode()
        except TimeoutError:
            return None
        self.notifications.append(message)
        self.received_at.append(time.monotonic())
        return message

    def wait_for_notification(self, field: str, timeout: float = 30.0) -> str:
        """The next sd_notify message that contains `field` (a line such as READY=1, or
        the start of one, such as STATUS=)."""
        assert self._notify is not None and self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {field} from taskd in {timeout}s; log:\n{self.log}")
            if self.process.poll() is not None:
                raise AssertionError(
                    f"taskd exited with {self.process.returncode} before {field}; log:\n{self.log}"
                )
            message = self._receive(min(remaining, 0.5))
            if message is not None and any(
                line == field or (field.endswith("=") and line.startswith(field))
                for line in message.split("\n")
            ):
                return message

    def collect_notifications(self, seconds: float) -> list[tuple[float, str]]:
        """Every notification that arrives in the next `seconds`, with its arrival time.

        For measuring a rate (watchdog pings) or checking that nothing is sent while idle.
        """
        deadline = time.monotonic() + seconds
        collected = []
        while (remaining := deadline - time.monotonic()) > 0:
            message = self._receive(remaining)
            if message is not None:
                collected.append((self.received_at[-1], message))
        return collected

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit status."""
        return self.signal_and_wait(signal.SIGTERM, timeout)

    def refused(self, timeout: float = 60.0, *, preexec_fn: Callable[[], Any] | None = None) -> str:
        """Start taskd, which must refuse to start: exit 1 with a message and no traceback.
        Returns its log."""
        self.start(wait=False, preexec_fn=preexec_fn)
        assert self.process is not None
        code = self.process.wait(timeout)
        self.close()
        assert code == 1, self.log
        assert "Traceback" not in self.log, self.log
        return self.log

    def kill(self) -> int:
        return self.signal_and_wait(signal.SIGKILL, 30.0)

    def signal_and_wait(self, signum: int, timeout: float) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        code = self.process.wait(timeout)
        while self._notify is not None and self._receive(0.0001) is not None:
            pass  # keep what it said on the way out (STOPPING=1)
        self.close()
        return code

    def close(self) -> None:
        """Stop listening for notifications (the process is left alone); read an exited
        process's unread pipe."""
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        pipe = self.process.stdout if self.process is not None else None
        if pipe is not None and not pipe.closed and not self.running:
            self.unread += pipe.read().decode(errors="replace")
            pipe.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def ctl(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real taskctl against this daemon (`env`: variables to add)."""
        return subprocess.run(
            [*self.ctl_command(), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **env} if env is not None else None,
        )

    def ctl_command(self) -> list[str]:
        """The command line of the real taskctl, talking to this daemon."""
        command = [TASKCTL] if TASKCTL else [sys.executable, "-m", "taskctl"]
        return [*command, "--socket", str(self.socket)]

    def client(self) -> Client:
        return Client(str(self.socket))

    def in_store(self, use: Callable[[Store], Awaitable[T]]) -> T:
        """`use(store)` on this stopped daemon's job store, through the store interface."""

        async def run() -> T:
            store = store_for(f"sqlite://{self.database}")
            await store.open()
            try:
                return await use(store)
            finally:
                await store.close()

        assert not self.running, "the daemon owns its store while it runs"
        return asyncio.run(run())

    def stored_jobs(self, *statuses: JobStatus) -> list[Job]:
        """The jobs in this stopped daemon's store, newest first; payloads and results
        decoded as a client sees them."""
        query = JobFilter(statuses or None, limit=1_000_000)
        return [
            msgspec.structs.replace(
                job,
                payload=msgspec.msgpack.decode(job.payload),
                result=None if job.result is None else msgspec.msgpack.decode(job.result),
            )
            for job in self.in_store(lambda store: store.list_jobs(query))
        ]


class RawConnection:
    """A control connection that sends whatever bytes a test likes and reads replies."""

    def __init__(self, path: Path, *, hello: bool = True, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._next_id = 1
        if hello:
            assert "result" in self.call("hello", {"protocol": PROTOCOL_VERSION})

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def request(self, method: str, params: object = None) -> bytes:
        """A well-formed request frame (params as msgpack; None means none)."""
        request = self.request_frame(self._next_id, method, params)
        self._next_id += 1
        return request

    @staticmethod
    def request_frame(request_id: int, method: str, params: object = None) -> bytes:
        raw = msgspec.Raw(msgspec.msgpack.encode({} if params is None else params))
        return encode_frame(Request(request_id, method, raw))

    def call(self, method: str, params: object = None) -> dict[str, Any]:
        self.sock.sendall(self.request(method, params))
        return self.reply()

    def reply(self) -> dict[str, Any]:
        (size,) = struct.unpack(">I", self._receive(4))
        reply: dict[str, Any] = msgspec.msgpack.decode(self._receive(size))
        return reply

    def _receive(self, size: int) -> bytes:
        # MSG_WAITALL alone is not enough: a socket with a timeout is non-blocking inside.
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(min(size - len(data), 1 << 20))
            if not chunk:
                raise ConnectionError("taskd closed the connection")
            data += chunk
        return bytes(data)

    def closed_by_taskd(self) -> bool:
        """True once taskd has closed its end (after any replies still unread)."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
        return True


def hello_after_refusal(path: Path) -> dict[str, Any]:
    """Connect, wait until taskd has answered (a refusal comes unasked), only then send hello
    (as a client that talks first would, a moment later), and read the reply.

    Sending must not fail with a broken pipe, and the refusal must still be readable.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        select.select([sock], [], [], 10)  # the error frame has arrived
        time.sleep(0.05)  # taskd has had ample time to close if it were going to
        sock.sendall(RawConnection.request_frame(1, "hello", {"protocol": PROTOCOL_VERSION}))
        header = sock.recv(4, socket.MSG_WAITALL)
        (size,) = struct.unpack(">I", header)
        reply: dict[str, Any] = msgspec.msgpack.decode(sock.recv(size, socket.MSG_WAITALL))
        assert sock.recv(1) == b"", "taskd did not close the refused connection"
        return reply


def frame(body: bytes) -> bytes:
    """A frame around any body: the length prefix tells the truth."""
    return struct.pack(">I", len(body)) + body


def rss_kib(pid: int) -> int:
    """The resident memory of a process (VmRSS in /proc/PID/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def enqueue(daemon: Taskd, *args: str, input: str | None = None) -> int:
    """`taskctl enqueue ARGS` against `daemon`, which must succeed: the new job's id."""
    done = daemon.ctl("enqueue", *args, input=input)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def job_ids_in(path: Path) -> list[int]:
    """The job ids fixture tasks appended to a file (the first field of each line), in
    order; none if the file is not there yet."""
    return [int(line.split()[0]) for line in path.read_text().splitlines()] if path.exists() else []


class Gate:
    """A file the test holds locked: a fixture task given its path as "gate" waits (in a
    thread, without polling) until the test opens the gate, and every attempt after that
    passes at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._held: IO[str] | None = path.open("w")
        fcntl.flock(self._held, fcntl.LOCK_EX)

    def __str__(self) -> str:
        return str(self.path)

    def open(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None
