"""Who may use the control socket: file modes, peer credentials, read-only access.

The other user is `nobody`: the tests run taskctl as nobody with setpriv, so they need root.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import Taskd, wait_until

NOGROUP = grp.getgrgid(65534).gr_name if os.path.exists("/etc/group") else "nogroup"
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to run taskctl as nobody")


def as_nobody(
    daemon: Taskd, *args: str, groups: str | None = None
) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Run the real taskctl as nobody: (its pid, its outcome).

    Without `groups` its only group is the primary one (nogroup); with it, the primary group
    is `daemon` and `groups` are its supplementary groups.
    """
    who = ["--regid=nogroup", "--clear-groups"] if groups is None else [
        "--regid=daemon", f"--groups={groups}"
    ]  # fmt: skip
    command = ["setpriv", "--reuid=nobody", *who, sys.executable, "-m", "taskctl",
               "--socket", str(daemon.socket), *args]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"
    )
    out, err = process.communicate(timeout=60)
    return process.pid, subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.fixture
def shared_daemon(taskd_factory: type[Taskd], short_tmp: Path) -> Taskd:
    """A taskd whose socket nobody can reach (0660 root:nogroup in a 0750 root:nogroup
    folder) but which lets nobody in only as taskd.toml says."""
    short_tmp.chmod(0o755)
    return taskd_factory(
        config=f'socket_group = "{NOGROUP}"\n', socket_path=short_tmp / "run" / "taskd.sock"
    )


def test_socket_with_a_group_is_0660_in_a_folder_of_that_group(shared_daemon: Taskd) -> None:
    shared_daemon.start()
    gid = grp.getgrnam(NOGROUP).gr_gid
    info = shared_daemon.socket.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == gid
    folder = shared_daemon.socket.parent.stat()
    assert stat.S_IMODE(folder.st_mode) == 0o750 and folder.st_gid == gid


def test_a_folder_writable_by_everyone_is_refused(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    open_folder = short_tmp / "open"
    open_folder.mkdir()
    open_folder.chmod(0o1777)  # like /tmp: anyone could put a socket of their own there
    daemon = taskd_factory(socket_path=open_folder / "taskd.sock")
    with pytest.raises(AssertionError, match="exited with 1"):
        daemon.start()
    assert f"the socket's folder {open_folder} is writable by every user" in daemon.log
    assert not (open_folder / "taskd.sock").exists()


def test_a_folder_writable_by_its_group_is_refused_unless_sticky(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    shared = short_tmp / "shared"
    shared.mkdir()
    os.chown(shared, -1, grp.getgrnam(NOGROUP).gr_gid)
    shared.chmod(0o770)  # a member of the group could swap the socket for their own
    daemon = taskd_factory(socket_path=shared / "taskd.sock")
    with pytest.raises(AssertionError, match="exited with 1"):
        daemon.start()
    assert (
        f"the socket's folder {shared} is writable by its group, gid 65534 ({NOGROUP}), so a "
        "member of that group could replace the socket" in daemon.log
    )
    assert f"chmod g-w {shared}" in daemon.log and f"chmod +t {shared}" in daemon.log
    assert "Traceback" not in daemon.log
    assert not (shared / "taskd.sock").exists()
    # With the sticky bit, only the socket's owner may remove or rename it.
    shared.chmod(0o1770)
    daemon.start()
    assert daemon.ctl("list").returncode == 0
    assert daemon.stop() == 0


@needs_root
def test_a_folder_owned_by_another_user_is_refused(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    theirs = short_tmp / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, pwd.getpwnam("nobody").pw_uid, -1)  # they could swap our socket
    daemon = taskd_factory(socket_path=theirs / "taskd.sock")
    with pytest.raises(AssertionError, match="exited with 1"):
        daemon.start()
    assert f"the socket's folder {theirs} belongs to uid" in daemon.log


@needs_root
def test_only_allowed_users_get_in_and_readonly_users_only_read(shared_daemon: Taskd) -> None:
    shared_daemon.start()
    # Not listed: refused, told how to get access, and the attempt is logged.
    pid, refused = as_nobody(shared_daemon, "list")
    assert refused.returncode == 77, refused.stderr
    assert "uid 65534 (nobody) may not use this taskd" in refused.stderr
    assert "allow_users" in refused.stderr and "allow_groups" in refused.stderr
    logged = f"refused control connection from uid 65534 (nobody), pid {pid}: not allowed"
    # The daemon's log is written by a thread of its own, maybe after the reply went out.
    wait_until(lambda: logged in shared_daemon.log, what="the refusal in the log")
    assert shared_daemon.ctl("list").returncode == 0  # root still gets in

    # Read-only through its group: it may look, but not change anything.
    shared_daemon.config_file.write_text(
        f'socket_group = "{NOGROUP}"\nreadonly_groups = ["{NOGROUP}"]\n'
    )
    assert shared_daemon.ctl("reload").returncode == 0
    job_id = shared_daemon.ctl("enqueue", "echo", "--delay", "1h").stdout.strip()
    for command in (["list"], ["jobs"], ["status"], ["job", job_id]):
        _, allowed = as_nobody(shared_daemon, *command)
        assert allowed.returncode == 0, (command, allowed.stderr)
    for command in (["run", "echo"], ["enqueue", "echo"], ["cancel", job_id], ["reload"]):
        _, denied = as_nobody(shared_daemon, *command)
        assert denied.returncode == 77, (command, denied.stderr)
        assert "read-only access" in denied.stderr and "allow_groups" in denied.stderr
    assert shared_daemon.ctl("--json", "job", job_id).stdout.count('"pending"') == 1

    # Full access through a supplementary group (its primary group is `daemon`).
    shared_daemon.config_file.write_text(
        f'socket_group = "{NOGROUP}"\nallow_groups = ["{NOGROUP}"]\n'
    )
    assert shared_daemon.ctl("reload").returncode == 0
    _, ran = as_nobody(shared_daemon, "run", "echo", "--payload", '"hi"', groups=NOGROUP)
    assert ran.returncode == 0 and ran.stdout.strip() == '"hi"', ran.stderr
    _, outsider = as_nobody(shared_daemon, "run", "echo")  # nogroup as primary group: also in
    assert outsider.returncode == 0, outsider.stderr


@needs_root
def test_allowed_user_by_name(taskd_factory: type[Taskd], short_tmp: Path) -> None:
    short_tmp.chmod(0o755)
    daemon = taskd_factory(
        config=f'socket_group = "{NOGROUP}"\nallow_users = ["{pwd.getpwuid(65534).pw_name}"]\n',
        socket_path=short_tmp / "run" / "taskd.sock",
    ).start()
    _, ran = as_nobody(daemon, "run", "echo", "--payload", "1")
    assert ran.returncode == 0 and ran.stdout.strip() == "1", ran.stderr


@needs_root
def test_a_refused_client_that_talks_first_still_reads_why(shared_daemon: Taskd) -> None:
    shared_daemon.start()
    script = (
        "import json; from pathlib import Path; from tests.support import hello_after_refusal;"
        f" print(json.dumps(hello_after_refusal(Path({str(shared_daemon.socket)!r}))))"
    )
    command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
               sys.executable, "-c", script]  # fmt: skip
    root = Path(__file__).parent.parent.parent
    result = subprocess.run(
        command, capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHONPATH": root}
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["id"] is None and reply["error"]["code"] == "permission_denied", reply
