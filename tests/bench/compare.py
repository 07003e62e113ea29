"""taskd next to huey (and to the floors under both) in one run on this machine.

    .venv/bin/python -m tests.bench.compare [--repeat 3] [--scale 1.0] [--only SECTION,...]

Each scenario runs `--repeat` times, alternating taskd and its peer so that the machine's
load touches both alike; the table gives medians and the ratio taskd / peer (higher is
better for rates, lower for times). taskd is driven from another process through
taskctl's clients, as a real caller drives it. The table is printed and written to
tests/bench/RESULTS.md with the CPU count and the date. `--scale` multiplies the job counts;
the smoke test in `make test` runs every scenario at a tiny scale for correctness only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskctl import enqueue_params
from tests.bench.workload import bench_daemon, cpu_seconds, daemon_pid
from tests.support import TASKCTL, Taskd

RESULTS = Path(__file__).parent / "RESULTS.md"
# The peers (huey, pgqueuer, procrastinate) come with the `bench` extra, which `make bench`
# installs; `make test` runs the scenarios on taskd alone (`--no-peers`).
PEERS = ("huey", "pgqueuer", "procrastinate")
peers_measured = True
StartDaemon = Callable[[], AbstractContextManager[Taskd]]  # a fresh daemon, stopped after


def drive(scenario: str, **options: Any) -> dict[str, Any]:
    """Run one driver in a process of its own; what it measured."""
    args = [sys.executable, "-m", "tests.bench.drivers", scenario]
    for name, value in options.items():
        args += [f"--{name}", str(value)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{scenario} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def rate(result: dict[str, Any]) -> float:
    return float(result["jobs"] / result["seconds"])


def peer_rate(scenario: str, **options: Any) -> list[float]:
    """A peer's rate in this scenario, as a list to add to a row's samples (empty when the
    peers are not measured)."""
    if not peers_measured and scenario.startswith(PEERS):
        return []
    return [rate(drive(scenario, **options))]


@dataclass
class Row:
    """One line of the table: samples of taskd and of its reference, and the goal."""

    name: str
    unit: str  # "jobs/s" (higher is better) or "ms" (lower is better)
    peer: str
    goal: str
    taskd: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)

    def cells(self) -> list[str]:
        ours = statistics.median(self.taskd) if self.taskd else None
        theirs = statistics.median(self.reference) if self.reference else None
        ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
        return [self.name, _number(ours, self.unit), self.peer, _number(theirs, self.unit),
                ratio, self.goal]  # fmt: skip


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f} {unit}" if unit == "jobs/s" else f"{value:.2f} {unit}"


class Bench:
    def __init__(self, scale: float, repeat: int, synchronous: str) -> None:
        self.scale = scale
        self.repeat = repeat
        self.config = f'workers = 16\n[sqlite]\nsynchronous = "{synchronous}"\n'
        self.synchronous = synchronous
        self.rows: list[Row] = []

    def jobs(self, count: int) -> int:
        return max(16, int(count * self.scale))

    def row(self, *args: str) -> Row:
        self.rows.append(Row(*args))
        return self.rows[-1]

    def throughput(self) -> None:
        sync = self.synchronous
        single = self.row(f"durable enqueue, 1 connection ({sync})", "jobs/s", "-", "report")
        many = self.row(
            f"durable enqueue, 16 connections ({sync})", "jobs/s", "huey enqueue, in-process",
            ">= 3x",
        )  # fmt: skip
        floor16 = self.row(
            f"durable enqueue, 16 connections ({sync})", "jobs/s",
            "sqlite3, commits of 16 one-row inserts", ">= 0.67x",
        )  # fmt: skip
        batch = self.row(
            f"enqueue_many, 1,000 per request ({sync})", "jobs/s",
            "sqlite3 executemany, same rows", ">= 0.5x",
        )  # fmt: skip
        drain = self.row(
            f"no-op drain, 16 workers ({sync})",
            "jobs/s",
            "huey, 1 thread worker",
            ">= 8x" if sync == "full" else "report",
        )
        drain4 = self.row(
            f"no-op drain, 16 workers ({sync})", "jobs/s", "huey, 4 thread workers", "-"
        )
        cpu_rows = {
            row.name: self.row(
                f"{row.name}: daemon CPU per job, all threads",
                "us",
                "-",
                "<= 50 us" if row is drain else "report",
            )
            for row in (single, many, batch, drain)
        }
        for _ in range(self.repeat):
            with bench_daemon(self.config) as daemon:
                socket = str(daemon.socket)
                for row, scenario, options in (
                    (single, "taskd-enqueue", {"jobs": self.jobs(2000), "connections": 1}),
                    (many, "taskd-enqueue", {"jobs": self.jobs(20000), "connections": 16}),
                    (batch, "taskd-enqueue-many", {"jobs": self.jobs(100_000), "batch": 1000}),
                ):
                    before = cpu_seconds(daemon_pid(daemon))
                    row.taskd.append(rate(drive(scenario, socket=socket, **options)))
                    if row is many:
                        floor16.taskd.append(row.taskd[-1])
                    spent = cpu_seconds(daemon_pid(daemon)) - before
                    cpu_rows[row.name].taskd.append(spent / options["jobs"] * 1e6)
            many.reference += peer_rate("huey-enqueue", jobs=self.jobs(5000))
            batch.reference.append(rate(drive("sqlite-floor", jobs=self.jobs(100_000), batch=1000,
                                              synchronous=sync)))  # fmt: skip
            floor16.reference.append(rate(drive("sqlite-floor", jobs=self.jobs(20_000), batch=16,
                                                synchronous=sync)))  # fmt: skip
            with bench_daemon(self.config) as daemon:
                result = drive("taskd-drain", socket=str(daemon.socket), jobs=self.jobs(10_000),
                               pid=daemon_pid(daemon))  # fmt: skip
                drain.taskd.append(rate(result))
                drain4.taskd.append(rate(result))
                cpu_rows[drain.name].taskd.append(result["cpu"] / result["jobs"] * 1e6)
            drain.reference += peer_rate("huey-drain", jobs=self.jobs(5000), workers=1)
            drain4.reference += peer_rate("huey-drain", jobs=self.jobs(5000), workers=4)

    def backlog(self, size: int) -> None:
        """Other work next to a backlog of due jobs of a task with concurrency = 1."""
        enqueues = self.row(
            f"single enqueues next to {size:,} due jobs of a concurrency-1 task",
            "jobs/s", "the same, no backlog", "within 1.5x",
        )  # fmt: skip
        drains = self.row(
            f"no-op drain next to {size:,} due jobs of a concurrency-1 task",
            "jobs/s", "the same, no backlog", "within 1.5x",
        )  # fmt: skip
        for with_backlog in (False, True):
            with bench_daemon(self.config) as daemon:
                if with_backlog:
                    fill_backlog(daemon, size)
                socket = str(daemon.socket)
                samples = (enqueues.taskd, drains.taskd) if with_backlog else (
                    enqueues.reference, drains.reference
                )  # fmt: skip
                samples[0].append(rate(drive("taskd-enqueue", socket=socket,
                                             jobs=self.jobs(1000), connections=1)))  # fmt: skip
                samples[1].append(rate(drive("taskd-drain", socket=socket,
                                             jobs=self.jobs(5000))))  # fmt: skip

    def rate_limited_backlog(self, size: int, keys: int, stores: dict[str, StartDaemon]) -> None:
        """Other work next to a backlog of due jobs held by a per-key rate limit, spread
        over `keys` values of its limit_key (issue 19: claims stay scan-free), on each store."""
        for store, start in stores.items():
            backlog = f"{size:,} rate-limited jobs, {keys:,} keys"
            enqueues = self.row(f"single enqueues next to {backlog} ({store})", "jobs/s",
                                "the same, no backlog", "within 1.5x")  # fmt: skip
            drains = self.row(f"no-op drain next to {backlog} ({store})", "jobs/s",
                              "the same, no backlog", "within 1.5x")  # fmt: skip
            cpu = self.row(f"no-op drain next to {backlog} ({store}): daemon CPU per job, all"
                           " threads", "us", "the same, no backlog", "report")  # fmt: skip
            for _ in range(self.repeat):
                for with_backlog in (False, True):
                    with start() as daemon:
                        if with_backlog:
                            fill_backlog(daemon, size, task="throttled", keys=keys)
                        socket = str(daemon.socket)
                        enqueued = rate(drive("taskd-enqueue", socket=socket,
                                              jobs=self.jobs(1000), connections=1))  # fmt: skip
                        result = drive("taskd-drain", socket=socket, jobs=self.jobs(5000),
                                       pid=daemon_pid(daemon))  # fmt: skip
                    (enqueues.taskd if with_backlog else enqueues.reference).append(enqueued)
                    (drains.taskd if with_backlog else drains.reference).append(rate(result))
                    (cpu.taskd if with_backlog else cpu.reference).append(
                        result["cpu"] / result["jobs"] * 1e6
                    )

    def command_latency(self, runs: int) -> None:
        """Each command `runs` times per round, taking turns with the floor; a round's
        figure is its median, the row's the median of `repeat` rounds'. Beside the wall
        time, the CPU time of the process (user and system), which a busy machine moves less."""
        floor = "python -c 'import msgspec'"
        rows = {
            ("list", "wall"): self.row("`taskctl list`, whole process", "ms", floor, "<= 1.25x"),
            ("run", "wall"): self.row(
                "`taskctl run` of a no-op task, whole process", "ms", floor, "<= 1.25x"
            ),
            ("list", "cpu"): self.row(
                "`taskctl list`, CPU time of the process", "ms", floor, "report"
            ),
            ("run", "cpu"): self.row(
                "`taskctl run` of a no-op task, CPU time of the process", "ms", floor, "report"
            ),
        }
        with bench_daemon(self.config) as daemon:
            taskctl = [TASKCTL or sys.executable, "--socket", str(daemon.socket)]
            if TASKCTL is None:
                taskctl[1:1] = ["-m", "taskctl"]
            commands = {"list": [*taskctl, "list"], "run": [*taskctl, "run", "noop"],
                        "floor": [sys.executable, "-c", "import msgspec"]}  # fmt: skip
            for command in commands.values():
                timed(command)  # the page cache is warm for all, the bytecode written
            for _ in range(self.repeat):
                samples: dict[tuple[str, str], list[float]] = {}
                for _ in range(runs):
                    for name, command in commands.items():
                        wall, cpu = timed(command)
                        samples.setdefault((name, "wall"), []).append(wall * 1000)
                        samples.setdefault((name, "cpu"), []).append(cpu * 1000)
                for (name, kind), row in rows.items():
                    row.taskd.append(statistics.median(samples[name, kind]))
                    row.reference.append(statistics.median(samples["floor", kind]))

    def single_flight(self, callers: int, connections: int) -> None:
        """`callers` concurrent runs of one task over `connections` connections: one
        execution, and the delay from its end to each caller's reply (median and slowest)."""
        label = f"{callers:,} `run` callers of one task over {connections} connections"
        median = self.row(f"{label}: reply after the execution's end, median", "ms", "-",
                          "<= 50 ms")  # fmt: skip
        slowest = self.row(f"{label}: reply after the execution's end, max", "ms", "-",
                           "<= 50 ms")  # fmt: skip
        for _ in range(self.repeat):
            # One user's connections: more than the default 32 of them.
            config = f"max_connections_per_user = {connections}\n{self.config}"
            with bench_daemon(config) as daemon:
                result = drive("taskd-single-flight", socket=str(daemon.socket), jobs=callers,
                               connections=connections, hold=max(3.0, callers / 2000))  # fmt: skip
            delays = result["delays"]
            median.taskd.append(statistics.median(delays) * 1000)
            slowest.taskd.append(max(delays) * 1000)

    def table(self) -> str:
        header = ["scenario", "taskd", "peer or floor", "peer", "taskd / peer", "goal"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        return "\n".join(lines)


def fill_backlog(daemon: Taskd, size: int, task: str = "limited", keys: int = 0) -> None:
    """`size` jobs of `task`; with `keys`, their payloads take that many distinct values."""
    with daemon.client() as client:
        for first in range(0, size, 1000):
            count = min(1000, size - first)
            payloads = [{"customer": (first + n) % keys} if keys else n for n in range(count)]
            client.enqueue_many([enqueue_params(task, payload) for payload in payloads])


# Commands run as an installed taskctl runs: from bytecode, which pip writes at install
# (PYTHONDONTWRITEBYTECODE would have every run compile taskctl's modules again).
_INSTALLED = {name: value for name, value in os.environ.items()
              if name != "PYTHONDONTWRITEBYTECODE"}  # fmt: skip


def timed(command: list[str]) -> tuple[float, float]:
    """The wall time of the command and its CPU time (user and system), in seconds."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=_INSTALLED)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command)
    return wall, usage.ru_utime + usage.ru_stime


def cron_rows(bench: Bench, ticks: int) -> None:
    from tests.bench import cron_lateness

    late = bench.row("every-second tick to task body, median", "ms", "bare uvloop loop",
                     "<= 1.5 ms")  # fmt: skip
    p99 = bench.row("every-second tick to task body, p99", "ms", "bare uvloop loop", "<= 3 ms")
    busy = "every-second tick to task body, ~2000 jobs queued"
    busy_late = bench.row(f"{busy}, median", "ms", "bare uvloop loop (idle)", "report")
    busy_p99 = bench.row(f"{busy}, p99", "ms", "bare uvloop loop (idle)", "report")
    for _ in range(bench.repeat):
        floor = cron_lateness.uvloop_lateness(ticks)
        for median, p99th, started in (
            (late, p99, cron_lateness.started_lateness(ticks)),
            (busy_late, busy_p99, cron_lateness.started_lateness(ticks, busy=True)),
        ):
            median.taskd.append(statistics.median(started))
            p99th.taskd.append(cron_lateness.percentile(started, 0.99))
            median.reference.append(statistics.median(floor))
            p99th.reference.append(cron_lateness.percentile(floor, 0.99))


def startup_rows(bench: Bench, jobs: int) -> None:
    from tests.bench import startup

    times = startup.measure(jobs, bench.repeat, bench.config)
    big = f"{jobs:,} jobs"
    for case in ("after a clean stop", "after kill -9"):
        row = bench.row(f"start-up with {big}, {case}", "s", "the same, empty store",
                        "within 1.5x" if case == "after a clean stop" else "report")  # fmt: skip
        row.taskd = times[f"{big}, {case}"]
        row.reference = times[f"empty store, {case}"]
    loaded = bench.row("start-up after kill -9 under load, small store", "s",
                       "empty store, after a clean stop", "<= 0.3 s")  # fmt: skip
    loaded.taskd = times["small store, after kill -9 under load"]
    loaded.reference = times["empty store, after a clean stop"]


def rate_backlog_stores(
    bench: Bench, postgres: str | None, postgres_only: bool
) -> dict[str, StartDaemon]:
    """The stores the rate-limited backlog rows run on: SQLite, and PostgreSQL if given."""
    stores: dict[str, StartDaemon] = {}
    if not postgres_only:
        stores["SQLite"] = lambda: bench_daemon(bench.config)
    if postgres:
        from tests.bench.postgres import daemon

        stores["PostgreSQL"] = lambda: daemon(postgres)
    return stores


SECTIONS = ("throughput", "commands", "single-flight", "throughput, synchronous = normal",
            "backlog", "cron", "inspect", "start-up", "rate-limited backlog",
            "PostgreSQL")  # fmt: skip


def inspect_rows(bench: Bench, jobs: int, postgres: str | None) -> None:
    """Each inspecting request, alone, next to `jobs` pending jobs."""
    from tests.bench import inspect_backlog

    backends = [("SQLite", None), *([("PostgreSQL", postgres)] if postgres else [])]
    for backend, url in backends:
        goal = "< 50 ms" if url is None else "< 100 ms"
        rows = {
            command: bench.row(f"{command} with {jobs:,} pending jobs ({backend})", "ms", "-", goal)
            for command in inspect_backlog.COMMANDS
        }
        # One store of that size per backend (it takes a while to fill); medians inside.
        for command, (alone, _) in inspect_backlog.measure(jobs, bench.repeat, url).items():
            rows[command].taskd.append(alone)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the job counts")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="0: skip")
    parser.add_argument("--ticks", type=int, default=60, help="0: skip the cron scenario")
    parser.add_argument(
        "--startup-jobs", type=int, default=1_000_000, help="jobs in the big store; 0: skip"
    )
    parser.add_argument(
        "--inspect-jobs", type=int, default=1_000_000, help="pending jobs to inspect; 0: skip"
    )
    parser.add_argument("--runs", type=int, default=30, help="runs of each command")
    parser.add_argument(
        "--output",
        type=Path,
        help=f"where the table goes (default: {RESULTS.name}, not with --only or --postgres-only)",
    )
    parser.add_argument(
        "--only", action="append", metavar="SECTION",
        help=f"run only this section (repeatable: {', '.join(SECTIONS)}); the table is printed,"
        " RESULTS.md left as it is",
    )  # fmt: skip
    parser.add_argument(
        "--rate-backlog", type=int, default=100_000,
        help="jobs held by a rate limit next to other work, on each store; 0: skip",
    )  # fmt: skip
    parser.add_argument(
        "--rate-keys", type=int, default=1000, help="their distinct limit_key values"
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get("TASKD_TEST_POSTGRES"),
        help="a PostgreSQL database for the PostgreSQL scenarios (default: $TASKD_TEST_POSTGRES;"
        " none: they are skipped)",
    )
    parser.add_argument(
        "--postgres-only", action="store_true",
        help="only those scenarios; the table is printed, RESULTS.md left as it is",
    )  # fmt: skip
    parser.add_argument(
        "--no-peers", action="store_true", help="taskd alone (the peers need the bench extra)"
    )
    args = parser.parse_args(argv)
    global peers_measured
    peers_measured = not args.no_peers
    started = time.monotonic()
    heading = (
        f"{os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}; medians of {args.repeat} runs"
    )
    bench = Bench(args.scale, args.repeat, "full")
    normal = Bench(args.scale, args.repeat, "normal")
    sections: list[tuple[str, Callable[[], None]]] = []
    if not args.postgres_only:
        sections += [
            ("throughput", bench.throughput),
            ("commands", lambda: bench.command_latency(args.runs)),
            ("single-flight", lambda: bench.single_flight(bench.jobs(10_000), 80)),
            ("throughput, synchronous = normal", normal.throughput),
        ]
        if args.backlog:
            sections.append(("backlog", lambda: bench.backlog(int(args.backlog * args.scale))))
        if args.ticks:
            sections.append(("cron", lambda: cron_rows(bench, args.ticks)))
        if args.inspect_jobs:
            pending = int(args.inspect_jobs * args.scale)
            sections.append(("inspect", lambda: inspect_rows(bench, pending, args.postgres)))
        if args.startup_jobs:
            jobs = int(args.startup_jobs * args.scale)
            sections.append(("start-up", lambda: startup_rows(bench, jobs)))
    if args.rate_backlog:
        stores = rate_backlog_stores(bench, args.postgres, args.postgres_only)
        size = int(args.rate_backlog * args.scale)
        sections.append(
            ("rate-limited backlog",
             lambda: bench.rate_limited_backlog(size, args.rate_keys, stores))
        )  # fmt: skip
    shared = None
    if args.postgres:
        from tests.bench.postgres import PostgresBench

        shared = PostgresBench(args.postgres, args.scale, args.repeat, peers=peers_measured)
        sections.append(("PostgreSQL", shared.run))
    if args.only:
        if unknown := set(args.only) - set(SECTIONS):
            parser.error(
                f"no section {', '.join(sorted(unknown))}; sections: {', '.join(SECTIONS)}"
            )
        sections = [(name, run) for name, run in sections if name in args.only]
        shared = shared if "PostgreSQL" in args.only else None
    for name, run in sections:
        print(f"[{time.monotonic() - started:6.0f}s] {name} ...", file=sys.stderr, flush=True)
        run()
    bench.rows += normal.rows
    text = f"# make bench\n\n{heading}\n"
    if bench.rows:
        text += f"\n{bench.table()}\n"
    if shared is not None:
        text += f"\n## PostgreSQL\n\n{shared.table()}\n"
    print(text)
    output = args.output or (None if args.only or args.postgres_only else RESULTS)
    if output is not None:
        output.write_text(text)


if __name__ == "__main__":
    main()
