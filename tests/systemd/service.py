"""taskd inside the container, installed as the README's "systemd" section says: by ada,
an administrator with sudo, who runs its commands as written."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from tests.systemd import container as machine
from tests.systemd.container import Container

README = (machine.ROOT / "README.md").read_text()
# The README's placeholders, and what stands in for them inside the container. The package
# index is not reachable from inside: pip installs the wheels built on the host.
PLACEHOLDERS = {
    "/path/to/taskd": "--no-index --find-links=/wheels taskd",
    "my-tasks/": "tests/systemd/tasks/",
}
ADMIN = "ada"  # a member of taskctl, and a sudoer
OTHER = "bob"  # neither
SOCKET = "/run/taskd/taskd.sock"


def payload(value: Any) -> str:
    """`--payload` and the value as JSON, quoted for the shell."""
    return f"--payload {shlex.quote(json.dumps(value))}"


def readme_commands(heading: str, block: int = 0) -> str:
    """A `sh` block under the README's `### heading`, placeholders filled in."""
    section = re.split(r"\n##+ ", README[README.index(f"\n### {heading}\n") + 1 :])[0]
    script = re.findall(r"^```sh\n(.*?)^```$", section, flags=re.S | re.M)[block]
    for placeholder, value in PLACEHOLDERS.items():
        script = script.replace(placeholder, value)
    # `journalctl -f` follows until interrupted: print what is there instead.
    return re.sub(r"^((?:sudo )?journalctl .*) -f\b", r"\1 --no-pager", script, flags=re.M)


class Gate:
    """The FIFOs through which tests/systemd/tasks/gate.py says it started and waits."""

    def __init__(self, container: Container) -> None:
        self.container = container
        container.run(
            "install -d -m 0755 /srv/gate && mkfifo -m 0622 /srv/gate/started "
            "&& mkfifo -m 0644 /srv/gate/release"
        )

    def started(self, timeout: float = 60.0) -> int:
        """Wait for a gate job to start; return its id."""
        return int(self.container.run("cat /srv/gate/started", timeout=timeout).stdout)

    def release(self, timeout: float = 60.0) -> None:
        """Let the gate job that waits go (waits for one to wait)."""
        self.container.run("echo go > /srv/gate/release", timeout=timeout)


class Taskd:
    """The system service inside the container, seen through taskctl and systemctl."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self.gate = Gate(container)

    def ctl(self, arguments: str, *, user: str = ADMIN, check: bool = True) -> Any:
        """`taskctl --json ARGUMENTS` as `user`: its decoded output."""
        done = self.container.run(f"taskctl --json {arguments}", user=user, check=check)
        return json.loads(done.stdout) if done.stdout.strip() else None

    def enqueue(self, arguments: str) -> int:
        return int(self.ctl(f"enqueue {arguments}")["job_id"])

    def job(self, job_id: int) -> dict[str, Any]:
        job: dict[str, Any] = self.ctl(f"job {job_id}")
        return job

    def show(self, prop: str) -> str:
        return self.container.show("taskd.service", prop)

    def waiting_connections(self) -> int:
        """Connections in the socket's queue that no taskd has accepted yet: the lines of
        /proc/net/unix for its path in state 02, "connecting" (see proc(5))."""
        table = self.container.run("cat /proc/net/unix").stdout.splitlines()
        return sum(1 for line in table if line.endswith(f" {SOCKET}") and line.split()[5] == "02")


def install(container: Container) -> Taskd:
    """Ada follows the README's "A system service", commands as written."""
    container.run(
        'echo "127.0.1.1 $(hostname)" >> /etc/hosts\n'  # sudo looks the host name up
        f"useradd --create-home --shell /bin/bash {ADMIN}\n"
        f"useradd --create-home --shell /bin/bash {OTHER}\n"
        f"echo '{ADMIN} ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/{ADMIN}\n"
    )
    container.run(readme_commands("A system service"), user=ADMIN, cwd="/src", timeout=180)
    return Taskd(container)
