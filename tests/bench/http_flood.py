"""A connection flood against taskd's HTTP listener, and what others get from it meanwhile.

    .venv/bin/python -m tests.bench.http_flood [--connections 1500] [--seconds 10] [--probes 10]

Two floods, each from a process of its own (`flood` below) that keeps `--connections`
connections to the listener open, opening a new one as soon as taskd closes one:

- half-sent: each sends `GET /_nitro/tasks HTTP/1.1` and one header, then nothing (issue 26);
- idle-token: each makes one request with a valid token, reads the response, then keeps the
  connection open and idle (keep-alive).

Meanwhile this process sends `GET /healthz` (no token) and `GET /_nitro/tasks` (with the
token), each on a new connection, `--probes` times over `--seconds`, and prints their status
codes and latencies, taskd's largest resident memory, and what the flood saw.
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
    connect_failures: int = 0


class _Held:
    __slots__ = ("opened_at", "received", "sent")

    def __init__(self, opened_at: float) -> None:
        self.opened_at = opened_at
        self.received = b""
        self.sent = False


def flood(
    port: int, mode: str, connections: int, *, on_ready: Callable[[], None], stop_fd: int
) -> FloodReport:
    """Keep `connections` connections open until `stop_fd` is readable; what happened."""
    request = HALF_SENT if mode == "half-sent" else WITH_TOKEN
    selector = selectors.DefaultSelector()
    selector.register(stop_fd, selectors.EVENT_READ, None)
    held: dict[socket.socket, _Held] = {}
    report = FloodReport()
    sent = 0

    def open_one() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        held[sock] = _Held(time.monotonic())
        selector.register(sock, selectors.EVENT_WRITE, None)
        report.opened += 1

    def drop(sock: socket.socket, closed_by_taskd: bool) -> None:
        state = held.pop(sock)
        selector.unregister(sock)
        sock.close()
        if closed_by_taskd:
            report.closed_by_taskd += 1
            held_for = time.monotonic() - state.opened_at
            report.held_longest = max(report.held_longest, held_for)
            status = state.received[9:12].decode("latin-1") if state.received else "none"
            report.responses[status] += 1
            if status == "408":
                report.held_408.append(held_for)

    while True:
        while len(held) < connections:
            open_one()
        for key, _ in selector.select(timeout=1.0):
            if key.fd == stop_fd:
                for sock in list(held):
                    drop(sock, False)
                return report
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            state = held[sock]
            if not state.sent:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    report.connect_failures += 1
                    drop(sock, False)
                    continue
                sock.send(request)
                state.sent = True
                selector.modify(sock, selectors.EVENT_READ, None)
                sent += 1
                if sent == connections:
                    on_ready()
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if data:
                state.received = state.received or data[:16]
            else:
                drop(sock, True)


class Flooder:
    """`flood` in a process of its own (`python -m tests.bench.http_flood --flood MODE`)."""

    def __init__(self, port: int, mode: str, connections: int) -> None:
        command = [sys.executable, "-m", "tests.bench.http_flood", "--flood", mode,
                   "--port", str(port), "--connections", str(connections)]  # fmt: skip
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

    def stop(self) -> FloodReport:
        assert self.process.stdout is not None and self.process.stdin is not None
        self.process.stdin.close()
        output = self.process.stdout.read()
        assert self.process.wait(60) == 0, output
        fields = json.loads(output)
        fields["responses"] = Counter(fields["responses"])
        return FloodReport(**fields)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def flooding(port: int, mode: str, connections: int) -> Iterator[Flooder]:
    flooder = Flooder(port, mode, connections)
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


def measure(mode: str, connections: int, seconds: float, count: int) -> list[list[str]]:
    """One flood against a new taskd; a table row per probe, and one for the flood."""
    root = short_tempdir()
    daemon = Taskd(root, config=http_config(), log_level="info").start()
    assert daemon.process is not None
    try:
        port = http_port(daemon)
        results: dict[str, list[tuple[str, float]]] = {name: [] for name in probes(port)}
        largest_rss = rss_kib(daemon.process.pid)
        with flooding(port, mode, connections) as flooder:
            started = time.monotonic()
            for index in range(count):
                due = started + index * seconds / max(1, count - 1)
                time.sleep(max(0.0, due - time.monotonic()))
                for name, probe in probes(port).items():
                    results[name].append(probe())
                largest_rss = max(largest_rss, rss_kib(daemon.process.pid))
            report = flooder.stop()
        rows = []
        for name, outcomes in results.items():
            statuses = Counter(status for status, _ in outcomes)
            latencies = [latency for _, latency in outcomes]
            rows.append([mode, name, _counts(statuses), f"{statistics.median(latencies):.3f}",
                         f"{max(latencies):.3f}"])  # fmt: skip
        rows.append([mode, f"the flood: {report.opened} connections opened",
                     _counts(report.responses) + f" (of {report.closed_by_taskd} closed)",
                     "-", f"{report.held_longest:.1f} held"])  # fmt: skip
        rows.append([mode, "taskd's largest VmRSS", f"{largest_rss / 1024:.0f} MB", "-", "-"])
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
    parser.add_argument("--flood", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raise_open_files_limit(args.connections + 256)
    if args.flood:  # the flooding process
        report = flood(
            args.port,
            args.flood,
            args.connections,
            on_ready=lambda: print("ready", flush=True),
            stop_fd=sys.stdin.fileno(),
        )
        print(json.dumps(report.__dict__))
        return
    header = ["flood", "request", "statuses", "median s", "max s"]
    rows = [header, ["---"] * len(header)]
    for mode in args.mode or MODES:
        rows += measure(mode, args.connections, args.seconds, args.probes)
    print(f"{args.connections} connections, {args.probes} probes of each kind over "
          f"{args.seconds:g}s, {os.cpu_count()} CPUs")  # fmt: skip
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
