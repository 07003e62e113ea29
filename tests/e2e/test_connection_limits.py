"""What one peer, or one user, can take from the daemon: memory for replies it does not read,
connections, time. Each limit holds against real processes, and everyone else is served."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from taskctl import AsyncClient, Client, enqueue_params
from tests.e2e.test_access import NOGROUP, needs_root
from tests.support import RawConnection, Taskd, wait_until

MIB = 1024 * 1024
RSS_BOUND = 256 * MIB
JOBS = 10_000
FRAMES = 200  # `jobs` requests each attacker pipelines (more than the 128 it may have in flight)


def status(daemon: Taskd) -> dict[str, Any]:
    shown = daemon.ctl("--json", "status")
    assert shown.returncode == 0, shown.stderr
    result: dict[str, Any] = json.loads(shown.stdout)
    return result


def peak_rss(pid: int) -> int:
    """The most resident memory the process has had (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def limit_address_space() -> None:
    """Runs in the daemon's process before exec: should the bound break, fail there at 4 GiB
    rather than take the machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


# About 2.4 GB of replies cross the socket once the peers read: 70-90 s on a loaded 2-core
# machine, more beside another test run.
@pytest.mark.timeout(600)
def test_peers_that_read_no_replies_cannot_grow_the_daemon(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(log_level="info").start(preexec_fn=limit_address_space)
    assert daemon.process is not None
    pad = "x" * 1000
    with daemon.client() as client:
        for start in range(0, JOBS, 1000):
            batch = [
                enqueue_params("echo", {"n": n, "pad": pad}, delay="1h")
                for n in range(start, start + 1000)
            ]
            client.enqueue_many(batch)
    before = peak_rss(daemon.process.pid)
    attackers = [RawConnection(daemon.socket) for _ in range(3)]
    try:
        for attacker in attackers:  # ~12 MB of reply each, and none of them read
            attacker.sock.sendall(
                b"".join(attacker.request("jobs", {"limit": JOBS}) for _ in range(FRAMES))
            )

        served = []

        def paused() -> int:
            listed = daemon.ctl("list", timeout=30)  # others are served during the attack
            served.append(listed.returncode == 0)
            assert listed.returncode == 0, listed.stderr
            return int(status(daemon)["connections"]["paused"])

        wait_until(lambda: paused() == 3, timeout=120, what="taskd to pause the three peers")
        for _ in range(5):  # they stay paused, with their replies unread
            assert paused() == 3
        connections = status(daemon)["connections"]
        assert connections["paused"] == 3
        peak = peak_rss(daemon.process.pid)
        print(
            f"peak RSS {peak / MIB:.1f} MiB ({before / MIB:.1f} MiB before the attack) with 3 "
            f"peers not reading {FRAMES} `jobs` replies of ~12 MB each; {len(served)} "
            f"`taskctl list` served meanwhile; {connections['unsent_bytes'] / MIB:.1f} MiB unsent"
        )
        assert peak < RSS_BOUND, f"peak RSS {peak / MIB:.0f} MiB"
        assert "pausing requests from pid" in daemon.log
        assert "its replies are not being read" in daemon.log

        # Every request is answered once its peer reads: results, or `busy` past 128 in flight.
        first = attackers[0]
        replies = [first.reply() for _ in range(FRAMES)]
        results = [reply for reply in replies if "result" in reply]
        assert all(len(reply["result"]) == JOBS for reply in results)
        busy = [reply["error"]["code"] for reply in replies if "error" in reply]
        assert set(busy) <= {"busy"} and len(results) >= 128
        assert sorted(reply["id"] for reply in replies) == list(range(2, FRAMES + 2))
    finally:
        for attacker in attackers:
            attacker.sock.close()
    assert peak_rss(daemon.process.pid) < RSS_BOUND


def test_a_peer_that_reads_nothing_for_idle_timeout_is_cut_off(
    taskd_factory: type[Taskd],
) -> None:
    daemon = taskd_factory(config='idle_timeout = "1s"\n', log_level="info").start()
    with daemon.client() as client:
        client.enqueue_many(
            [enqueue_params("echo", {"pad": "x" * 1000}, delay="1h") for _ in range(3000)]
        )
    with RawConnection(daemon.socket) as attacker:
        attacker.sock.sendall(b"".join(attacker.request("jobs", {"limit": 3000}) for _ in range(5)))
        wait_until(lambda: "not caught up with its replies within 1s (idle_timeout)" in daemon.log)
        assert attacker.closed_by_taskd()
    assert status(daemon)["connections"]["closed_unread"] == 1


def test_idle_connections_are_closed_and_clients_reconnect(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(config='idle_timeout = "1s"\n', log_level="info").start()
    with daemon.client() as client:
        assert client.list_tasks()
        # A request in flight keeps a connection open past idle_timeout.
        job_id = client.enqueue("echo", 1, delay="1h").job_id
        with RawConnection(daemon.socket) as waiting:
            reply = waiting.call("wait", {"id": job_id, "timeout": 2.5})
            assert reply["error"]["code"] == "timeout"
            wait_until(lambda: "idle for 1s with no request in flight" in daemon.log)
            assert waiting.closed_by_taskd()
        # The client's own connection was closed too; its next call opens a new one.
        assert client.job(job_id).status == "pending"

    async def asynchronous() -> None:
        async with AsyncClient(str(daemon.socket), timeout=10) as client:
            closed = daemon.log.count("(idle_timeout)")
            await client.list_tasks()
            await asyncio.to_thread(wait_until, lambda: daemon.log.count("(idle_timeout)") > closed)
            assert (await client.job(job_id)).status == "pending"

    asyncio.run(asynchronous())
    assert status(daemon)["connections"]["closed_idle"] >= 3


def test_a_request_crossing_an_idle_close_is_answered_or_was_never_applied(
    taskd_factory: type[Taskd],
) -> None:
    """taskd closes a connection as idle only when it has read nothing of a next request: a
    request sent as it closes is either read (then answered, the close put off) or not read
    at all (no reply: it was not applied, and may be sent again)."""
    daemon = taskd_factory(config='idle_timeout = "0.2s"\n', log_level="info").start()
    answered, unanswered = set(), set()

    def enqueue(connection: RawConnection, key: str) -> None:
        params = {"task": "echo", "key": key, "delay": 3600.0}
        try:
            connection.sock.sendall(connection.request("enqueue", params))
            reply = connection.reply()
        except OSError:  # a broken pipe, a reset, or the end of the stream: no reply
            unanswered.add(key)
            return
        assert "result" in reply, reply
        answered.add(key)

    with RawConnection(daemon.socket) as closed:  # certainly closed first
        wait_until(lambda: "idle for 0.2s" in daemon.log, what="the idle connection to close")
        enqueue(closed, "after the close")
    assert unanswered == {"after the close"}
    for attempt in range(20):  # sent ever later, from before the close until after it
        with RawConnection(daemon.socket) as connection:
            time.sleep(0.16 + attempt * 0.004)  # a stimulus around the close, not a wait
            enqueue(connection, f"attempt {attempt}")
    assert daemon.stop() == 0
    assert {job.key for job in daemon.stored_jobs()} == answered
    print(f"{len(answered)} answered and stored, {len(unanswered)} without a reply nor a job")


# -- users ---------------------------------------------------------------------------------

OTHER_UID = 12345  # a user without a name: setpriv can take any uid

# Run as another user: open COUNT connections, say hello on each, print how many were let in
# and how the others were refused, then hold them until stdin closes. With "stall", send one
# byte of the hello instead, and never the rest (slowloris).
HOLDER = """
import json, socket, struct, sys
import msgspec
path, count, stall = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "stall"
body = msgspec.msgpack.encode({"id": 1, "method": "hello", "params": {"protocol": 1}})
frame = struct.pack(">I", len(body)) + body
held, refused = [], {}
for _ in range(count):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    try:
        sock.sendall(frame[:1] if stall else frame)
    except OSError:
        pass  # refused and closed already; the refusal is still there to read
    if stall:
        held.append(sock)
        continue
    header = sock.recv(4, socket.MSG_WAITALL)
    reply = msgspec.msgpack.decode(sock.recv(struct.unpack(">I", header)[0], socket.MSG_WAITALL))
    if "result" in reply:
        held.append(sock)
    else:
        refused[reply["error"]["code"]] = refused.get(reply["error"]["code"], 0) + 1
        sock.close()
print(json.dumps({"held": len(held), "refused": refused}), flush=True)
sys.stdin.read()
"""


def as_user(uid: int | str, *command: str) -> list[str]:
    """A command run as `uid`, in the socket's group (nogroup) only."""
    return ["setpriv", f"--reuid={uid}", "--regid=nogroup", "--clear-groups", *command]


class Holder:
    """A process of another user that holds connections to taskd until closed."""

    def __init__(self, daemon: Taskd, uid: int | str, count: int, *, stall: bool = False):
        command = as_user(uid, sys.executable, "-c", HOLDER, str(daemon.socket), str(count),
                          "stall" if stall else "hello")  # fmt: skip
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the holder failed; taskd's log:\n{daemon.log}"
        self.summary: dict[str, Any] = json.loads(line)

    def close(self) -> None:
        self.process.communicate(timeout=30)  # closes its stdin: it lets go and ends
        assert self.process.returncode == 0


def shared_daemon(taskd_factory: type[Taskd], root: Path, config: str = "") -> Taskd:
    """A daemon whose socket nobody and OTHER_UID can reach, with read-only access."""
    root.chmod(0o755)
    settings = f'socket_group = "{NOGROUP}"\nreadonly_users = ["nobody", {OTHER_UID}]\n{config}'
    socket_path = root / "run" / "taskd.sock"
    return taskd_factory(config=settings, socket_path=socket_path, log_level="info").start()


def taskctl_as(daemon: Taskd, uid: int, *args: str) -> subprocess.CompletedProcess[str]:
    command = as_user(uid, sys.executable, "-m", "taskctl", "--socket", str(daemon.socket), *args)
    return subprocess.run(command, capture_output=True, text=True, cwd="/", timeout=60)


@needs_root
def test_one_user_cannot_shut_out_root_or_other_users(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    daemon = shared_daemon(taskd_factory, short_tmp)
    holder = Holder(daemon, "nobody", 400)
    try:
        # nobody got its share (32 by default); the rest were told `busy`.
        assert holder.summary == {"held": 32, "refused": {"busy": 368}}
        listed = daemon.ctl("list")  # root
        assert listed.returncode == 0, listed.stderr
        other = taskctl_as(daemon, OTHER_UID, "list")  # another user
        assert other.returncode == 0, other.stderr
        connections = status(daemon)["connections"]
        assert connections["per_user"]["65534"] == 32
        assert connections["refused_per_user"] == 368 and connections["refused_busy"] == 0
        assert "refused:   368 over a user's share, 0 over max_connections" in (
            daemon.ctl("status").stdout
        )
        assert daemon.process is not None
        peak = peak_rss(daemon.process.pid)
        print(
            f"peak RSS {peak / MIB:.1f} MiB; root and uid {OTHER_UID} served while nobody held 32"
        )
        assert peak < RSS_BOUND
    finally:
        holder.close()
    assert (
        "refused a control connection from uid 65534 (nobody): it has 32 open, the most one "
        "user may have (max_connections_per_user)" in daemon.log
    )
    assert "more refused since the last such line" not in daemon.log  # one line a minute
    with Client(str(daemon.socket), timeout=10) as client:  # nobody's connections are gone

        def per_user() -> dict[int, int]:
            connections = client.status().connections
            assert connections is not None
            return connections.per_user

        wait_until(lambda: per_user() == {0: 1}, what="nobody's connections to be closed")


@needs_root
def test_slowloris_connections_do_not_shut_out_others(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    daemon = shared_daemon(taskd_factory, short_tmp, 'read_timeout = "60s"\n')
    started = time.monotonic()
    holder = Holder(daemon, "nobody", 100, stall=True)
    try:
        wait_until(
            lambda: status(daemon)["connections"]["refused_per_user"] == 68,
            what="the 68 connections over nobody's share to be refused",
        )
        assert status(daemon)["connections"]["per_user"] == {"0": 1, "65534": 32}
        assert daemon.ctl("list").returncode == 0
        other = taskctl_as(daemon, OTHER_UID, "list")
        assert other.returncode == 0, other.stderr
        assert time.monotonic() - started < 60  # all of it while the stalled frames stay open
    finally:
        holder.close()
