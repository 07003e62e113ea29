"""The units in contrib/systemd under a real systemd as PID 1: `make test-systemd`.

A minimal Debian boots in a container (container.py) and taskd is installed in it as the
README says (service.py); these tests drive it with systemctl, journalctl and taskctl.
They share that machine and run in this order; each leaves taskd.service running.
"""

from __future__ import annotations

import errno
import json
import re

import pytest

from taskctl.cli import Exit
from tests.support import wait_until
from tests.systemd.service import ADMIN, OTHER, SOCKET, Taskd, payload, readme_commands

pytestmark = pytest.mark.nspawn

STATUS_LINE = re.compile(r"\d+ running, \d+ queued, \d+ tasks? loaded")
ADDED = """\
from taskd import define_task


@define_task(description="A task added while taskd runs")
def added() -> str:
    return "added"
"""
BROKEN = "from taskd import define_task\n\n@define_task\ndef broken(:\n    pass\n"


def test_the_first_call_starts_taskd_through_its_socket(taskd: Taskd) -> None:
    container = taskd.container
    # The service's Also=taskd.socket disables (and --now stops) the socket with it.
    container.run("systemctl disable --now taskd.service && systemctl enable --now taskd.socket")
    assert container.run("systemctl is-enabled taskd.socket").stdout.strip() == "enabled"
    assert taskd.show("ActiveState") == "inactive"

    names = {task["name"] for task in taskd.ctl("list")}
    assert {"echo", "gate", "leave-behind", "write"} <= names
    assert taskd.show("ActiveState") == "active"
    assert STATUS_LINE.fullmatch(taskd.show("StatusText"))
    container.run("systemctl enable taskd.service")  # as the README leaves it


def test_the_readme_commands_for_group_members_run_as_written(taskd: Taskd) -> None:
    done = taskd.container.run(readme_commands("A system service", block=1), user=ADMIN)
    assert STATUS_LINE.search(done.stdout), done.stdout  # systemctl status
    assert f"ready (pid {taskd.show('MainPID')})" in done.stdout, done.stdout  # the journal
    assert not done.stderr, done.stderr


def test_group_members_may_call_taskd_and_others_may_not(taskd: Taskd) -> None:
    socket = taskd.container.run(f"stat -c '%U %G %a' {SOCKET}").stdout.split()
    assert socket == ["taskd", "taskctl", "660"]
    assert taskd.ctl(f"run echo {payload({'from': 'ada'})}")["result"] == {"from": "ada"}

    refused = taskd.container.run("taskctl list", user=OTHER, check=False)
    assert refused.returncode == Exit.PERMISSION, refused.stderr
    assert SOCKET in refused.stderr


def test_restart_keeps_the_queue_and_callers_wait_in_the_socket(taskd: Taskd) -> None:
    container = taskd.container
    later = taskd.enqueue("echo --delay 1h")
    running = taskd.enqueue("gate")
    assert taskd.gate.started() == running
    before = int(taskd.show("MainPID"))

    restart = container.start("systemctl restart taskd")
    wait_until(lambda: taskd.show("StatusText") == "stopping", what="taskd to begin stopping")
    # taskd has closed its copy of the socket and waits for the gate job: a call made now
    # waits in the socket's queue (systemd keeps the socket open) for the next taskd.
    call = container.start("taskctl --json status", user=ADMIN)
    wait_until(taskd.waiting_connections, what="the call to wait in the socket's queue")
    assert taskd.show("MainPID") == str(before)
    taskd.gate.release()

    answer, error = call.communicate(timeout=60)
    assert call.returncode == 0, error
    assert restart.communicate(timeout=60) and restart.returncode == 0
    after = int(taskd.show("MainPID"))
    assert json.loads(answer)["pid"] == after != before
    assert taskd.job(running)["status"] == "succeeded"
    assert taskd.job(later)["status"] == "pending"


def test_reload_loads_new_tasks_and_refuses_broken_ones(taskd: Taskd) -> None:
    container = taskd.container
    container.run(f"cat > /etc/taskd/tasks/added.py <<'EOF'\n{ADDED}EOF")
    container.run("systemctl reload taskd")
    assert taskd.ctl("run added")["result"] == "added"

    serving = taskd.show("MainPID")
    container.run(f"cat > /etc/taskd/tasks/broken.py <<'EOF'\n{BROKEN}EOF")
    refused = container.run("systemctl reload taskd", check=False)
    assert refused.returncode != 0, "systemctl reload succeeded with a broken task file"
    errors = container.run("journalctl -u taskd.service -p err -o cat --no-pager").stdout
    assert "/etc/taskd/tasks/broken.py" in errors
    assert taskd.show("ActiveState") == "active" and taskd.show("MainPID") == serving
    assert "broken" not in {task["name"] for task in taskd.ctl("list")}
    assert taskd.ctl("run added")["result"] == "added"

    container.run("rm /etc/taskd/tasks/broken.py && systemctl reload taskd")


def test_the_watchdog_restarts_a_frozen_taskd_and_its_job_runs_again(taskd: Taskd) -> None:
    container = taskd.container
    held = taskd.enqueue("gate")
    assert taskd.gate.started() == held
    frozen, restarts = int(taskd.show("MainPID")), int(taskd.show("NRestarts"))
    verdicts = "journalctl UNIT=taskd.service UNIT_RESULT=watchdog -o cat --no-pager"
    watchdog_kills = len(container.run(verdicts).stdout.splitlines())

    container.run("systemctl kill -s SIGSTOP --kill-whom=main taskd")
    # WatchdogSec=30s: taskd's last ping was at most 15 s before it froze.
    wait_until(
        lambda: int(taskd.show("NRestarts")) > restarts,
        timeout=60,
        what="the watchdog to restart taskd",
    )
    assert len(container.run(verdicts).stdout.splitlines()) == watchdog_kills + 1

    assert taskd.gate.started() == held  # the new taskd took the job back and runs it
    taskd.gate.release()
    container.run(f"taskctl wait {held}", user=ADMIN)
    result = taskd.job(held)["result"]
    assert result["pid"] == int(taskd.show("MainPID")) != frozen


def test_stop_lets_the_running_job_finish_and_ends_what_tasks_left_behind(taskd: Taskd) -> None:
    container = taskd.container
    left = taskd.ctl("run leave-behind")["result"]
    assert container.run(f"cat /proc/{left}/comm").stdout.strip() == "sleep"
    running = taskd.enqueue("gate")
    assert taskd.gate.started() == running

    stop = container.start("systemctl stop taskd")
    wait_until(lambda: taskd.show("StatusText") == "stopping", what="taskd to begin stopping")
    taskd.gate.release()
    assert stop.communicate(timeout=60) and stop.returncode == 0
    assert taskd.show("ActiveState") == "inactive"
    assert taskd.show("Result") == "success"
    assert taskd.show("ExecMainStatus") == "0"
    # KillMode=mixed: what is left in the unit's cgroup once taskd has exited gets SIGKILL.
    wait_until(
        lambda: container.run(f"test -e /proc/{left}", check=False).returncode != 0,
        timeout=10,
        what=f"the process {left} left behind by a task to be gone",
    )

    assert taskd.job(running)["status"] == "succeeded"  # the call starts taskd again
    assert taskd.show("ActiveState") == "active"


def test_the_sandbox(taskd: Taskd) -> None:
    container = taskd.container
    security = container.run("systemd-analyze security --no-pager taskd.service").stdout
    exposure = container.run("systemd-analyze security --threshold=20 taskd.service", check=False)
    assert exposure.returncode == 0, security.splitlines()[-1]
    state = container.run("stat -c '%a %U' /var/lib/taskd").stdout.split()
    assert state == ["700", "taskd"]

    refused = taskd.ctl(f"run write {payload({'path': '/srv/written'})}", check=False)
    assert refused["status"] == "failed"
    assert f"[Errno {errno.EROFS}]" in refused["error"], refused["error"]
    assert container.run("test -e /srv/written", check=False).returncode != 0

    # What the README says to do for a folder tasks write to (`systemctl edit taskd`).
    container.run(
        "install -d -o taskd -g taskd /srv/reports\n"
        "install -d /etc/systemd/system/taskd.service.d\n"
        "printf '[Service]\\nReadWritePaths=/srv/reports\\n' "
        "> /etc/systemd/system/taskd.service.d/reports.conf\n"
        "systemctl daemon-reload && systemctl restart taskd"
    )
    written = taskd.ctl(f"run write {payload({'path': '/srv/reports/r.txt'})}")
    assert written["status"] == "succeeded", written["error"]
    assert container.run("stat -c %U /srv/reports/r.txt").stdout.strip() == "taskd"


def test_the_per_user_units_run_under_a_user_manager(taskd: Taskd) -> None:
    container = taskd.container
    uid = container.run(f"id -u {ADMIN}").stdout.strip()
    container.run(f"systemctl start user@{uid}.service")  # what logging in does
    container.run(readme_commands("A per-user service"), user=ADMIN, cwd="/src", timeout=180)
    assert container.run(f"loginctl show-user {ADMIN} -P Linger").stdout.strip() == "yes"

    def user(command: str) -> str:
        return container.run(command, user=ADMIN).stdout.strip()

    taskctl = "~/.local/share/taskd/venv/bin/taskctl --json"
    user("systemctl --user stop taskd.service")
    status = json.loads(user(f"{taskctl} status"))  # started through the user's socket
    assert status["socket"] == f"/run/user/{uid}/taskd/taskd.sock"
    assert status["database"] == f"sqlite:/home/{ADMIN}/.local/state/taskd/taskd.db"
    assert user("systemctl --user show -P MainPID taskd") == str(status["pid"])
    assert STATUS_LINE.fullmatch(user("systemctl --user show -P StatusText taskd"))
    user("systemctl --user reload taskd")
    assert json.loads(user(f"{taskctl} run echo"))["status"] == "succeeded"
