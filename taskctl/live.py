"""Live output of taskctl: a job's progress while `run`/`wait` wait for it (events of the
wait itself), and, over `subscribe`, `logs -f` and `jobs --watch`. Loaded only by the
commands that show it."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from taskctl import render
from taskctl.client import Client
from taskd.models import FINISHED_STATUSES, Job, Progress, counted
from taskd.protocol import JobEvent

BAR_WIDTH = 24
PLAIN_EVERY = 1.0  # seconds between plain progress lines that only count on
REDRAW_GATHER = 0.1  # seconds events are gathered before `jobs --watch` redraws


class ProgressDisplay:
    """A progress bar redrawn in place on a terminal; plain lines elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._drawn = False
        self._last: Progress | None = None
        self._last_at = 0.0
        self._printed: Progress | None = None  # the last plain line

    def show(self, progress: Progress) -> None:
        self._last = progress
        if self._tty:
            self._stream.write(f"\r{bar(progress)}\x1b[K")
            self._drawn = True
        else:
            # A line when the message changes; while only the count moves, one a second.
            now = time.monotonic()
            printed = self._printed
            if (
                printed is not None
                and printed.message == progress.message
                and (printed.done == progress.done or now - self._last_at < PLAIN_EVERY)
            ):
                return
            self._last_at = now
            self._printed = progress
            self._stream.write(plain(progress) + "\n")
        self._stream.flush()

    def say(self, line: str) -> None:
        """A line of its own (a failed attempt), above the bar when there is one."""
        if self._drawn:
            self._stream.write("\r\x1b[K")
        self._stream.write(line + "\n")
        if self._drawn and self._last is not None:
            self._stream.write(bar(self._last))
        self._stream.flush()

    def close(self) -> None:
        last, printed = self._last, self._printed
        if last is not None and not self._tty and _value(last) != _value(printed):
            self._stream.write(plain(last) + "\n")
            self._stream.flush()
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def _value(progress: Progress | None) -> tuple[float, float | None, str | None] | None:
    return None if progress is None else (progress.done, progress.total, progress.message)


def plain(progress: Progress) -> str:
    """`40/100 resizing images`."""
    text = f"{progress.done:g}" + (f"/{progress.total:g}" if progress.total is not None else "")
    return f"{text} {progress.message}" if progress.message else text


def bar(progress: Progress, width: int = BAR_WIDTH) -> str:
    """`[#########---------------]  40/100 (40%) resizing images`."""
    if progress.total:
        filled = max(0, min(width, round(width * progress.done / progress.total)))
        gauge = "#" * filled + "-" * (width - filled)
    else:
        gauge = "?" * width
    return f"[{gauge}] {render.progress_text(progress)}"


# Waits for a job's end, telling `say` what happens on the way (taskctl's failed attempts);
# its waits ask for the job's progress (`wait` with `progress`), which `on_event` is given.
Follow = Callable[[Client, int, "float | None", Callable[[str], None]], Job]


def wait_showing_progress(
    client: Client, job_id: int, timeout: float | None, follow: Follow
) -> Job:
    """`follow(client, job_id, timeout, say)`, showing the job's progress on stderr meanwhile
    (taskd sends the latest first)."""
    display = ProgressDisplay(sys.stderr)

    def show(event: JobEvent) -> None:
        if event.kind == "progress" and event.job_id == job_id and event.progress is not None:
            display.show(event.progress)

    client.on_event = show
    try:
        job = follow(client, job_id, timeout, display.say)
    except BaseException:  # Ctrl-C may have cut a frame short: the connection is done
        display.close()
        client.close()
        raise
    client.on_event = None
    display.close()
    return job


def follow_logs(client: Client, job_id: int, out: TextIO, follow: bool) -> None:
    """Print the job's kept lines; with `follow`, then its new lines until it ends."""
    subscription = client.subscribe(job_id, logs=True) if follow else None
    printed = _print_logs(client, job_id, out, None)
    if subscription is None:
        return
    job = client.job(job_id)
    while job.status not in FINISHED_STATUSES:
        event = client.next_event(None)
        if event is None:
            continue
        if event.kind == "log" and event.line is not None:
            if printed is None or (event.line.epoch, event.line.seq) > printed:
                out.write(render.log_line(event.line) + "\n")
                out.flush()
                printed = (event.line.epoch, event.line.seq)
        elif event.kind == "state" and event.status in FINISHED_STATUSES:
            break
        elif event.kind in ("changed", "dropped"):
            job = client.job(job_id)
            printed = _print_logs(client, job_id, out, printed)
    client.unsubscribe(subscription)  # not on Ctrl-C: a frame may have been cut short
    _print_logs(client, job_id, out, printed)  # lines written elsewhere (another daemon)


def _print_logs(
    client: Client, job_id: int, out: TextIO, after: tuple[int, int] | None
) -> tuple[int, int] | None:
    """Print the kept lines after `after`; returns the last line printed."""
    logs = client.logs(job_id)
    if after is None and logs.dropped:
        older = counted(logs.dropped, "older line")
        out.write(f"({older} dropped: a job keeps its last ones)\n")
    for line in logs.lines:
        if after is None or (line.epoch, line.seq) > after:
            out.write(render.log_line(line) + "\n")
            after = (line.epoch, line.seq)
    out.flush()
    return after


def watch_jobs(client: Client, fetch: Callable[[], list[Job]], out: TextIO) -> None:
    """Redraw the jobs table whenever jobs change, until interrupted; into a pipe or a
    file, each table after the last, without the codes that clear a screen."""
    clear = "\x1b[H\x1b[2J" if out.isatty() else ""
    client.subscribe(None, logs=False)
    progress: dict[int, Progress] = {}
    while True:
        jobs = fetch()
        for job in jobs:
            if job.status == "running" and job.id in progress:
                job.progress = progress[job.id]
        stamp = time.strftime("%H:%M:%S")
        out.write(f"{clear}{stamp}  jobs (Ctrl-C to stop)\n\n{watch_table(jobs)}\n")
        out.flush()
        event = client.next_event(None)
        gather = time.monotonic() + REDRAW_GATHER
        while event is not None:
            if event.kind == "progress" and event.job_id is not None and event.progress:
                progress[event.job_id] = event.progress
            event = client.next_event(max(0.0, gather - time.monotonic()))


def watch_table(jobs: list[Job]) -> str:
    """The jobs table, with the progress of running jobs under each."""
    lines = render.jobs_table(jobs).splitlines()
    with_progress = {job.id: job.progress for job in jobs if job.status == "running"}
    if not any(with_progress.values()):
        return "\n".join(lines)
    out = lines[:1]
    for job, line in zip(jobs, lines[1:], strict=False):
        out.append(line)
        shown = with_progress.get(job.id)
        if shown is not None:
            out.append(f"    {bar(shown, 16)}")
    return "\n".join(out)
