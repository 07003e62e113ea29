"""`make run`: start taskd on the example tasks, show taskctl working, keep taskd running.

taskd says it is ready over sd_notify, as it tells systemd; if it exits instead (a broken
task file, another taskd on the same socket), its own message is on the screen and its
exit status becomes this one's. Ctrl-C stops taskd gracefully.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BIN = Path(sys.executable).parent
SOCKET = ROOT / ".run" / "taskd.sock"
EMAIL = '{"to": "ada@example.com", "subject": "Hello", "body": "Welcome!"}'


def start(notify: socket.socket, notify_path: str) -> subprocess.Popen[bytes] | int:
    """taskd, once it has said READY=1; or its exit status if it stopped first."""
    taskd = subprocess.Popen(
        [BIN / "taskd", "--config", HERE / "taskd.toml"],
        env={**os.environ, "NOTIFY_SOCKET": notify_path},
    )
    exited = os.pidfd_open(taskd.pid)
    try:
        while True:
            readable, _, _ = select.select([notify, exited], [], [])
            if exited in readable:
                return taskd.wait()
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                return taskd
    finally:
        os.close(exited)


def drain(notify: socket.socket) -> None:
    """Read taskd's later notifications (its STATUS= lines), as systemd would."""
    with contextlib.suppress(OSError):
        while notify.recv(4096):
            pass


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches taskd too: it stops
    with (
        tempfile.TemporaryDirectory() as folder,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
    ):
        notify_path = os.path.join(folder, "notify")
        notify.bind(notify_path)
        taskd = start(notify, notify_path)
        if isinstance(taskd, int):
            print(f"make run: taskd stopped with exit status {taskd}; its message is above",
                  file=sys.stderr)  # fmt: skip
            return taskd
        threading.Thread(target=drain, args=(notify,), daemon=True).start()
        signal.signal(signal.SIGTERM, lambda *_: taskd.terminate())
        for command in (["list"], ["run", "jobs:send-email", "--payload", EMAIL]):
            print(f"$ taskctl {shlex.join(command)}", flush=True)
            subprocess.run([BIN / "taskctl", "--socket", SOCKET, *command])
            print()
        print(f"taskd is running (pid {taskd.pid}). In another shell:")
        print(f"  export TASKD_SOCKET={SOCKET} PATH={BIN}:$PATH")
        print("  taskctl status")
        print("Ctrl-C stops it.", flush=True)
        return taskd.wait()


if __name__ == "__main__":
    sys.exit(main())
