"""taskd on PostgreSQL, one daemon and three, next to pgqueuer and procrastinate (same server).

Each system works in a schema of its own, made fresh for each run and dropped after it;
every figure is jobs per second, a median over `--repeat` runs, the systems taking turns.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
from collections.abc import Iterator
from contextlib import contextmanager

from tests.backends import drop_schema, unique_schema
from tests.bench.compare import PEERS, drive, rate
from tests.bench.workload import BenchTaskd, make_tasks
from tests.support import Taskd, short_tempdir

SYSTEMS = ["taskd, 1 daemon", "taskd, 3 daemons", "pgqueuer", "procrastinate"]
# (row, what the drivers do, jobs at scale 1, jobs per enqueue request; a drain's jobs are
# queued in batches of 1,000 before the clock starts)
SCENARIOS = [
    ("enqueue one by one (1 connection per daemon)", "enqueue", 5000, 1),
    ("enqueue in batches of 1,000", "enqueue", 100_000, 1000),
    ("drain 10,000 no-op jobs", "drain", 10_000, 1000),
]


@contextmanager
def daemons(url: str, count: int) -> Iterator[list[Taskd]]:
    """`count` fresh daemons on a fresh schema, stopped and dropped after."""
    root, schema = short_tempdir(), unique_schema()
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
            for name, what, count, batch in SCENARIOS:
                jobs = (
                    self.jobs(count, batch)
                    if what == "enqueue"
                    else max(16, int(count * self.scale))
                )
                for system in SYSTEMS:
                    if not self.peers and system.startswith(PEERS):
                        continue
                    self.samples.setdefault((name, system), []).append(
                        self._measure(system, what, jobs, batch)
                    )

    def _measure(self, system: str, what: str, jobs: int, batch: int) -> float:
        if system.startswith("taskd"):
            with daemons(self.url, 3 if "3" in system else 1) as started:
                sockets = [str(daemon.socket) for daemon in started]
                if what == "drain":
                    return rate(drive("taskd-drain", socket=sockets[0], jobs=jobs))
                if batch == 1:
                    return rate(drive("taskd-enqueue", socket=",".join(sockets), jobs=jobs,
                                      connections=len(sockets)))  # fmt: skip
                return rate(drive("taskd-enqueue-many", socket=",".join(sockets), jobs=jobs,
                                  batch=batch))  # fmt: skip
        schema = unique_schema()
        try:
            return rate(drive(system, url=self.url, schema=schema, what=what, jobs=jobs,
                              batch=batch))  # fmt: skip
        finally:
            asyncio.run(drop_schema(self.url, schema))

    def table(self) -> str:
        header = ["scenario", *SYSTEMS, "1 daemon / pgqueuer", "3 daemons / 1", "goal"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, *_ in SCENARIOS:
            medians = [
                statistics.median(self.samples[name, system])
                if (name, system) in self.samples
                else None
                for system in SYSTEMS
            ]
            one, three, pgqueuer, _ = medians
            assert one is not None and three is not None
            cells = ["-" if value is None else f"{value:,.0f} jobs/s" for value in medians]
            ratios = ["-" if pgqueuer is None else f"{one / pgqueuer:.2f}x", f"{three / one:.2f}x"]
            lines.append("| " + " | ".join([name, *cells, *ratios, "> 1x, >= 2x"]) + " |")
        return "\n".join(lines)
