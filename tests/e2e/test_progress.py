"""Progress, job logs and live events, through the real taskd and the real taskctl:
`ctx.progress`, `ctx.logger`, `taskctl job/logs/wait/run/jobs --watch/top`, `subscribe`."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import msgspec

from taskctl import AsyncClient
from taskd.protocol import HEADER, JobEvent
from taskd.server import MAX_SUBSCRIPTIONS
from tests.support import RawConnection, Taskd, wait_until

KIB = 1024
WIDE_TASK = """
from taskd import TaskContext, define_task


@define_task(description="Logs 6,000 bytes, fails with 18,000", max_attempts=1)
async def wide(ctx: TaskContext) -> None:
    ctx.logger.info("é" * 3000)
    raise ValueError("€" * 6000)
"""

ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")
CONTROL = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z@])|\x1b[()][A-Z0-9]|\x1b[=>78]|([\r\n\b])")


class Screen:
    """The text a full-screen program leaves on a terminal of `rows` x `columns`: cursor
    moves and erasures of a vt100/xterm applied, attributes ignored."""

    def __init__(self, rows: int, columns: int) -> None:
        self.rows, self.columns = rows, columns
        self.cells = [[" "] * columns for _ in range(rows)]
        self.row = self.column = 0

    def feed(self, text: str) -> None:
        position = 0
        for match in CONTROL.finditer(text):
            self._put(text[position : match.start()])
            position = match.end()
            if match.group(3):
                self._control(match.group(3))
            elif match.group(2):
                self._csi(match.group(1), match.group(2))
        self._put(text[position:])

    def _put(self, text: str) -> None:
        for char in text:
            if char < " ":
                continue
            if self.column >= self.columns:
                self.row, self.column = min(self.row + 1, self.rows - 1), 0
            self.cells[self.row][self.column] = char
            self.column += 1

    def _control(self, char: str) -> None:
        if char == "\r":
            self.column = 0
        elif char == "\n":
            self.row = min(self.row + 1, self.rows - 1)
        else:
            self.column = max(0, self.column - 1)

    def _csi(self, arguments: str, final: str) -> None:
        if arguments.startswith("?"):
            return
        numbers = [int(n) if n else 0 for n in arguments.split(";")] if arguments else []
        first = numbers[0] if numbers else 0
        if final in "Hf":
            row, column = [*numbers, 1, 1][:2]
            self.row, self.column = max(row, 1) - 1, max(column, 1) - 1
        elif final == "d":
            self.row = max(first, 1) - 1
        elif final == "G":
            self.column = max(first, 1) - 1
        elif final in "ABCD":
            step = max(first, 1)
            moves = {"A": (-step, 0), "B": (step, 0), "C": (0, step), "D": (0, -step)}
            self.row = min(max(self.row + moves[final][0], 0), self.rows - 1)
            self.column = min(max(self.column + moves[final][1], 0), self.columns - 1)
        elif final == "K":
            line = self.cells[self.row]
            start, end = {0: (self.column, self.columns), 1: (0, self.column + 1)}.get(
                first, (0, self.columns)
            )
            line[start:end] = [" "] * (end - start)
        elif final == "J" and first == 2:
            self.cells = [[" "] * self.columns for _ in range(self.rows)]
        elif final == "X":
            count = max(first, 1)
            end = min(self.column + count, self.columns)
            self.cells[self.row][self.column : end] = [" "] * (end - self.column)
        elif final == "b" and self.column > 0:
            self._put(self.cells[self.row][self.column - 1] * max(first, 1))

    def text(self) -> str:
        return "\n".join("".join(line).rstrip() for line in self.cells).rstrip()


class Output:
    """What a process writes to one descriptor, read as it comes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = ""

    def until(self, wanted: str, timeout: float = 20.0, *, screen: Screen | None = None) -> str:
        """Read until `wanted` has appeared (escape codes removed; or on `screen`, fed what
        is read); all read so far."""
        deadline = time.monotonic() + timeout
        fed = len(self.text)

        def shown() -> bool:
            nonlocal fed
            if screen is None:
                return wanted in ESCAPES.sub("", self.text) or wanted in self.text
            screen.feed(self.text[fed:])
            fed = len(self.text)
            return wanted in screen.text()

        while not shown():
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self.fd], [], [], max(0.0, left))
            if not readable:
                raise AssertionError(f"{wanted!r} did not appear; got {self.text!r}")
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # the pty's other end is closed
                chunk = b""
            if not chunk:
                raise AssertionError(f"{wanted!r} did not appear before the end: {self.text!r}")
            self.text += chunk.decode(errors="replace")
        return self.text


@contextmanager
def gated_job(taskd: Taskd, steps: int = 3) -> Iterator[tuple[int, IO[str]]]:
    """A running `steps` job that takes a step per line written to the yielded gate."""
    fifo = taskd.root / "gate"
    os.mkfifo(fifo)
    enqueued = taskd.ctl(
        "enqueue", "steps", "--payload", json.dumps({"steps": steps, "gate": str(fifo)})
    )
    assert enqueued.returncode == 0, enqueued.stderr
    with open(fifo, "w") as gate:  # opens once the task has opened its end
        yield int(enqueued.stdout), gate


def step(gate: IO[str]) -> None:
    gate.write("\n")
    gate.flush()


def stored_progress(taskd: Taskd, job_id: int, text: str) -> str:
    def shown() -> str | None:
        detail = taskd.ctl("job", str(job_id)).stdout
        return detail if text in detail else None

    detail: str = wait_until(shown, what=f"job {job_id} to show {text!r}")
    return detail


def test_progress_and_logs_are_kept_and_followed(taskd: Taskd) -> None:
    with gated_job(taskd) as (job_id, gate):
        step(gate)
        detail = stored_progress(taskd, job_id, "progress:  1/3 (33%) step 1")
        assert "running" in detail
        # Started now, each shows what is stored first: then it is subscribed.
        waiting = subprocess.Popen(
            [*taskd.ctl_command(), "wait", str(job_id)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        following = subprocess.Popen(
            [*taskd.ctl_command(), "logs", str(job_id), "-f"], stdout=subprocess.PIPE
        )
        assert waiting.stderr is not None and following.stdout is not None
        progress, lines = Output(waiting.stderr.fileno()), Output(following.stdout.fileno())
        progress.until("1/3 step 1\n")
        lines.until("INFO    step 1 of 3\n")
        step(gate)
        progress.until("2/3 step 2\n")
        lines.until("step 2 of 3\n")
        step(gate)
        rest, _ = following.communicate(timeout=20)
        result, more_progress = waiting.communicate(timeout=20)
    assert following.returncode == 0 and waiting.returncode == 0
    lines.text += rest.decode()
    assert re.findall(r"step \d of 3", lines.text) == ["step 1 of 3", "step 2 of 3", "step 3 of 3"]
    assert result.decode().strip() == "3"
    progress.text += more_progress.decode()
    assert progress.text.splitlines() == ["1/3 step 1", "2/3 step 2", "3/3 step 3"]
    assert "progress:  3/3 (100%) step 3" in taskd.ctl("job", str(job_id)).stdout
    logs = taskd.ctl("logs", str(job_id))
    assert logs.returncode == 0 and re.findall(r"INFO +step \d", logs.stdout) == [
        "INFO    step 1",
        "INFO    step 2",
        "INFO    step 3",
    ]


def test_log_lines_name_the_zone_of_their_times(taskd: Taskd) -> None:
    ran = taskd.ctl("--json", "run", "chatty", "--payload", '{"lines": 1}')
    job_id = str(json.loads(ran.stdout)["id"])
    viewer = {**os.environ, "TZ": "Asia/Tokyo"}
    logs = subprocess.run([*taskd.ctl_command(), "logs", job_id], env=viewer,
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d JST INFO +line 0\n", logs.stdout)


def test_a_job_keeps_its_last_lines_and_says_so(taskd: Taskd) -> None:
    ran = taskd.ctl("run", "chatty", "--payload", '{"lines": 1005}')
    assert ran.returncode == 0, ran.stderr
    job_id = taskd.ctl("--json", "jobs").stdout
    (job,) = json.loads(job_id)
    logs = taskd.ctl("logs", str(job["id"]))
    shown = logs.stdout.splitlines()
    assert shown[0].startswith("(5 older lines dropped")
    assert shown[1].endswith("line 5") and shown[-1].endswith("line 1004")
    assert len(shown) == 1001
    assert "job 1: line 1004" in taskd.log  # the daemon's own log has them too
    missing = taskd.ctl("logs", "999")
    assert missing.returncode == 4 and "999" in missing.stderr


def test_lines_and_errors_are_cut_at_their_size_in_bytes_of_utf8(
    taskd_factory: type[Taskd], short_tmp: Path
) -> None:
    """A line and a message keep 4 KiB, a traceback its last 16 KiB, counted in bytes of
    UTF-8 (as a client in any language budgets for them), never splitting a character."""
    tasks = short_tmp / "tasks"
    tasks.mkdir()
    (tasks / "wide.py").write_text(WIDE_TASK)
    daemon = taskd_factory(tasks=tasks).start()
    with RawConnection(daemon.socket) as connection:
        job_id = connection.call("run", {"task": "wide"})["result"]["job"]["id"]
        (line,) = connection.call("logs", {"id": job_id})["result"]["lines"]
        (error,) = connection.call("job", {"id": job_id})["result"]["errors"]
    kept = line["message"].encode()
    assert 4 * KIB - 2 <= len(kept) <= 4 * KIB and line["message"] == "é" * 2046 + "…"
    message = error["message"].encode()
    assert 4 * KIB - 3 <= len(message) <= 4 * KIB and error["message"].endswith("€€…")
    trace = error["traceback"].encode()
    assert 16 * KIB - 3 <= len(trace) <= 16 * KIB and error["traceback"].startswith("...\n")


@contextmanager
def terminal(rows: int = 30, columns: int = 100) -> Iterator[tuple[int, int]]:
    """A pseudo-terminal of the given size: (controller, terminal) descriptors."""
    controller, term = pty.openpty()
    fcntl.ioctl(term, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    try:
        yield controller, term
    finally:
        os.close(controller)
        os.close(term)


def test_wait_draws_a_progress_bar_on_a_terminal(taskd: Taskd) -> None:
    with gated_job(taskd) as (job_id, gate), terminal() as (controller, term):
        step(gate)
        stored_progress(taskd, job_id, "1/3")
        waiting = subprocess.Popen(
            [*taskd.ctl_command(), "wait", str(job_id)], stdout=subprocess.PIPE, stderr=term
        )
        screen = Output(controller)
        screen.until("1/3 (33%) step 1")
        step(gate)
        screen.until("2/3 (67%) step 2")
        step(gate)
        result, _ = waiting.communicate(timeout=20)
        assert waiting.returncode == 0
        screen.until("\r\x1b[K", timeout=5)
    assert "\r[########----------------] 1/3 (33%) step 1\x1b[K" in screen.text
    assert "\r[################--------] 2/3 (67%) step 2\x1b[K" in screen.text
    assert result.decode().strip() == "3"


def test_top_shows_running_jobs_and_quits_with_q(taskd: Taskd) -> None:
    failed = taskd.ctl("run", "fail")
    assert failed.returncode == 1
    with gated_job(taskd, steps=4) as (_, gate), terminal(columns=80) as (controller, term):
        step(gate)
        top = subprocess.Popen(
            [*taskd.ctl_command(), "top"],
            stdin=term,
            stdout=term,
            stderr=term,
            env={**os.environ, "TERM": "vt100"},
        )
        output, screen = Output(controller), Screen(30, 80)
        output.until("RECENT FAILURES", screen=screen)
        output.until("fail", screen=screen)
        step(gate)
        output.until("2/4 (50%) step 2", screen=screen)  # redrawn on the progress event
        shown = screen.text()
        assert re.search(r"RUNNING\n +\d+ +steps +\S+ +\[######------\] 2/4", shown), shown
        assert re.search(r"RECENT FAILURES\n +\d+ +fail .*ValueError: boom", shown), shown
        # The header's counts fit on 80 columns, whatever the length of the node's name.
        assert re.search(r"^\d+ running, \d+ pending, 16 workers +\d\d:\d\d:\d\d +\(q quits\)$",
                         shown, flags=re.M), shown  # fmt: skip
        os.write(controller, b"q")
        assert top.wait(20) == 0
        step(gate)
        step(gate)


def test_jobs_watch_redraws_as_jobs_change(taskd: Taskd) -> None:
    watching = subprocess.Popen([*taskd.ctl_command(), "jobs", "--watch"], stdout=subprocess.PIPE)
    assert watching.stdout is not None
    screen = Output(watching.stdout.fileno())
    screen.until("no jobs")
    ran = taskd.ctl("run", "echo", "--payload", '{"name": "Ada"}')
    assert ran.returncode == 0
    screen.until("succeeded")
    watching.send_signal(signal.SIGINT)
    watching.communicate(timeout=20)
    assert watching.returncode == 0
    assert "\x1b" not in screen.text  # into a pipe: tables one after another, no screen codes


def test_a_slow_subscriber_gets_a_count_of_what_was_dropped(taskd: Taskd) -> None:
    with RawConnection(taskd.socket) as connection:
        connection.sock.sendall(connection.request("subscribe", {"logs": True}))
        first = connection.reply()
        assert first["event"]["kind"] == "subscribed"
        subscription = first["id"]
        # Many more events than a subscription holds, while this connection reads nothing.
        ran = taskd.ctl("run", "chatty", "--payload", '{"lines": 5000}')
        assert ran.returncode == 0, ran.stderr
        connection.sock.sendall(connection.request("unsubscribe", {"id": subscription}))
        events, replies = [], {}
        while len(replies) < 2:
            reply = connection.reply()
            if "event" in reply:
                events.append(reply["event"])
            else:
                replies[reply["id"]] = reply
        dropped = [event["dropped"] for event in events if event["kind"] == "dropped"]
        assert dropped and sum(dropped) == replies[subscription]["result"]["dropped"] > 0
        assert len(events) < 5000
        assert replies[subscription + 1]["result"] is True
        for _ in range(MAX_SUBSCRIPTIONS):
            connection.sock.sendall(connection.request("subscribe", {"job": 1}))
            assert connection.reply()["event"]["kind"] == "subscribed"
        over = connection.call("subscribe", {})
        assert over["error"]["code"] == "busy"


def test_subscribers_hear_of_state_changes(taskd: Taskd) -> None:
    with RawConnection(taskd.socket) as connection:
        connection.sock.sendall(connection.request("subscribe", {"logs": False}))
        assert connection.reply()["event"]["kind"] == "subscribed"
        ran = taskd.ctl("run", "echo", "--payload", '{"name": "Ada"}')
        assert ran.returncode == 0
        seen = []
        while ("state", "succeeded") not in seen:
            event = connection.reply()["event"]
            seen.append((event["kind"], event.get("status")))
        assert ("state", "running") in seen and ("changed", None) in seen
        assert seen.index(("state", "running")) < seen.index(("state", "succeeded"))


async def test_the_async_client_follows_jobs_as_the_blocking_one_does(
    taskd: Taskd, short_tmp: Path
) -> None:
    async with AsyncClient(str(taskd.socket), timeout=10) as client:
        subscription = await client.subscribe()
        ran = await client.run_job("chatty", {"lines": 2})
        seen: list[JobEvent] = []
        while not any(e.kind == "state" and e.status == "succeeded" for e in seen):
            event = await client.next_event(10)
            assert event is not None, f"no event within 10 s after {seen}"
            seen.append(event)
        lines = [e.line.message for e in seen if e.kind == "log" and e.job_id == ran.job.id]
        assert lines == ["line 0", "line 1"]
        await client.unsubscribe(subscription)
        assert await client.next_event(0.1) is None
        # wait(after_attempt=) returns at a failed attempt, as Client.wait does.
        payload = {"log": str(short_tmp / "flaky.log"), "succeed_on": 2}
        enqueued = await client.enqueue("flaky", payload, max_attempts=2)
        failed = await client.wait(enqueued.job_id, 20, after_attempt=0)
        assert failed.status != "succeeded" and failed.errors[0].attempt == 1
        assert (await client.wait(enqueued.job_id, 20)).status == "succeeded"


def test_run_prints_plain_progress_lines_when_piped(taskd: Taskd) -> None:
    # The job may end before taskctl subscribes: the lines are best effort, the result not.
    ran = taskd.ctl("run", "steps", "--payload", '{"steps": 2}')
    assert ran.returncode == 0 and ran.stdout.strip() == "2"
    assert all(re.fullmatch(r"\d/2 step \d", line) for line in ran.stderr.splitlines())


@contextmanager
def recording_relay(taskd: Taskd) -> Iterator[tuple[Path, list[str]]]:
    """A socket that relays one connection to taskd, and the methods of the requests it
    carried (in order)."""
    path = taskd.root / "relay.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    methods: list[str] = []

    def pump(source: socket.socket, sink: socket.socket, record: bool) -> None:
        buffer = b""
        while chunk := source.recv(65536):
            sink.sendall(chunk)
            buffer += chunk
            while record and len(buffer) >= HEADER.size:
                (size,) = HEADER.unpack(buffer[: HEADER.size])
                if len(buffer) < HEADER.size + size:
                    break
                frame, buffer = (
                    buffer[HEADER.size : HEADER.size + size],
                    buffer[HEADER.size + size :],
                )
                methods.append(msgspec.msgpack.decode(frame)["method"])
        sink.shutdown(socket.SHUT_WR)

    def relay() -> None:
        client, _ = listener.accept()
        daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        daemon.connect(str(taskd.socket))
        back = threading.Thread(target=pump, args=(daemon, client, False), daemon=True)
        back.start()
        pump(client, daemon, True)
        back.join()
        client.close()
        daemon.close()

    relaying = threading.Thread(target=relay, daemon=True)
    relaying.start()
    try:
        yield path, methods
        relaying.join(timeout=20)
    finally:
        listener.close()


def test_run_shows_progress_from_its_one_wait(taskd: Taskd) -> None:
    # hello, a detached run, and a wait that streams the job's progress: no subscription to
    # open and close, no extra read of the job.
    fifo = taskd.root / "gate"
    os.mkfifo(fifo)
    payload = json.dumps({"steps": 2, "gate": str(fifo)})
    with recording_relay(taskd) as (path, methods):
        command = [*taskd.ctl_command()[:-1], str(path), "run", "steps", "--payload", payload]
        running = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert running.stderr is not None
        progress = Output(running.stderr.fileno())
        with open(fifo, "w") as gate:
            step(gate)
            progress.until("1/2 step 1\n")  # shown while the job runs
            step(gate)
        result, rest = running.communicate(timeout=20)
    assert running.returncode == 0 and result.decode().strip() == "2"
    assert (progress.text + rest.decode()).splitlines() == ["1/2 step 1", "2/2 step 2"]
    assert methods == ["hello", "run", "wait"]


async def test_the_async_client_waits_with_progress(taskd: Taskd) -> None:
    with gated_job(taskd, steps=2) as (job_id, gate):
        async with AsyncClient(str(taskd.socket), timeout=10) as client:
            shown: list[float] = []
            first = asyncio.Event()

            def show(event: JobEvent) -> None:
                assert event.kind == "progress" and event.progress is not None
                shown.append(event.progress.done)
                first.set()

            client.on_event = show
            waiting = asyncio.ensure_future(client.wait(job_id, 20, progress=True))
            step(gate)
            await asyncio.wait_for(first.wait(), 20)
            step(gate)
            job = await waiting
    assert job.status == "succeeded" and shown == [1.0, 2.0]
