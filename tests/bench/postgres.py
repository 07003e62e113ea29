"""taskd on PostgreSQL, one daemon and three, next to pgqueuer and procrastinate (same server).

Each system works in a schema of its own, made fresh for each run and dropped after it;
every figure (jobs per second; the daemons' CPU time per job; for drains, also that of the
server processes that served them) is a median over `--repeat` runs, the systems taking turns.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.backends import drop_schema, unique_schema
from tests.bench.compare import PEERS, drive, rate
from tests.bench.workload import BenchTaskd, cpu_seconds, daemon_pid, make_tasks
from tests.support import Taskd, short_tempdir

SYSTEMS = ["taskd, 1 daemon", "taskd, 3 daemons", "pgqueuer", "procrastinate"]
# (row, what the drivers do, jobs at scale 1, jobs per enqueue request, seconds each job
# awaits asyncio.sleep: 0 for no-op jobs, the peers run only those; a drain's jobs are
# queued in batches of 1,000 before the clock starts)
SCENARIOS = [
    ("enqueue one by one (1 connection per daemon)", "enqueue", 5000, 1, 0.0),
    # taskd.outbox on the application's own asyncpg connection, as pgqueuer enqueues: one
    # job per transaction, the daemons hear of each by NOTIFY.
    ("enqueue one by one, taskd.outbox on the app's connection", "outbox", 5000, 1, 0.0),
    ("enqueue in batches of 1,000", "enqueue", 100_000, 1000, 0.0),
    ("drain 10,000 no-op jobs", "drain", 10_000, 1000, 0.0),
    ("drain 4,000 jobs that each await asyncio.sleep(0.02)", "drain", 4000, 1000, 0.02),
]
GOALS = {"enqueue": "> 1x, >= 2x", "outbox": "> 1x", "drain": "> 1x, >= 2x"}
IO_GOAL = "-, >= 2.7x"  # on 2 cores, only waiting jobs can show scale-out
# The server's processes whose CPU time counts beside the daemons' own backends: those that
# write and flush what the backends commit (shared with any other user of the server).
SERVER_HELPERS = ["walwriter", "checkpointer", "background writer"]


@contextmanager
def daemons(url: str, count: int, schema: str = "") -> Iterator[list[Taskd]]:
    """`count` fresh daemons on a fresh schema, stopped and dropped after."""
    root, schema = short_tempdir(), schema or unique_schema()
    tasks = make_tasks(root)
    started: list[Taskd] = []
    try:
        for n in range(count):
            folder = root / f"d{n}"
            folder.mkdir()
            config = f'workers = 16\nnode_id = "bench{n}"\n[postgres]\nschema = "{schema}"\n'
            daemon = BenchTaskd(folder, tasks=tasks, config=config)
            daemon.database = url  # type: ignore[assignment]
            started.append(daemon.start(wait=False))
        for daemon in started:
            daemon.wait_for_notification("READY=1", timeout=60)
        yield started
    finally:
        for daemon in started:
            if daemon.running:
                daemon.stop(timeout=120)
        shutil.rmtree(root, ignore_errors=True)
        asyncio.run(drop_schema(url, schema))


@contextmanager
def daemon(url: str) -> Iterator[Taskd]:
    """One fresh daemon on a fresh schema, stopped and dropped after."""
    with daemons(url, 1) as started:
        yield started[0]


def serving(url: str, schema: str) -> tuple[int, set[int]]:
    """The local server's postmaster pid, and the pids of its processes that serve the
    daemons on `schema` (their connections, named after it) or flush what they commit."""
    checkpointer, pids = asyncio.run(_serving(url, schema))
    # The server runs on this machine; its checkpointer lives as long as its postmaster.
    stat = Path(f"/proc/{checkpointer}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1]), pids


async def _serving(url: str, schema: str) -> tuple[int, set[int]]:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        checkpointer = await connection.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
        )
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
            " OR backend_type = any($2::text[])",
            f"taskd {schema}",
            SERVER_HELPERS,
        )
    finally:
        await connection.close()
    return checkpointer, {row["pid"] for row in rows}


class PostgresBench:
    def __init__(self, url: str, scale: float, repeat: int, *, peers: bool) -> None:
        self.url = url
        self.peers = peers  # pgqueuer and procrastinate, from the bench extra
        self.scale = scale
        self.repeat = repeat
        self.samples: dict[tuple[str, str], list[float]] = {}

    def jobs(self, count: int, batch: int) -> int:
        """The scenario's job count at this scale, in whole batches."""
        return max(batch, int(count * self.scale) // batch * batch)

    def run(self) -> None:
        for _ in range(self.repeat):
            for name, what, count, batch, wait in SCENARIOS:
                jobs = (
                    self.jobs(count, batch)
                    if what in ("enqueue", "outbox")
                    else max(16, int(count * self.scale))
                )
                for system in SYSTEMS:
                    if (wait or not self.peers) and system.startswith(PEERS):
                        continue
                    measured = self._measure(system, what, jobs, batch, wait)
                    for figure, value in measured.items():
                        self.samples.setdefault((name, figure, system), []).append(value)

    def _measure(
        self, system: str, what: str, jobs: int, batch: int, wait: float
    ) -> dict[str, float]:
        """The rate; for a drain by taskd, also the CPU time per job (µs) of the daemons and
        of the server's processes that served them."""
        if system.startswith("taskd"):
            schema = unique_schema()
            with daemons(self.url, 3 if "3" in system else 1, schema) as started:
                sockets = [str(daemon.socket) for daemon in started]
                if what == "drain":
                    return self._drain(started, schema, jobs, wait)
                before = sum(cpu_seconds(daemon_pid(daemon)) for daemon in started)
                if what == "outbox":  # the daemons made the schema; they hear of each job
                    result = drive("taskd-outbox", url=self.url, schema=schema, jobs=jobs)
                elif batch == 1:
                    result = drive("taskd-enqueue", socket=",".join(sockets), jobs=jobs,
                                   connections=len(sockets))  # fmt: skip
                else:
                    result = drive("taskd-enqueue-many", socket=",".join(sockets), jobs=jobs,
                                   batch=batch)  # fmt: skip
                spent = sum(cpu_seconds(daemon_pid(daemon)) for daemon in started) - before
                return {"rate": rate(result), "daemon_us": spent / jobs * 1e6}
        schema = unique_schema()
        try:
            what = "enqueue" if what == "outbox" else what  # theirs are on the app's connection
            return {"rate": rate(drive(system, url=self.url, schema=schema, what=what, jobs=jobs,
                                       batch=batch))}  # fmt: skip
        finally:
            asyncio.run(drop_schema(self.url, schema))

    def _drain(self, started: list[Taskd], schema: str, jobs: int, wait: float) -> dict[str, float]:
        postmaster, _ = serving(self.url, schema)
        pids = ",".join(str(daemon_pid(daemon)) for daemon in started)
        result = drive("taskd-drain", socket=str(started[0].socket), jobs=jobs, wait=wait,
                       pid=pids, server=postmaster)  # fmt: skip
        # Those serving the daemons now: connections opened during the drain count too.
        _, serving_pids = serving(self.url, schema)
        spent = sum(cpu for pid, cpu in result["server_cpu"].items() if int(pid) in serving_pids)
        return {"rate": rate(result), "daemon_us": result["cpu"] / jobs * 1e6,
                "server_us": spent / jobs * 1e6}  # fmt: skip

    def table(self) -> str:
        header = ["scenario", *SYSTEMS, "1 daemon / pgqueuer", "3 daemons / 1", "goal"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        figures = [
            ("rate", "", "jobs/s"),
            ("daemon_us", ": the daemons' CPU per job, all threads", "us"),
            ("server_us", ": PostgreSQL's CPU per job (the daemons' backends, "
             + ", ".join(SERVER_HELPERS) + ")", "us"),
        ]  # fmt: skip
        for name, what, _, _, wait in SCENARIOS:
            for figure, label, unit in figures:
                medians = [
                    statistics.median(self.samples[name, figure, system])
                    if (name, figure, system) in self.samples
                    else None
                    for system in SYSTEMS
                ]
                one, three, pgqueuer, _ = medians
                if one is None or three is None:
                    continue
                cells = ["-" if value is None else f"{value:,.0f} {unit}" for value in medians]
                versus = "-" if not pgqueuer else f"{one / pgqueuer:.2f}x"
                goal = (IO_GOAL if wait else GOALS[what]) if figure == "rate" else (
                    "report; 3/1 not above 1x" if figure == "server_us" else "report"
                )  # fmt: skip
                scaled = f"{three / one:.2f}x" if one else "-"  # 0: under the clock's tick
                row = [name + label, *cells, versus, scaled, goal]
                lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)
