"""`taskctl top`: a full-screen view of taskd, redrawn on its events (curses, loaded only
by this command). `q` quits."""

from __future__ import annotations

import contextlib
import curses
import select
import sys
import time
from typing import Any

from taskctl import render
from taskctl.client import Client
from taskctl.live import bar
from taskd.models import Job, Progress, ScheduleInfo, Status, counted, format_duration

TICK = 1.0  # seconds between redraws for elapsed times when nothing happens
GATHER = 0.1  # seconds events are gathered before a redraw
FAILURES = 5


class View:
    """What the screen shows, read from taskd; running jobs' progress kept from events."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.progress: dict[int, Progress] = {}
        self.status: Status | None = None
        self.running: list[Job] = []
        self.failures: list[Job] = []
        self.schedules: list[ScheduleInfo] = []
        self.stale = True  # jobs changed: read them again

    def refresh(self) -> None:
        if not self.stale:
            return
        self.stale = False
        self.status = self._client.status()
        self.running = self.status.running  # this daemon's: those that run, not those held
        self.failures = self._client.jobs(status=["failed"], limit=FAILURES)
        self.schedules = self._client.schedules()
        running = {job.id for job in self.running}
        self.progress = {k: v for k, v in self.progress.items() if k in running}

    def event(self, event: Any) -> None:
        if event.kind == "progress" and event.job_id is not None:
            self.progress[event.job_id] = event.progress
        elif event.kind in ("state", "changed", "dropped"):
            self.stale = True

    def lines(self, width: int) -> list[str]:
        now = time.time()
        status = self.status
        lines = []
        if status is not None:  # the counts on a line of their own, whatever the node's name
            pending = status.counts.get("pending", 0)
            lines += [
                f"taskd {status.version} on {status.node or '-'}",
                f"{len(self.running)} running, {pending} pending, "
                f"{counted(status.workers, 'worker')}   {time.strftime('%H:%M:%S')}   (q quits)",
            ]
        lines += ["", "RUNNING"]
        for job in self.running or []:
            elapsed = format_duration(now - job.started_at) if job.started_at else "-"
            progress = self.progress.get(job.id, job.progress)
            shown = bar(progress, 12) if progress is not None else ""
            lines.append(f"  {job.id:>6}  {job.task:<20.20} {elapsed:>8}  {shown}")
        if not self.running:
            lines.append("  (none)")
        lines += ["", "QUEUE"]
        tasks = [t for t in (status.tasks if status else []) if t.counts.get("pending")]
        for counts in tasks:
            oldest = counts.oldest_pending_age
            age = f"oldest {format_duration(oldest)}" if oldest is not None else ""
            lines.append(f"  {counts.task:<20.20} {counts.counts['pending']:>6} pending  {age}")
        if not tasks:
            lines.append("  (empty)")
        lines += ["", "RECENT FAILURES"]
        for job in self.failures:
            when = render.local_time(job.finished_at, now)
            lines.append(f"  {job.id:>6}  {job.task:<20.20} {when:<10}  {job.error or ''}")
        if not self.failures:
            lines.append("  (none)")
        lines += ["", "NEXT TICKS"]
        ticks = sorted((s for s in self.schedules if s.next_tick), key=lambda s: s.next_tick or 0)
        whens = [render.local_time(schedule.next_tick, now) for schedule in ticks[:10]]
        widest = max(map(len, whens), default=0)  # a date too when not today
        for when, schedule in zip(whens, ticks, strict=False):
            lines.append(f"  {when:<{widest}}  {schedule.id:<24.24} {', '.join(schedule.tasks)}")
        if not ticks:
            lines.append("  (none)")
        return [line[: width - 1] for line in lines]


def run(client: Client) -> int:
    if not sys.stdout.isatty():
        print("taskctl: top needs a terminal; try `taskctl jobs --watch`", file=sys.stderr)
        return 2
    return int(curses.wrapper(_main, client))


def _main(screen: Any, client: Client) -> int:
    with contextlib.suppress(curses.error):  # a terminal that cannot hide its cursor
        curses.curs_set(0)
    screen.nodelay(True)
    view = View(client)
    client.subscribe(None, logs=False)
    while True:
        view.refresh()
        _draw(screen, view)
        if _wait(screen, client, view):
            return 0


def _draw(screen: Any, view: View) -> None:
    height, width = screen.getmaxyx()
    screen.erase()
    for row, line in enumerate(view.lines(width)[: height - 1]):
        screen.addstr(row, 0, line, curses.A_BOLD if line.isupper() else curses.A_NORMAL)
    screen.refresh()


def _wait(screen: Any, client: Client, view: View) -> bool:
    """Wait for an event, a key or the tick; True once `q` is pressed."""
    timeout = 0.0 if client.held_events() else TICK
    readable, _, _ = select.select([client.fileno(), sys.stdin], [], [], timeout)
    if sys.stdin in readable:
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return True
    if client.fileno() in readable or client.held_events():
        gather = time.monotonic() + GATHER
        while (event := client.next_event(max(0.0, gather - time.monotonic()))) is not None:
            view.event(event)
    return False
