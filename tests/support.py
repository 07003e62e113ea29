"""Test helpers: a real taskd process, the real taskctl, and waiting without sleeping."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from taskctl import Client

FIXTURE_TASKS = Path(__file__).parent / "fixtures" / "tasks"
BIN = Path(sys.executable).parent
TASKCTL = str(BIN / "taskctl") if (BIN / "taskctl").exists() else None


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


class Taskd:
    """One taskd process on a temporary folder; readiness comes from its sd_notify READY=1."""

    def __init__(self, root: Path, tasks: Path = FIXTURE_TASKS, config: str = "") -> None:
        self.root = root
        self.tasks = tasks
        self.socket = root / "taskd.sock"
        self.database = root / "taskd.db"
        self.config_file = root / "taskd.toml"
        self.log_file = root / "taskd.log"
        self.config_file.write_text(config)
        self.process: subprocess.Popen[bytes] | None = None
        self.notifications: list[str] = []
        self._notify: socket.socket | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "taskd",
            "--config", str(self.config_file),
            "--tasks", str(self.tasks),
            "--database", str(self.database),
            "--socket", str(self.socket),
            "--log-level", "debug",
        ]  # fmt: skip

    def start(
        self,
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], Any] | None = None,
    ) -> Taskd:
        notify_path = self.root / "notify.sock"
        notify_path.unlink(missing_ok=True)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify_path))
        environment = {**os.environ, "NOTIFY_SOCKET": str(notify_path), **(env or {})}
        environment.pop("TASKD_SOCKET", None)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                preexec_fn=preexec_fn,
            )
        try:
            self.wait_for_notification("READY=1", timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_for_notification(self, field: str, timeout: float = 30.0) -> str:
        """The next sd_notify message that contains `field`."""
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
            self._notify.settimeout(min(remaining, 0.5))
            try:
                message = self._notify.recv(4096).decode()
            except TimeoutError:
                continue
            self.notifications.append(message)
            if field in message.split("\n"):
                return message

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit status."""
        return self.signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> int:
        return self.signal_and_wait(signal.SIGKILL, 30.0)

    def signal_and_wait(self, signum: int, timeout: float) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        code = self.process.wait(timeout)
        self.close()
        return code

    def close(self) -> None:
        """Stop listening for notifications (the process is left alone)."""
        if self._notify is not None:
            self._notify.close()
            self._notify = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def ctl(
        self, *args: str, input: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the real taskctl against this daemon."""
        command = [TASKCTL] if TASKCTL else [sys.executable, "-m", "taskctl"]
        return subprocess.run(
            [*command, "--socket", str(self.socket), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def client(self) -> Client:
        return Client(str(self.socket))
