"""taskd as a systemd service: sd_notify, the watchdog, reload, socket activation.

Every test runs the real daemon and receives its sd_notify datagrams on a socket of its own,
as systemd would.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from taskctl import enqueue_params
from tests.support import SOCKET_ACTIVATE, TASKCTL, Taskd, wait_until

ECHO = """
from taskd import define_task

@define_task(description="Return the payload")
async def echo(payload):
    return payload
"""

SLOW = """
import asyncio
from taskd import define_task

@define_task(description="Sleep, then return the payload")
async def slow(payload: dict) -> dict:
    if "started" in payload:
        open(payload["started"], "w").close()
    await asyncio.sleep(payload.get("seconds", 0.5))
    return payload
"""

HOG = """
import time
from taskd import define_task

@define_task(description="Blocks the event loop: what a misbehaving task does")
async def hog(seconds: float) -> None:
    time.sleep(seconds)
"""

ENVIRONMENT = """
import os
from taskd import define_task

@define_task(description="The systemd variables a task can see")
def environment() -> dict:
    names = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC",
             "WATCHDOG_PID")
    return {name: os.environ[name] for name in names if name in os.environ}
"""

BROKEN = "from taskd import define_task\n\n@define_task\nasync def broken(:\n    pass\n"


def tasks_folder(root: Path, **files: str) -> Path:
    folder = root / "tasks"
    folder.mkdir(exist_ok=True)
    for name, source in files.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return folder


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n") if "=" in line)


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_times(daemon: Taskd) -> list[float]:
    """When each WATCHDOG=1 so far arrived."""
    pairs = zip(daemon.received_at, daemon.notifications, strict=True)
    return [at for at, message in pairs if "WATCHDOG=1" in message.split("\n")]


def test_start_reload_and_stop_are_reported(
    taskd_factory: type[Taskd], short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tasks_folder(short_tmp, echo=ECHO)
    daemon = taskd_factory(tasks=tasks).start()
    assert daemon.process is not None
    ready = fields(daemon.notifications[-1])
    assert ready["READY"] == "1" and ready["MAINPID"] == str(daemon.process.pid)
    assert ready["STATUS"] == "0 running, 0 queued, 1 task loaded"

    (tasks / "slow.py").write_text(SLOW)
    before = monotonic_usec()
    daemon.process.send_signal(signal.SIGHUP)
    reloading = fields(daemon.wait_for_notification("RELOADING=1"))
    after = monotonic_usec()
    # MONOTONIC_USEC is CLOCK_MONOTONIC when the reload began: systemd matches it to the signal.
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    assert fields(daemon.wait_for_notification("READY=1"))["STATUS"].endswith("2 tasks loaded")
    assert "slow" in daemon.ctl("list").stdout

    assert daemon.stop() == 0
    assert fields(daemon.notifications[-1]) == {"STOPPING": "1", "STATUS": "stopping"}
    with capsys.disabled():  # the transcript the issue asks for, in the test output
        print("\nsd_notify transcript of a start, reload and stop:")
        for message in daemon.notifications:
            print("   ", message.replace("\n", " | "))


def test_status_follows_the_jobs_and_is_rate_limited(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    tasks = tasks_folder(short_tmp, echo=ECHO, slow=SLOW)
    daemon = taskd_factory(tasks=tasks).start()
    started = short_tmp / "started"
    payload = json.dumps({"seconds": 2.0, "started": str(started)})
    assert daemon.ctl("run", "slow", "--detach", "--payload", payload).returncode == 0
    daemon.wait_for_notification("STATUS=1 running, 0 queued, 2 tasks loaded")
    daemon.wait_for_notification("STATUS=0 running, 0 queued, 2 tasks loaded")

    # 320 jobs of 100 ms on 16 workers change the summary 640 times in two seconds (or more
    # on a loaded machine); the daemon tells systemd at most once a second.
    first = len(daemon.notifications)
    with daemon.client() as client:
        client.enqueue_many([enqueue_params("slow", {"seconds": 0.1}) for _ in range(320)])
    daemon.wait_for_notification("STATUS=0 running, 0 queued, 2 tasks loaded", timeout=60)
    window = zip(daemon.received_at[first:], daemon.notifications[first:], strict=True)
    updates = [(at, message) for at, message in window if message.startswith("STATUS=")]
    assert len(updates) >= 2, updates
    assert all(later[0] - earlier[0] > 0.9 for earlier, later in itertools.pairwise(updates))
    assert any("16 running" in message for _, message in updates), updates
    # Idle: nothing wakes up, nothing is sent.
    assert daemon.collect_notifications(1.2) == []


def test_broken_reload_keeps_the_running_configuration(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    tasks = tasks_folder(short_tmp, echo=ECHO)
    daemon = taskd_factory(tasks=tasks).start()
    assert daemon.process is not None
    (tasks / "broken.py").write_text(BROKEN)
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for_notification("RELOADING=1")
    daemon.wait_for_notification("READY=1")  # systemd must hear READY=1 whatever the outcome
    wait_until(lambda: "reload failed" in daemon.log, what="the failed reload in the log")
    assert f"{tasks / 'broken.py'}" in daemon.log and "SyntaxError" in daemon.log
    assert daemon.ctl("run", "echo", "--payload", '"still"').stdout.strip() == '"still"'

    refused = daemon.ctl("reload")
    assert refused.returncode == 78
    assert "running configuration stays" in refused.stderr and "broken.py" in refused.stderr
    (tasks / "broken.py").unlink()
    (tasks / "slow.py").write_text(SLOW)
    reloaded = daemon.ctl("reload")
    assert reloaded.returncode == 0 and "reloaded: 2 tasks" in reloaded.stdout
    assert daemon.running


def test_a_job_running_across_a_reload_finishes(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    tasks = tasks_folder(short_tmp, echo=ECHO, slow=SLOW)
    daemon = taskd_factory(tasks=tasks).start()
    started = short_tmp / "started"
    payload = json.dumps({"seconds": 1.5, "started": str(started)})
    command = [TASKCTL or sys.executable, "--socket", str(daemon.socket), "--json", "run", "slow",
               "--payload", payload]  # fmt: skip
    if TASKCTL is None:
        command[1:1] = ["-m", "taskctl"]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(started.exists, what="the slow job to start")
    (tasks / "slow.py").unlink()  # the running job's task is gone from the new configuration
    assert daemon.ctl("reload").returncode == 0
    assert "slow" not in daemon.ctl("list").stdout
    out, err = runner.communicate(timeout=30)
    assert runner.returncode == 0, err
    job = json.loads(out)
    assert job["status"] == "succeeded" and job["attempts"] == 1 and job["result"]["seconds"] == 1.5


def test_watchdog_is_pinged_at_half_its_interval(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory().start(env={"WATCHDOG_USEC": "400000"})
    daemon.wait_for_notification("WATCHDOG=1")
    daemon.collect_notifications(0.05)  # read what waited in the socket: arrival times from now
    first = len(watchdog_times(daemon))
    for _ in range(8):
        daemon.wait_for_notification("WATCHDOG=1")
    pings = watchdog_times(daemon)[first:]
    gaps = sorted(later - earlier for earlier, later in itertools.pairwise(pings))
    # Every 0.2 s: never sooner; later only by the delays of a loaded machine, which a
    # few pings may meet but not the typical one.
    assert gaps[0] > 0.15 and gaps[len(gaps) // 2] < 0.35, gaps


def test_watchdog_meant_for_another_process_is_left_alone(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory().start(env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    daemon.collect_notifications(0.8)
    assert watchdog_times(daemon) == []


def test_a_blocked_event_loop_stops_the_watchdog_pings(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    daemon = taskd_factory(tasks=tasks_folder(short_tmp, hog=HOG)).start(
        env={"WATCHDOG_USEC": "200000"}
    )
    daemon.wait_for_notification("WATCHDOG=1")
    with daemon.client() as client:
        client.enqueue("hog", 1.0)

    def gaps() -> list[float]:
        pings = watchdog_times(daemon)
        return [later - earlier for earlier, later in itertools.pairwise(pings)]

    deadline = time.monotonic() + 60
    while not any(gap >= 0.9 for gap in gaps()):  # systemd would have seen the daemon hang
        assert time.monotonic() < deadline, gaps()
        daemon.wait_for_notification("WATCHDOG=1")
    for _ in range(3):  # and the pings resume, every 0.1 s (short of a hang on a loaded machine)
        daemon.wait_for_notification("WATCHDOG=1")
    assert all(gap < 0.9 for gap in gaps()[-2:]), gaps()


def test_abstract_notify_socket(taskd_factory: type[Taskd]) -> None:
    daemon = taskd_factory(abstract_notify=True).start()
    assert "READY=1" in daemon.notifications[-1].split("\n")
    assert daemon.stop() == 0
    assert "STOPPING=1" in daemon.notifications[-1].split("\n")


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed")
def test_socket_activation(taskd_factory: type[Taskd], short_tmp: Path) -> None:
    tasks = tasks_folder(short_tmp, echo=ECHO, environment=ENVIRONMENT)
    daemon = taskd_factory(tasks=tasks, activation=True)
    daemon.start(env={"WATCHDOG_USEC": "10000000"})
    assert daemon.socket.exists() and not daemon.notifications  # taskd is not running yet
    # The first call starts taskd; it waits in the socket's queue until taskd serves it.
    first = subprocess.Popen(
        [sys.executable, "-m", "taskctl", "--socket", str(daemon.socket), "list"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    daemon.wait_for_notification("READY=1")
    out, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    assert "echo" in out and "environment" in out
    assert "serving the socket systemd passed in" in daemon.log
    assert "replacing stale socket" not in daemon.log
    # The variables systemd passed were for taskd alone: its tasks do not see them.
    assert json.loads(daemon.ctl("run", "environment").stdout) == {}
    daemon.wait_for_notification("WATCHDOG=1")

    assert daemon.stop() == 0
    assert "STOPPING=1" in daemon.notifications[-1].split("\n")
    assert daemon.socket.exists()  # the socket belongs to systemd: taskd leaves it alone
    assert not Path(f"{daemon.socket}.lock").exists()
