"""Output of taskctl: plain-text tables for people, JSON for programs."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from taskd.models import (
    BatchInfo,
    ConnectionStats,
    HttpStats,
    Job,
    LimitUse,
    LogLine,
    Progress,
    ScheduleInfo,
    Status,
    StoreFailing,
    TaskInfo,
    ThreadStats,
    counted,
    format_duration,
    utc_stamp,
)

TIME_FIELDS = (
    "created_at",
    "run_at",
    "started_at",
    "finished_at",
    "at",
    "next_due_at",
    "next_run_at",
    "next_tick",
    "last_tick",
    "fired_at",
    "until",
)


def iso(timestamp: float | None) -> str | None:
    """A Unix timestamp as ISO-8601 in UTC with its offset."""
    if timestamp is None:
        return None
    import datetime as dt  # only --json needs it: tables are made with `time`

    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")


def zone() -> str:
    """The viewer's time zone, which table times are in: named in the column headers."""
    return time.strftime("%Z")


def local_time(timestamp: float | None, now: float | None = None) -> str:
    """A short local time: HH:MM:SS today, else the date too."""
    if timestamp is None:
        return "-"
    moment = time.localtime(timestamp)
    today = time.localtime(now if now is not None else time.time())
    same_day = (moment.tm_year, moment.tm_yday) == (today.tm_year, today.tm_yday)
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", moment)


def to_jsonable(value: Any) -> Any:
    """Structs as dicts with their times in ISO-8601; everything else as it is."""
    if isinstance(value, msgspec.Struct):
        return {
            name: iso(item)
            if name in TIME_FIELDS and isinstance(item, float)
            else to_jsonable(item)
            for name, item in msgspec.structs.asdict(value).items()
        }
    if isinstance(value, list):
        return [to_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: to_jsonable(item) for key, item in value.items()}
    return value


def print_json(value: Any) -> None:
    data = msgspec.json.encode(to_jsonable(value))
    if sys.stdout.isatty():
        data = msgspec.json.format(data, indent=2)
    sys.stdout.buffer.write(data + b"\n")
    sys.stdout.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in (headers, *rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def tasks_table(tasks: list[TaskInfo]) -> str:
    if not tasks:
        return "no tasks loaded: put a Python file with a @define_task function in the tasks folder"
    now = time.time()
    rows = [
        [
            t.name,
            ", ".join(t.schedules) or "-",
            local_time(t.next_run_at, now),
            t.description
            if t.paused_since is None
            else f"(paused since {local_time(t.paused_since, now)}) {t.description}".rstrip(),
        ]
        for t in tasks
    ]
    return table(["NAME", "SCHEDULES", f"NEXT RUN ({zone()})", "DESCRIPTION"], rows)


def schedules_table(schedules: list[ScheduleInfo]) -> str:
    if not schedules:
        return (
            "no schedules: add [scheduled_tasks] or [[schedule]] tables to taskd.toml, then "
            "run `taskctl reload`"
        )
    now = time.time()
    rows = [
        [
            s.id,
            s.cron,
            s.timezone,
            ", ".join(s.tasks),
            "at start-up"
            if s.cron == "@startup" and s.enabled and not s.paused
            else local_time(s.next_tick, now),
            local_time(s.last_tick, now),
            _outcome(s),
            str(s.coalesced),
            "disabled" if not s.enabled else "paused" if s.paused else "active",
        ]
        for s in schedules
    ]
    headers = ["ID", "CRON", "TIMEZONE", "TASKS", f"NEXT ({zone()})", f"LAST ({zone()})",
               "OUTCOME", "COALESCED", "STATE"]  # fmt: skip
    return table(headers, rows)


def _outcome(schedule: ScheduleInfo) -> str:
    if schedule.last_outcome is None:
        return "-"
    jobs = ", ".join(str(job.id) for job in schedule.last_jobs)
    joined = ", joined" if any(job.joined for job in schedule.last_jobs) else ""
    noun = "job" if len(schedule.last_jobs) == 1 else "jobs"
    return f"{schedule.last_outcome} ({noun} {jobs}{joined})"


def jobs_table(jobs: list[Job]) -> str:
    if not jobs:
        return "no jobs"
    now = time.time()
    rows = [
        [
            str(job.id),
            job.task,
            job.status,
            job.origin,
            f"{job.attempts}/{job.max_attempts}",
            local_time(job.created_at, now),
            local_time(job.run_at, now) if job.status == "pending" and job.run_at > now else "-",
            _short(job.error or "", 60),
        ]
        for job in jobs
    ]
    headers = ["ID", "TASK", "STATUS", "ORIGIN", "ATTEMPTS", f"CREATED ({zone()})", "DUE", "ERROR"]
    return table(headers, rows)


def stamped(timestamp: float | None, now: float | None = None) -> str:
    """A local time with its zone, for a time shown on its own."""
    return "-" if timestamp is None else f"{local_time(timestamp, now)} {zone()}"


def job_detail(job: Job) -> str:
    now = time.time()
    lines = [
        f"job {job.id}: {job.task}  {job.status}",
        f"  origin:    {job.origin}" + (f" (from job {job.parent_id})" if job.parent_id else ""),
        f"  attempts:  {job.attempts} of {job.max_attempts}"
        + (f", interrupted {_times(job.crashes)}" if job.crashes else ""),
        f"  priority:  {job.priority}" + (f"   key: {job.key}" if job.key else ""),
        f"  created:   {stamped(job.created_at, now)}",
    ]
    if job.status == "pending":
        parents = "1 parent" if job.blocked == 1 else f"{job.blocked} parents"
        waits = f" (waiting for {parents})" if job.blocked else ""
        lines.append(f"  runs at:   {stamped(job.run_at, now)}{waits}")
    if job.parents:
        also = "; runs even if one fails" if job.after_failure == "run" else ""
        lines.append(f"  after:     {', '.join(map(str, job.parents))}{also}")
    if job.children:
        lines.append(f"  children:  {', '.join(map(str, job.children))}")
    if job.started_at is not None:
        lines.append(f"  started:   {stamped(job.started_at, now)}")
    if job.finished_at is not None:
        took = (
            f" (took {format_duration(job.finished_at - job.started_at)})" if job.started_at else ""
        )
        lines.append(f"  finished:  {stamped(job.finished_at, now)}{took}")
    if job.worker:
        lines.append(f"  worker:    {job.worker}")
    if job.traceparent:  # the trace its attempts are in: 00-TRACE_ID-PARENT_SPAN_ID-FLAGS
        lines.append(f"  trace:     {job.traceparent}")
    if job.progress is not None:
        lines.append(f"  progress:  {progress_text(job.progress)}")
    lines.append(f"  payload:   {_json(job.payload)}")
    if job.status == "succeeded":
        lines.append(f"  result:    {_json(job.result)}")
    if job.error:
        lines.append(f"  error:     {job.error}")
    for error in job.errors:
        when = stamped(error.at, now)
        if error.kind == "retried":
            lines.append(f"  retried at {when}: its attempts start again from 1")
            continue
        message = error.message.removeprefix(f"{error.kind}: ")  # as older taskd wrote it
        lines.append(f"  attempt {error.attempt} {error.kind} at {when}: {message}")
        if error.traceback:
            lines.extend("      " + line for line in error.traceback.rstrip().splitlines())
    return "\n".join(lines)


def batch_detail(batch: BatchInfo) -> str:
    """`batch 3: 812/1000 ended, 3 failed`, its jobs by status, and its callback."""
    now = time.time()
    failed = batch.counts.get("failed", 0)
    lines = [f"batch {batch.id}: {batch.ended}/{batch.total} ended, {failed} failed"]
    for status in ("pending", "running", "succeeded", "failed", "cancelled"):
        if batch.counts.get(status):
            lines.append(f"  {status + ':':<11}{batch.counts[status]}")
    lines.append(f"  created:   {stamped(batch.created_at, now)}")
    if batch.finished_at is not None:
        lines.append(f"  ended:     {stamped(batch.finished_at, now)}")
    if batch.on_finish is not None:
        callback = f" (job {batch.callback_id})" if batch.callback_id is not None else ""
        lines.append(f"  on_finish: {batch.on_finish}{callback}")
    return "\n".join(lines)


def progress_text(progress: Progress) -> str:
    """`40/100 (40%) resizing images`; without a total, `40 resizing images`."""
    text = f"{progress.done:g}"
    if progress.total is not None:
        text += f"/{progress.total:g}"
        if progress.total > 0:
            text += f" ({100 * progress.done / progress.total:.0f}%)"
    return f"{text} {progress.message}" if progress.message else text


def _stamp_with_date(timestamp: float) -> str:
    """A local time with its date and zone: `2026-11-30 01:09:56 CET`."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(timestamp))


def log_line(line: LogLine) -> str:
    """One kept log line: its local time with its zone, level and text (continued lines
    indented)."""
    when = _stamp_with_date(line.at)
    text = line.message.replace("\n", "\n    ")
    return f"{when} {line.level:<7} {text}"


def why_text(why: Any) -> str:
    """`taskctl why`: the sentence, then the timeline, one event a line."""
    now = time.time()
    message = why.message
    if why.at is not None:  # the moment it names, in the viewer's zone like the timeline
        message = message.replace(utc_stamp(why.at), _stamp_with_date(why.at))
    lines = [message, f"timeline ({zone()}):"]
    for event in why.timeline:
        what = event.event if event.attempt is None else f"attempt {event.attempt} {event.event}"
        worker = f" on {event.worker}" if event.worker and event.event == "started" else ""
        said = (
            ""
            if not event.message
            else f" {event.message}"
            if event.event == "created"
            else f": {event.message}"
        )
        lines.append(f"  {local_time(event.at, now)}  {what}{worker}{said}")
    return "\n".join(lines)


def limit_line(limit: LimitUse) -> str:
    """A shared limit's use: `stripe (charge, refund): 4 of 4 running, 25/s next start at
    12:00:03, 10 waiting`."""
    parts = []
    if limit.concurrency is not None:
        parts.append(f"{limit.running} of {limit.concurrency} running")
    else:
        parts.append(f"{limit.running} running")
    if limit.rate is not None:
        now = time.time()
        when = limit.next_start
        parts.append(
            limit.rate
            + (f" next start at {local_time(when, now)}" if when is not None and when > now else "")
        )
    parts.append(f"{limit.waiting} waiting")
    tasks = ", ".join(limit.tasks) or "no task loaded names it"
    return f"{limit.name} ({tasks}): {', '.join(parts)}"


def status_detail(status: Status) -> str:
    counts = ", ".join(
        f"{status.counts.get(s, 0)} {s}"
        for s in ("pending", "running", "succeeded", "failed", "cancelled")
    )
    here = next((node for node in status.nodes if node.id == status.node), None)
    busy = here.running if here is not None else len(status.running)
    held = ""
    if status.slots is not None:
        busy = status.slots.busy
        if status.slots.claimed_ahead:
            held += f", {status.slots.claimed_ahead} more jobs claimed ahead"
        if status.slots.ending:
            held += f", {status.slots.ending} ending"
    lines = [
        f"taskd {status.version}, pid {status.pid}, up {format_duration(status.uptime)}",
        f"  node:      {status.node}",
        f"  database:  {status.database}",
        f"  socket:    {status.socket}",
        f"  tasks:     {status.tasks_dir}",
        f"  workers:   {busy} of {status.workers} busy{held}",
        f"  jobs:      {counts}",
    ]
    if status.store_failing is not None:
        lines.append(store_failing_line(status.store_failing))
    if status.paused_tasks:
        now = time.time()
        lines.append(
            "  paused:    "
            + ", ".join(
                f"{task} (since {local_time(since, now)})"
                for task, since in sorted(status.paused_tasks.items())
            )
        )
    for number, limit in enumerate(status.limits):
        lines.append(("  limits:    " if number == 0 else " " * 13) + limit_line(limit))
    for number, use in enumerate(status.keyed):
        lines.append(
            ("  per key:   " if number == 0 else " " * 13)
            + f"{use.task} by {use.limit_key}: {counted(use.running, 'value')} running,"
            f" {counted(use.waiting, 'value')} waiting"
        )
    if len(status.nodes) > 1:
        lines.append(
            "  nodes:     "
            + ", ".join(
                f"{node.id} ({node.host} pid {node.pid}, {node.running} running)"
                for node in status.nodes
            )
        )
    if status.connections is not None:
        lines += connections_lines(status.connections)
    if status.http is not None:
        lines += http_lines(status.http)
    if status.threads is not None:
        lines.append(threads_line(status.threads))
    if status.log_dropped:
        lines.append(
            f"  log:       {status.log_dropped} lines dropped: taskd's output (the journal, a"
            " pipe) did not take them as fast as they came"
        )
    if status.oldest_pending_age is not None:
        lines.append(f"  oldest due job has waited {format_duration(status.oldest_pending_age)}")
    if status.next_due_at is not None:
        lines.append(f"  next delayed job due at {stamped(status.next_due_at)}")
    if status.tasks:
        rows = [
            [
                t.task,
                *(
                    str(t.counts.get(s, 0))
                    for s in ("pending", "running", "succeeded", "failed", "cancelled")
                ),
                format_duration(t.oldest_pending_age) if t.oldest_pending_age is not None else "-",
            ]
            for t in status.tasks
        ]
        lines += [
            "",
            table(
                ["TASK", "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "OLDEST"], rows
            ),
        ]
    if status.running:
        lines += ["", "running:"]
        now = time.time()
        for job in status.running:
            since = format_duration(now - job.started_at) if job.started_at else "?"
            where = f" on {job.worker}" if len(status.nodes) > 1 and job.worker else ""
            lines.append(f"  job {job.id} {job.task} attempt {job.attempts}, for {since}{where}")
    return "\n".join(lines)


def _times(count: int) -> str:
    return "once" if count == 1 else "twice" if count == 2 else f"{count} times"


def connections_lines(stats: ConnectionStats) -> list[str]:
    """The control socket's connections, and the limits they have hit since start."""
    users = sorted(stats.per_user.items(), key=lambda item: (-item[1], item[0]))
    busiest = ", ".join(f"uid {uid}: {count}" for uid, count in users[:3])
    lines = [
        f"  clients:   {stats.open} open ({busiest or 'none'}); at most {stats.max_connections}, "
        f"{stats.max_per_user} per user but root and taskd's own",
    ]
    if stats.paused:
        lines.append(
            f"  paused:    {stats.paused} not reading their replies ({_bytes(stats.unsent_bytes)}"
            f" unsent, {_bytes(stats.output_budget)} allowed each)"
        )
    if stats.refused_busy or stats.refused_per_user or stats.closed_idle or stats.closed_unread:
        lines.append(
            f"  refused:   {stats.refused_per_user} over a user's share, {stats.refused_busy} over "
            f"max_connections; closed {stats.closed_idle} idle for "
            f"{format_duration(stats.idle_timeout)}, {stats.closed_unread} not reading"
        )
    return lines


def http_lines(stats: HttpStats) -> list[str]:
    """The HTTP listener's connections, and the limits they have hit since start."""
    lines = [
        f"  http:      {stats.open} open ({stats.authenticated} with a token); at most "
        f"{stats.max_connections}, {stats.unauthenticated_share} of them without one",
        f"             event streams: {stats.event_streams} open, at most "
        f"{stats.max_event_streams}"
        + (f"; refused {stats.refused_event_streams}" if stats.refused_event_streams else ""),
    ]
    if stats.max_sessions:
        lines.append(
            f"             dashboard sessions: {stats.sessions} signed in, at most "
            f"{stats.max_sessions}"
            + (
                f"; signed out {stats.sessions_evicted} least recently used to make room"
                if stats.sessions_evicted
                else ""
            )
        )
    counts = (stats.refused_unauthenticated, stats.refused_header_timeout, stats.refused_busy)
    if any(counts) or stats.closed_idle:
        lines.append(
            f"             refused {stats.refused_unauthenticated} without a token for newer "
            f"ones, {stats.refused_header_timeout} slower than {stats.header_timeout:g}s "
            f"to send a head, {stats.refused_busy} "
            f"with a token while all were busy; closed {stats.closed_idle} idle"
        )
    return lines


def store_failing_line(failing: StoreFailing) -> str:
    """Writes to the job store that fail now: the problem to fix first."""
    return (
        f"  WARNING:   writes to the job store fail since {stamped(failing.since)} "
        f"({failing.failures} failed: {', '.join(failing.operations)}): {failing.error}"
    )


def threads_line(stats: ThreadStats) -> str:
    """The threads of plain-function tasks; stuck ones are a task bug worth a look."""
    line = f"  threads:   {stats.running} running"
    if stats.stuck or stats.refused:
        line += (
            f", {stats.stuck} stuck in functions whose job ended (replaced up to "
            f"{stats.max_stuck}), {counted(stats.refused, 'attempt')} refused"
        )
    return line


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def result_text(value: Any) -> str:
    """A task's result as JSON, indented when a person reads it."""
    data = msgspec.json.encode(value)
    if sys.stdout.isatty():
        data = msgspec.json.format(data, indent=2)
    return data.decode()


def _json(value: Any) -> str:
    try:
        return _short(msgspec.json.encode(value).decode(), 200)
    except (TypeError, ValueError):
        return repr(value)


def _short(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"
