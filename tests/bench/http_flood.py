"""A connection flood against taskd's HTTP listener, and what others get from it meanwhile.

    .venv/bin/python -m tests.bench.http_flood [--connections 1500] [--rate 500 --rate 0]
        [--seconds 10] [--probes 10] [--mode half-sent|idle-token]

Two floods, each from a process of its own (`_Flood`) that keeps `--connections`
connections to the listener open, replacing each one taskd closes, at most `--rate` new
connections a second after the first `--connections` (0: as fast as it can):

- half-sent: each sends `GET /_nitro/tasks HTTP/1.1` and one header, then nothing (issue 26);
- idle-token: each makes one request with a valid token, reads the response, then keeps the
  connection open and idle (keep-alive).

Meanwhile this process sends `GET /healthz` (no token) and `GET /_nitro/tasks` (with the
token), each on a new connection: once right behind the flood's first connections, then
`--probes` times over `--seconds`; it prints their status codes and latencies, taskd's
largest resident memory, and what the flood saw (the status of the first answer on each
connection; "none": closed without one). taskd runs with the default `[http]` settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.http_support import TOKEN, HttpClient, http_config, http_port
from tests.support import Taskd, rss_kib, short_tempdir

MODES = ("half-sent", "idle-token")
HALF_SENT = b"GET /_nitro/tasks HTTP/1.1\r\nHost: localhost\r\n"
WITH_TOKEN = (
    f"GET /_nitro/tasks HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
).encode()


def raise_open_files_limit(needed: int) -> None:
    """Raise this process's soft limit on open files to `needed` (if the hard limit allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@dataclass
class FloodReport:
    """What the flooding process saw, from its first connection to the end."""

    opened: int = 0
    closed_by_taskd: int = 0
    responses: Counter[str] = field(default_factory=Counter)  # status code of the first answer
    held_408: list[float] = field(default_factory=list)  # connect to close, closed with a 408
    held_longest: float = 0.0  # connect to close, of any connection taskd closed
    left_open: int = 0  # at the end: still open (after a drain: not closed by taskd in time)


class _Held:
    __slots__ = ("opened_at", "received", "sent")

    def __init__(self, opened_at: float) -> None:
        self.opened_at = opened_at
        self.received = b""
        self.sent = False


class _Flood:
    """Keeps `connections` connections open, opening no more than `rate` a second after
    the first `connections` (0: as fast as it can)."""

    def __init__(self, port: int, mode: str, connections: int, rate: float) -> None:
        self.port, self.connections, self.rate = port, connections, rate
        self.request = HALF_SENT if mode == "half-sent" else WITH_TOKEN
        self.selector = selectors.DefaultSelector()
        self.held: dict[socket.socket, _Held] = {}
        self.report = FloodReport()
        self.sent = 0
        self.allowance = 0.0  # connections that may be opened now (see _open_allowed)
        self.refilled = time.monotonic()

    def run(self, stop_fd: int, on_ready: Callable[[], None]) -> FloodReport:
        """Until `stop_fd` is readable: a line "drain SECONDS" stops opening connections and
        waits that long at most for taskd to close the open ones; end of file stops at once."""
        self.selector.register(stop_fd, selectors.EVENT_READ, None)
        drain_until: float | None = None
        while drain_until is None or (self.held and time.monotonic() < drain_until):
            wait = 1.0 if drain_until is None else drain_until - time.monotonic()
            if drain_until is None:
                wait = min(wait, self._open_allowed())
            for key, _ in self.selector.select(timeout=max(0.0, wait)):
                if key.fd == stop_fd:
                    command = os.read(stop_fd, 100).decode()
                    if not command.startswith("drain"):
                        drain_until = time.monotonic()
                        break
                    drain_until = time.monotonic() + float(command.split()[1])
                    self.selector.unregister(stop_fd)
                elif self._step(key.fileobj) and self.sent == self.connections:
                    on_ready()
        self.report.left_open = len(self.held)
        for conn in list(self.held):
            self._drop(conn, closed_by_taskd=False)
        return self.report

    def _open_allowed(self) -> float:
        """Open what may be opened now; the seconds until the next may be.

        After the first `connections`, a token bucket: `rate` a second, in bursts of a
        tenth of a second's worth at most (a flood that was held up does not catch up).
        """
        while len(self.held) < self.connections:
            if self.rate and self.report.opened >= self.connections:
                now = time.monotonic()
                burst = max(1.0, self.rate / 10)
                self.allowance = min(burst, self.allowance + (now - self.refilled) * self.rate)
                self.refilled = now
                if self.allowance < 1:
                    return (1 - self.allowance) / self.rate
                self.allowance -= 1
            conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                conn.connect(("127.0.0.1", self.port))
            self.held[conn] = _Held(time.monotonic())
            self.selector.register(conn, selectors.EVENT_WRITE, None)
            self.report.opened += 1
        return 1.0

    def _step(self, conn: Any) -> bool:
        """Send the request on a connection just made, or read what came; whether it sent."""
        state = self.held[conn]
        if not state.sent:
            if conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._drop(conn, closed_by_taskd=True)  # refused, or reset before accept
                return False
            conn.send(self.request)
            state.sent = True
            self.selector.modify(conn, selectors.EVENT_READ, None)
            self.sent += 1
            return True
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        if data:
            state.received = state.received or data[:16]
        else:
            self._drop(conn, closed_by_taskd=True)
        return False

    def _drop(self, conn: socket.socket, *, closed_by_taskd: bool) -> None:
        state = self.held.pop(conn)
        self.selector.unregister(conn)
        conn.close()
        if closed_by_taskd:
            report = self.report
            report.closed_by_taskd += 1
            held_for = time.monotonic() - state.opened_at
            report.held_longest = max(report.held_longest, held_for)
            status = state.received[9:12].decode("latin-1") if state.received else "none"
            report.responses[status] += 1
            if status == "408":
                report.held_408.append(held_for)


class Flooder:
    """`_Flood` in a process of its own (`python -m tests.bench.http_flood --flood MODE`)."""

    def __init__(self, port: int, mode: str, connections: int, rate: float = 0) -> None:
        command = [sys.executable, "-m", "tests.bench.http_flood", "--flood", mode,
                   "--port", str(port), "--connections", str(connections),
                   "--rate", str(rate)]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        """Until as many requests have been sent as there are connections."""
        assert self.process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout) or self.process.stdout.readline() != "ready\n":
            raise AssertionError(f"the flood did not get its connections open in {timeout}s")

    def stop(self, drain: float = 0.0) -> FloodReport:
        """Stop (after waiting `drain` seconds at most for taskd to close what is open)."""
        assert self.process.stdout is not None and self.process.stdin is not None
        if drain:
            self.process.stdin.write(f"drain {drain}\n")
            self.process.stdin.flush()
        self.process.stdin.close()
        output = self.process.stdout.read()
        assert self.process.wait(drain + 60) == 0, output
        fields = json.loads(output)
        fields["responses"] = Counter(fields["responses"])
        return FloodReport(**fields)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def flooding(port: int, mode: str, connections: int, rate: float = 0) -> Iterator[Flooder]:
    flooder = Flooder(port, mode, connections, rate)
    try:
        flooder.wait_until_ready()
        yield flooder
    finally:
        flooder.kill()


class Probe:
    """One request on a new connection: its status (or the error) and how long it took."""

    def __init__(self, port: int, path: str, token: str | None) -> None:
        self.client = HttpClient(port, token=token)
        self.path = path

    def __call__(self) -> tuple[str, float]:
        started = time.monotonic()
        try:
            status = str(self.client.get(self.path, timeout=10.0).status)
        except OSError as exc:
            status = type(exc).__name__
        return status, time.monotonic() - started


def probes(port: int) -> dict[str, Probe]:
    return {
        "GET /healthz, no token": Probe(port, "/healthz", None),
        "GET /_nitro/tasks, token": Probe(port, "/_nitro/tasks", TOKEN),
    }


def measure(
    mode: str, rate: float, connections: int, seconds: float, count: int
) -> list[list[str]]:
    """One flood against a new taskd: a row for the first request behind its first
    `connections`, one per probe after, one for what the flood saw, one for memory."""
    root = short_tempdir()
    daemon = Taskd(root, config=http_config(), log_level="info").start()
    assert daemon.process is not None
    try:
        port = http_port(daemon)
        results: dict[str, list[tuple[str, float]]] = {name: [] for name in probes(port)}
        largest_rss = rss_kib(daemon.process.pid)
        with flooding(port, mode, connections, rate) as flooder:
            first = [probe() for probe in probes(port).values()]  # behind the first burst
            started = time.monotonic()
            for index in range(count):
                due = started + index * seconds / max(1, count - 1)
                time.sleep(max(0.0, due - time.monotonic()))
                for name, probe in probes(port).items():
                    results[name].append(probe())
                largest_rss = max(largest_rss, rss_kib(daemon.process.pid))
            report = flooder.stop()
        flood = f"{mode}, {f'{rate:g}/s' if rate else 'max rate'}"
        rows = [[flood, f"both, sent right behind the first {connections}",
                 ", ".join(status for status, _ in first), "-",
                 f"{max(latency for _, latency in first):.3f}"]]  # fmt: skip
        for name, outcomes in results.items():
            statuses = Counter(status for status, _ in outcomes)
            latencies = [latency for _, latency in outcomes]
            rows.append([flood, name, _counts(statuses), f"{statistics.median(latencies):.3f}",
                         f"{max(latencies):.3f}"])  # fmt: skip
        rows.append([flood, f"the flood: {report.opened} connections opened",
                     _counts(report.responses) + f" (of {report.closed_by_taskd} closed)",
                     "-", f"{report.held_longest:.1f} held"])  # fmt: skip
        rows.append([flood, "taskd's largest VmRSS", f"{largest_rss / 1024:.0f} MB", "-", "-"])
        return rows
    finally:
        if daemon.running:
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{count}x {status}" for status, count in counter.most_common())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1500)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--probes", type=int, default=10, help="of each kind")
    parser.add_argument("--mode", choices=MODES, action="append")
    parser.add_argument("--rate", type=float, action="append", help="new connections a second")
    parser.add_argument("--flood", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raise_open_files_limit(args.connections + 256)
    if args.flood:  # the flooding process
        flood = _Flood(args.port, args.flood, args.connections, (args.rate or [0.0])[0])
        report = flood.run(sys.stdin.fileno(), on_ready=lambda: print("ready", flush=True))
        print(json.dumps(report.__dict__))
        return
    header = ["flood", "request", "statuses", "median s", "max s"]
    rows = [header, ["---"] * len(header)]
    for mode in args.mode or MODES:
        for rate in args.rate or [500.0, 0.0]:
            rows += measure(mode, rate, args.connections, args.seconds, args.probes)
    print(f"{args.connections} connections, {args.probes} probes of each kind over "
          f"{args.seconds:g}s, {os.cpu_count()} CPUs")  # fmt: skip
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
