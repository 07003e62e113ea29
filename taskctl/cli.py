"""`taskctl`: the command line of taskd. One function per command; exit codes are stable."""

from __future__ import annotations

import contextlib
import enum
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, NoReturn

import msgspec

from taskctl import errors, plain_args
from taskctl.client import WAIT_MARGIN, Client, enqueue_params
from taskd import protocol
from taskd.models import (
    FINISHED_STATUSES,
    JOB_ORIGINS,
    JOB_STATUSES,
    counted,
    format_duration,
    parse_duration,
    since_retry,
)
from taskd.protocol import (
    HELD_REASONS,
    Method,
)
from taskd.traceparent import header_traceparent

if TYPE_CHECKING:  # argparse is imported only when a command line needs it (taskctl.parser)
    import argparse

DEFAULT_REQUEST_TIMEOUT = 30.0


class Exit(enum.IntEnum):
    """taskctl's exit statuses, each with what `taskctl --help` says of it."""

    help: str

    def __new__(cls, value: int, help: str = "") -> Exit:
        status = int.__new__(cls, value)
        status._value_ = value
        status.help = help
        return status

    OK = 0, "success"
    JOB_FAILED = 1, "the task ran and failed, or was cancelled (its error on stderr)"
    USAGE = 2, "usage error: bad flags or arguments, --payload that is not valid JSON"
    CONFLICT = 3, "the job's state does not allow this (e.g. cancel a job that already finished)"
    NOT_FOUND = 4, "unknown task, job or schedule"
    UNAVAILABLE = 7, "taskd is not reachable (the message names the socket that was tried)"
    PAYLOAD_REJECTED = (
        65,
        ("the payload was rejected by the task's schema (the message names the field)"),
    )
    SOFTWARE = 70, "internal or protocol error"
    TEMPFAIL = (
        75,
        (
            "taskd is busy or stopping, its database failed, or it did not answer within\n"
            "--request-timeout: try again"
        ),
    )
    PERMISSION = 77, "permission denied: ask for access to the socket"
    CONFIG = 78, "reload refused: the new configuration or a task file is broken"
    TIMEOUT = 124, "wait --timeout ran out before the job ended"
    INTERRUPTED = 130, "interrupted (Ctrl-C); a job that was started goes on in taskd"


def exit_help() -> str:
    """The exit statuses, as `taskctl --help` ends."""
    lines = [f"{status.value:>5}  {status.help}".replace("\n", "\n       ") for status in Exit]
    return "exit status:\n" + "\n".join(lines) + "\n"


_EXIT_FOR_ERROR: dict[type[errors.TaskdError], Exit] = {
    errors.DaemonUnavailable: Exit.UNAVAILABLE,
    errors.UnknownTask: Exit.NOT_FOUND,
    errors.UnknownJob: Exit.NOT_FOUND,
    errors.UnknownSchedule: Exit.NOT_FOUND,
    errors.PayloadInvalid: Exit.PAYLOAD_REJECTED,
    errors.InvalidParams: Exit.USAGE,
    errors.PermissionDenied: Exit.PERMISSION,
    errors.Conflict: Exit.CONFLICT,
    errors.WaitTimeout: Exit.TIMEOUT,
    errors.ReloadFailed: Exit.CONFIG,
    errors.Busy: Exit.TEMPFAIL,
    errors.ShuttingDown: Exit.TEMPFAIL,
    errors.StoreFailure: Exit.TEMPFAIL,
    errors.RequestTimeout: Exit.TEMPFAIL,
    errors.JobFailed: Exit.JOB_FAILED,
}


class UsageError(Exception):
    pass


def _fail(args: argparse.Namespace, kind: str, message: str, code: Exit) -> NoReturn:
    """Say what went wrong on stderr (as JSON with --json) and exit with `code`."""
    if args.json:
        error = {"error": {"code": kind, "message": message, "exit": int(code)}}
        sys.stderr.buffer.write(msgspec.json.encode(error) + b"\n")
    else:
        print(f"taskctl: {message}", file=sys.stderr)
    raise SystemExit(int(code))


# -- argument types ----------------------------------------------------------------------


def _bad_value(message: str) -> Exception:
    """argparse's error for a value an argument type refuses (argparse says it, with usage)."""
    import argparse

    return argparse.ArgumentTypeError(message)


def read_payload(spec: str | None) -> Any:
    """--payload: JSON text, @FILE holding JSON, or - for JSON on stdin (absent: None, {})."""
    if spec is None:
        return None
    source = "--payload"
    if spec == "-":
        text, source = sys.stdin.buffer.read(), "the payload on stdin"
    elif spec.startswith("@"):
        try:
            with open(spec[1:], "rb") as file:
                text = file.read()
        except OSError as exc:
            raise UsageError(f"cannot read payload file {spec[1:]}: {exc.strerror}") from None
        source = f"payload file {spec[1:]}"
    else:
        text = spec.encode()
    if not text.strip():
        raise UsageError(
            f'{source} is empty: give JSON such as \'{{"name": "Ada"}}\', or leave '
            "--payload out to send none (the task gets {})"
        )
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        hint = ""
        if b"'" in text:
            hint = ' (JSON strings and keys take double quotes: {"name": "Ada"})'
        raise UsageError(f"{source} is not valid JSON: {exc}{hint}") from None


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise _bad_value(str(exc)) from None


def moment(text: str) -> float:
    """--at: an ISO-8601 time; without an offset it is local time. A time in the past is
    accepted (the job is due at once), with a warning."""
    import datetime as dt
    import time

    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise _bad_value(
            f"invalid time {text!r}: use ISO-8601 such as 2026-12-01T08:00:00+01:00"
        ) from None
    stamp = value.timestamp()
    if stamp < time.time():
        local = "" if value.tzinfo else f" (read as local time, {time.strftime('%Z')})"
        print(f"taskctl: --at {text}{local} is in the past: the job is due at once",
              file=sys.stderr)  # fmt: skip
    return stamp


class TimeBound(NamedTuple):
    """--since, --until: a Unix time, or (`ago`) that many seconds before the call."""

    seconds: float
    ago: bool = False

    def at(self, now: float) -> float:
        return max(0.0, now - self.seconds) if self.ago else self.seconds


def time_bound(text: str) -> TimeBound:
    """--since, --until: an ISO-8601 time (local time without an offset), @UNIX seconds (as
    the `jobs` method and `GET /jobs` take them), or a duration meaning that long ago."""
    import datetime as dt

    if text.startswith("@"):
        with contextlib.suppress(ValueError):
            if 0 <= (seconds := float(text[1:])) <= protocol.MAX_TIME:
                return TimeBound(seconds)
    else:
        with contextlib.suppress(ValueError):
            return TimeBound(parse_duration(text), ago=True)
        with contextlib.suppress(ValueError, OverflowError, OSError):
            return TimeBound(dt.datetime.fromisoformat(text).timestamp())
    raise _bad_value(
        f"invalid time {text!r}: use ISO-8601 such as 2026-12-01T08:00:00+01:00 (local time "
        "without an offset), @UNIX seconds such as @1764572400, or a duration meaning that "
        "long ago such as 90m, 2h, 7d"
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _bad_value(f"{text!r} is not a whole number") from None
    if value < 1:
        raise _bad_value(f"must be at least 1, got {value}")
    return value


def statuses(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in JOB_STATUSES:
            raise _bad_value(f"unknown status {name!r}; choose from {', '.join(JOB_STATUSES)}")
    return names


# -- commands ----------------------------------------------------------------------------


def cmd_list(client: Client, args: argparse.Namespace) -> Exit:
    tasks = client.list_tasks()
    return _show(args, tasks, lambda: _render().tasks_table(tasks))


def cmd_run(client: Client, args: argparse.Namespace) -> Exit:
    payload = read_payload(args.payload)
    # Started detached, then waited for: a Ctrl-C while waiting can name the job.
    outcome = client.run_job(
        args.task,
        payload,
        key=args.key,
        max_attempts=args.max_attempts,
        detach=True,
        traceparent=_traceparent(args),
    )
    job = outcome.job
    if outcome.joined:
        state = "pending a retry" if job.status == "pending" and job.attempts else job.status
        differs = args.payload is not None and job.payload != payload
        whose = "; its payload was used, not yours" if differs else ""
        print(
            f"taskctl: joined job {job.id} of {job.task}, which was already {state}{whose}",
            file=sys.stderr,
        )
    if job.status == "pending":
        _say_what_holds(client, job.id, outcome.held)
    render = _render()
    if args.detach:
        if args.json:
            render.print_json({"id": job.id, "joined": outcome.joined, "status": job.status})
        else:
            print(job.id)
        return Exit.OK
    args.waiting_for = job.id
    job = _live().wait_showing_progress(client, job.id, None, _follow)
    if args.json:
        render.print_json(job)
    elif job.status == "succeeded":
        print(render.result_text(job.result))
    return _job_exit(job)


def _say_what_holds(client: Client, job_id: int, held: str | msgspec.UnsetType | None) -> None:
    """A run that flow control holds back (its task paused, its rate limit) says so on
    stderr, and waits. The run's reply says what holds it; a taskd that predates that
    is asked."""
    if held is msgspec.UNSET:
        why = client.why(job_id)
        held = why.message if why.reason in HELD_REASONS else None
    if held:
        print(f"taskctl: {held}", file=sys.stderr)


def _follow(client: Client, job_id: int, timeout: float | None, say: Callable[[str], None]) -> Any:
    """Wait for the job's end, saying (on stderr) each failed attempt and when the next starts.

    Each `wait` returns at the job's end or at the next failed attempt (taskd tells it):
    no polling. Attempts count from 1 again after a `retry` by request: only those since
    the latest one are the job's current attempts. Each asks for the job's progress
    meanwhile (to `client.on_event`), unless taskd predates that."""
    deadline = None if timeout is None else time.monotonic() + timeout
    reported = 0  # the highest attempt whose failure was shown
    progress = True
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            job = client.wait(job_id, left, after_attempt=reported, progress=progress)
        except errors.InvalidParams:
            if not progress:
                raise
            progress = False  # a taskd without `progress` in `wait`: wait without it
            continue
        except errors.WaitTimeout as exc:  # said of the whole --timeout, not of its rest
            status = exc.data.get("status", "unfinished")
            spent = format_duration(timeout or 0.0)
            message = f"job {job_id} is still {status} after {spent}"
            raise errors.WaitTimeout(message, exc.data) from None
        if job.status in FINISHED_STATUSES:
            return job
        for error in since_retry(job.errors):
            if error.attempt > reported:
                reported = error.attempt
                if error.attempt >= job.attempts:  # the latest: say when the next one starts
                    say(f"taskctl: {_next_attempt(job, error)}")
                else:
                    say(f"taskctl: attempt {error.attempt} {_verb(error.kind)}: {error.message}")


def _verb(kind: str) -> str:
    return {"error": "failed", "timeout": "timed out"}.get(kind, kind)


def _next_attempt(job: Any, error: Any) -> str:
    said = f"attempt {error.attempt} {_verb(error.kind)}: {error.message}"
    if job.status == "running":
        return f"{said}; attempt {job.attempts} has started"
    wait = job.run_at - time.time()
    return f"{said}; retrying in {format_duration(wait)}" if wait > 0 else f"{said}; retrying now"


def read_payloads(spec: str) -> list[Any]:
    """--each: a file (@FILE) or stdin (-) of JSON payloads, one a line (blank lines skipped)."""
    name = "stdin" if spec == "-" else spec.removeprefix("@")
    if spec != "-" and not spec.startswith("@"):
        raise UsageError(f"--each takes @FILE or -, got {spec!r}: one JSON payload a line")
    try:
        if spec == "-":
            lines = sys.stdin.buffer.read().splitlines()
        else:
            with open(name, "rb") as file:
                lines = file.read().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read payloads file {name}: {exc.strerror}") from None
    payloads = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                payloads.append(msgspec.json.decode(line))
            except msgspec.DecodeError as exc:
                raise UsageError(f"{name} line {number} is not valid JSON: {exc}") from None
    if not payloads:
        raise UsageError(f"{name} holds no payloads: write one JSON payload a line")
    return payloads


def cmd_enqueue(client: Client, args: argparse.Namespace) -> Exit:
    if args.delay is not None and args.at is not None:
        raise UsageError("give --delay or --at, not both")
    if args.each is not None:
        return _enqueue_each(client, args)
    if args.on_finish is not None:
        raise UsageError("--on-finish needs --each: it runs once the batch's jobs have ended")
    payload = read_payload(args.payload)
    result = client.enqueue(
        args.task,
        payload,
        key=args.key,
        unique_for=args.unique_for,
        debounce=args.debounce,
        max_wait=args.max_wait,
        **_job_options(args),
    )
    if args.json:
        _render().print_json(result)
    else:
        print(result.job_id)
        if result.duplicate and args.debounce is not None:
            print(
                f"taskctl: job {result.job_id} has key {args.key!r}: if it is still pending, it "
                "takes this payload and waits again",
                file=sys.stderr,
            )
        elif result.duplicate:
            print(
                f"taskctl: job {result.job_id} with key {args.key!r} is already pending or "
                "running, or was created within its uniqueness window; nothing new was enqueued",
                file=sys.stderr,
            )
    return Exit.OK


def _job_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of `enqueue` that apply to each job alike, with --each too."""
    return {
        "delay": args.delay,
        "run_at": args.at,
        "priority": args.priority,
        "max_attempts": args.max_attempts,
        "traceparent": _traceparent(args),
        "after": args.after or (),
        "after_failure": "run" if args.after_failure == "run" else "cancel",
    }


def _traceparent(args: argparse.Namespace) -> str | None:
    """--traceparent, else $TRACEPARENT (how OpenTelemetry hands a context to a child
    process), which is ignored if malformed, as a malformed traceparent header is."""
    if args.traceparent is not None:
        return str(args.traceparent)
    return header_traceparent(os.environ.get("TRACEPARENT"))


def _enqueue_each(client: Client, args: argparse.Namespace) -> Exit:
    """One job per payload of --each, in one transaction; with --on-finish, a batch."""
    if args.payload is not None or args.key is not None:
        raise UsageError("--each gives each job its payload: leave out --payload and --key")
    options = _job_options(args)
    jobs = [enqueue_params(args.task, payload, **options) for payload in read_payloads(args.each)]
    enqueued = client.enqueue_many(jobs, on_finish=args.on_finish)
    if args.json:
        _render().print_json({"batch": enqueued.batch, "jobs": list(enqueued)})
    elif enqueued.batch is not None:
        print(enqueued.batch)
    else:
        print("\n".join(str(result.job_id) for result in enqueued))
    return Exit.OK


def cmd_batch(client: Client, args: argparse.Namespace) -> Exit:
    batch = client.batch(args.id)
    return _show(args, batch, lambda: _render().batch_detail(batch))


def cmd_job(client: Client, args: argparse.Namespace) -> Exit:
    job = client.job(args.id)
    return _show(args, job, lambda: _render().job_detail(job))


def cmd_jobs(client: Client, args: argparse.Namespace) -> Exit:
    wanted = [name for group in args.status or [] for name in group] or None

    def fetch(payloads: bool = False) -> list[Any]:
        # A duration given to --since/--until counts back from each call (--watch slides).
        now = time.time()
        return client.jobs(
            status=wanted, task=args.task, limit=args.limit, payloads=payloads,
            origin=args.origin, key=args.key, before=args.before, text=args.text,
            since=None if args.since is None else args.since.at(now),
            until=None if args.until is None else args.until.at(now),
        )  # fmt: skip

    if args.watch:
        with contextlib.suppress(KeyboardInterrupt):
            _live().watch_jobs(client, fetch, sys.stdout)
        return Exit.OK
    jobs = fetch(args.payloads)
    return _show(args, jobs, lambda: _render().jobs_table(jobs))


def cmd_logs(client: Client, args: argparse.Namespace) -> Exit:
    if args.json:
        _render().print_json(client.logs(args.id))
        return Exit.OK
    _live().follow_logs(client, args.id, sys.stdout, args.follow)
    return Exit.OK


def cmd_top(client: Client, args: argparse.Namespace) -> Exit:
    from taskctl import top

    return Exit(top.run(client))


def cmd_wait(client: Client, args: argparse.Namespace) -> Exit:
    args.waiting_for = args.id
    job = _live().wait_showing_progress(client, args.id, args.timeout, _follow)
    render = _render()
    if args.json:
        render.print_json(job)
    elif job.status == "succeeded":
        print(render.result_text(job.result))
    return _job_exit(job)


def cmd_why(client: Client, args: argparse.Namespace) -> Exit:
    why = client.why(args.id)
    return _show(args, why, lambda: _render().why_text(why))


def cmd_cancel(client: Client, args: argparse.Namespace) -> Exit:
    job = client.cancel(args.id)
    return _show(args, job, lambda: f"job {job.id} {job.task} cancelled")


def cmd_retry(client: Client, args: argparse.Namespace) -> Exit:
    job = client.retry(args.id)
    return _show(
        args,
        job,
        lambda: (
            f"job {job.id} {job.task} is pending again with {counted(job.max_attempts, 'attempt')}"
        ),
    )


def cmd_status(client: Client, args: argparse.Namespace) -> Exit:
    status = client.status()
    return _show(args, status, lambda: _render().status_detail(status))


def cmd_prune(client: Client, args: argparse.Namespace) -> Exit:
    deleted = client.prune(args.older_than)
    return _show(args, {"deleted": deleted}, lambda: f"deleted {counted(deleted, 'finished job')}")


def cmd_reload(client: Client, args: argparse.Namespace) -> Exit:
    result = client.reload()
    if result.restart_needed:
        changed = ", ".join(result.restart_needed)
        print(f"taskctl: changed, but taken up only when taskd restarts: {changed}",
              file=sys.stderr)  # fmt: skip
    return _show(
        args,
        result,
        lambda: (
            f"reloaded: {counted(result.tasks, 'task')}, {counted(result.schedules, 'schedule')}"
        ),
    )


def cmd_schedules(client: Client, args: argparse.Namespace) -> Exit:
    schedules = client.schedules()
    return _show(args, schedules, lambda: _render().schedules_table(schedules))


def cmd_schedules_pause(client: Client, args: argparse.Namespace) -> Exit:
    schedule = client.pause_schedule(" ".join(args.schedule))
    return _show(
        args,
        schedule,
        lambda: f'schedule "{schedule.id}" is paused (until `taskctl schedules resume`)',
    )


def cmd_schedules_resume(client: Client, args: argparse.Namespace) -> Exit:
    schedule = client.resume_schedule(" ".join(args.schedule))
    if args.json:
        _render().print_json(schedule)
    else:
        next_tick = _render().stamped(schedule.next_tick)
        print(f'schedule "{schedule.id}" is active; next tick {next_tick}')
    return Exit.OK


def cmd_schedules_trigger(client: Client, args: argparse.Namespace) -> Exit:
    schedule = client.trigger_schedule(" ".join(args.schedule))
    if args.json:
        _render().print_json(schedule)
        return Exit.OK
    for job in schedule.last_jobs:
        if job.joined:
            print(f"{job.task}: joined job {job.id}, which was already pending or running")
        else:
            print(f"{job.task}: started job {job.id}")
    if len(schedule.last_jobs) < len(schedule.tasks):
        print("taskctl: some tasks could not be started; see taskd's log", file=sys.stderr)
        return Exit.TEMPFAIL
    return Exit.OK


def cmd_pause(client: Client, args: argparse.Namespace) -> Exit:
    result = client.pause_task(args.task)
    already = "" if result.changed else " already"
    since = _render().stamped(result.since)
    return _show(
        args,
        result,
        lambda: (
            f"task {result.task} is{already} paused since {since}: no new job of it "
            f"starts until `taskctl resume {result.task}`"
        ),
    )


def cmd_resume(client: Client, args: argparse.Namespace) -> Exit:
    result = client.resume_task(args.task)
    state = "resumed" if result.changed else "was not paused"
    return _show(args, result, lambda: f"task {result.task} {state}: its jobs start as usual")


def cmd_completion(client: Client, args: argparse.Namespace) -> Exit:
    from taskctl.completion import script

    sys.stdout.write(script(args.shell))
    return Exit.OK


def cmd_metrics(client: Client, args: argparse.Namespace) -> Exit:
    text = client.metrics()
    return _show(args, text, lambda: text.rstrip("\n"))


def _show(args: argparse.Namespace, value: Any, text: Callable[[], str]) -> Exit:
    """Print `value` as JSON with --json, else the text made for people."""
    if args.json:
        _render().print_json(value)
    else:
        print(text())
    return Exit.OK


def _job_exit(job: Any) -> Exit:
    if job.status == "succeeded":
        return Exit.OK
    attempts = counted(job.attempts, "attempt")
    print(f"taskctl: job {job.id} {job.task} {job.status} after {attempts}: {job.error}",
          file=sys.stderr)  # fmt: skip
    return Exit.JOB_FAILED


def _render() -> Any:
    from taskctl import render

    return render


def _live() -> Any:
    from taskctl import live

    return live


# -- the command table: the parser, the epilogs and the completion derive from it -----------

if TYPE_CHECKING:
    Handler = Callable[[Client, argparse.Namespace], Exit]
    # What completion offers for an argument: the running taskd's tasks, jobs or schedules,
    # or these words (an argument with `choices` offers them).
    Completion = Literal["tasks", "jobs", "schedules"] | tuple[str, ...]


class Arg:
    """An argument of a command: argparse's flags (or a positional's name) and options."""

    __slots__ = ("complete", "flags", "options")

    def __init__(self, *flags: str, complete: Completion | None = None, **options: Any) -> None:
        self.flags = flags
        self.options = options
        self.complete = complete

    @property
    def positional(self) -> bool:
        return not self.flags[0].startswith("-")

    @property
    def takes_value(self) -> bool:
        return self.options.get("action") not in ("store_true", "version")


class Command:
    """A taskctl command: the function that runs it, the protocol method it calls (whose
    declaration gives its help and examples), its arguments, and its own subcommands."""

    __slots__ = ("actions", "args", "description", "examples", "handler", "help", "name", "usage")

    def __init__(
        self,
        name: str,
        handler: Handler,
        method: Method[Any, Any] | None = None,
        args: tuple[Arg, ...] = (),
        *,
        help: str = "",  # for a command that is not one method of the protocol
        examples: tuple[str, ...] = (),
        actions: tuple[Command, ...] = (),  # `schedules pause|resume|trigger`
        usage: str | None = None,
        description: str | None = None,
    ) -> None:
        self.name = name
        self.handler = handler
        self.args = args
        self.help = method.help if method is not None else help
        self.examples = method.examples if method is not None else examples
        self.actions = actions
        self.usage = usage
        self.description = description or self.help


# The global options, before or after the command. `{socket}` in a help is the default
# socket, found when a parser is built.
GLOBAL_OPTIONS = (
    Arg("--socket", metavar="PATH", default=None,
        help="taskd's control socket (default: $TASKD_SOCKET or {socket})"),
    Arg("--json", action="store_true", default=False,
        help="print JSON on stdout, and only JSON (errors too, on stderr)"),
    Arg("--connect-timeout", type=duration, default=0.0, metavar="DUR",
        help="keep trying this long while taskd is starting (default: fail at once)"),
    Arg("--request-timeout", type=duration, default=DEFAULT_REQUEST_TIMEOUT, metavar="DUR",
        help="give up (exit 75) when taskd has not answered a call within this long "
        f"(default: {DEFAULT_REQUEST_TIMEOUT:g}s; 0: no limit). It does not cut short a "
        "`run` waiting for its job, nor `wait`, which gives up after its own --timeout "
        f"plus {WAIT_MARGIN:g}s"),
)  # fmt: skip


NAME = Arg(
    "task",
    metavar="NAME",
    complete="tasks",
    help="the task's name, as `taskctl list` shows it (e.g. jobs:send-email)",
)
JOB_ID = Arg(
    "id",
    type=int,
    metavar="ID",
    complete="jobs",
    help="a job id, as `taskctl enqueue` prints it or `taskctl jobs` lists it",
)
PAYLOAD = Arg(
    "--payload",
    metavar="JSON",
    help="the payload: JSON text, @FILE with JSON, or - to read JSON from stdin "
    "(without it the task gets {})",
)
TRACEPARENT = Arg(
    "--traceparent",
    metavar="TP",
    help="the W3C traceparent (00-TRACEID-SPANID-FLAGS) of the span its attempts are traced "
    "under (default: $TRACEPARENT)",
)
ATTEMPTS_HELP = "attempts before the job fails for good (default: the task's max_attempts, else {})"
SCHEDULE_HELP = (
    "{}. Name the schedule by its id or by its cron expression (quoted, so that the shell "
    "keeps it whole)."
)


def schedule_action(name: str, handler: Handler, method: Method[Any, Any]) -> Command:
    """`taskctl schedules NAME ID|CRON`."""
    return Command(
        name, handler, method,
        (Arg("schedule", nargs="+", metavar="ID|CRON", complete="schedules"),),
        usage=f"taskctl schedules {name} [-h] ID|CRON",
        description=SCHEDULE_HELP.format(method.help),
    )  # fmt: skip


COMMANDS: tuple[Command, ...] = (
    Command("list", cmd_list, protocol.LIST_TASKS),
    Command("run", cmd_run, protocol.RUN, (
        NAME, PAYLOAD,
        Arg("--detach", action="store_true", help="print the job id and return at once"),
        Arg("--key", help="single-flight key: runs with the same key share one execution"),
        Arg("--max-attempts", type=positive_int, metavar="N", help=ATTEMPTS_HELP.format(1)),
        TRACEPARENT,
    )),
    Command("enqueue", cmd_enqueue, protocol.ENQUEUE, (
        NAME, PAYLOAD,
        Arg("--delay", type=duration, metavar="DUR", help="run after 30s, 5m, 2h ..."),
        Arg("--at", type=moment, metavar="TIME",
            help="run at an ISO-8601 time (local time without an offset)"),
        Arg("--priority", type=int, default=0, metavar="N", help="lower runs first (default 0)"),
        Arg("--max-attempts", type=positive_int, metavar="N", help=ATTEMPTS_HELP.format(3)),
        Arg("--key", metavar="K",
            help="unique key: no second pending or running job with this key"),
        Arg("--unique-for", type=duration, metavar="DUR",
            help="with --key: the key stays taken this long after its job was created, even "
            "once it has finished (default: the task's unique_for)"),
        Arg("--debounce", type=duration, metavar="DUR",
            help="with --key: while that key's job is pending, take this payload and make it "
            "due DUR from now (a burst of enqueues runs once, with the last payload)"),
        Arg("--max-wait", type=duration, metavar="DUR",
            help="with --debounce: never later than this after the first enqueue"),
        TRACEPARENT,
        Arg("--after", type=positive_int, action="append", metavar="ID",
            help="wait until job ID has succeeded (repeat for several jobs)"),
        Arg("--after-failure", choices=("cancel", "run"), default="cancel",
            help="when a job of --after fails or is cancelled: cancel this one too (default), "
            "or run it all the same"),
        Arg("--each", metavar="@FILE",
            help="one job per line of FILE (JSON payloads; - for stdin), in one transaction"),
        Arg("--on-finish", metavar="TASK", complete="tasks",
            help="with --each: make the jobs a batch, and enqueue TASK once they have all ended"),
    )),
    Command("batch", cmd_batch, protocol.BATCH, (
        Arg("id", type=positive_int, metavar="BATCH",
            help="a batch id, as enqueue --each prints it"),
    )),
    Command("job", cmd_job, protocol.JOB, (JOB_ID,)),
    Command("jobs", cmd_jobs, protocol.JOBS, (
        Arg("--status", type=statuses, action="append", metavar="S", complete=JOB_STATUSES,
            help=f"only these statuses (comma-separated or repeated): {', '.join(JOB_STATUSES)}"),
        Arg("--task", metavar="NAME", complete="tasks", help="only jobs of this task"),
        Arg("--origin", choices=JOB_ORIGINS, complete=JOB_ORIGINS,
            help="only jobs made so: by `run`, `enqueue`, a schedule's tick, or a task"),
        Arg("--key", metavar="K", help="only jobs with this unique key (`enqueue --key`)"),
        Arg("--since", type=time_bound, metavar="TIME",
            help="only jobs created at or after TIME: ISO-8601 (local time without an "
            "offset), @UNIX seconds, or a duration meaning that long ago (90m, 2h, 7d)"),
        Arg("--until", type=time_bound, metavar="TIME",
            help="only jobs created before TIME (as --since)"),
        Arg("--text", metavar="S",
            help="only jobs whose payload holds this text (not indexed: it reads the jobs "
            "the other filters leave, so narrow them on a big store)"),
        Arg("--before", type=positive_int, metavar="ID",
            help="only jobs with a lower id: the next page after the last ID listed"),
        Arg("--limit", type=positive_int, default=50, metavar="N", help="default 50"),
        Arg("--payloads", action="store_true",
            help="with --json: include each job's payload and result (`taskctl job ID` shows "
            "them)"),
        Arg("--watch", action="store_true",
            help="redraw the table as jobs change (Ctrl-C stops)"),
    )),
    Command("logs", cmd_logs, protocol.LOGS, (
        JOB_ID,
        Arg("-f", "--follow", action="store_true",
            help="print new lines as they come, until the job ends"),
    )),
    Command("top", cmd_top, examples=("taskctl top",),
            help="full-screen view: running jobs and their progress, queues, failures, next "
            "ticks"),
    Command("wait", cmd_wait, protocol.WAIT, (
        JOB_ID, Arg("--timeout", type=duration, metavar="DUR", help="give up after this long"),
    )),
    Command("why", cmd_why, protocol.WHY, (JOB_ID,)),
    Command("cancel", cmd_cancel, protocol.CANCEL, (JOB_ID,)),
    Command("retry", cmd_retry, protocol.RETRY, (JOB_ID,)),
    Command("status", cmd_status, protocol.STATUS),
    Command("prune", cmd_prune, protocol.PRUNE, (
        Arg("--older-than", type=duration, metavar="DUR",
            help="delete finished jobs older than this (1d, 12h ...), whatever the retention"),
    )),
    Command("reload", cmd_reload, protocol.RELOAD),
    Command("pause", cmd_pause, protocol.PAUSE_TASK, (NAME,)),
    Command("resume", cmd_resume, protocol.RESUME_TASK, (NAME,)),
    Command("metrics", cmd_metrics, protocol.METRICS),
    Command("schedules", cmd_schedules, protocol.SCHEDULES, actions=(
        schedule_action("pause", cmd_schedules_pause, protocol.PAUSE_SCHEDULE),
        schedule_action("resume", cmd_schedules_resume, protocol.RESUME_SCHEDULE),
        schedule_action("trigger", cmd_schedules_trigger, protocol.TRIGGER_SCHEDULE),
    )),
    Command("completion", cmd_completion,
            help="print a shell completion script: commands, options, task names and job ids",
            examples=(
                "source <(taskctl completion bash)        # in ~/.bashrc",
                "source <(taskctl completion zsh)         # in ~/.zshrc",
                "taskctl completion fish | source         # in ~/.config/fish/config.fish",
            ),
            args=(Arg("shell", choices=["bash", "zsh", "fish"], metavar="SHELL",
                      help="bash, zsh or fish"),)),
)  # fmt: skip
COMMAND_NAMES = frozenset(command.name for command in COMMANDS)
# The global options that take a value (so that the word after one is not the command).
VALUED_OPTIONS = frozenset(
    flag for option in GLOBAL_OPTIONS if option.takes_value for flag in option.flags
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """taskctl's parser (argparse's); with `only`, with just that command (a command line
    names one, and building the other sixteen would cost it milliseconds)."""
    from taskctl.parser import build_parser as build

    return build(only)


def command_of(words: list[str]) -> str | None:
    """The command a command line names, if it names a known one: the first word that is
    not a global option or its value."""
    remaining = iter(words)
    for word in remaining:
        if word in VALUED_OPTIONS:
            next(remaining, None)
        elif not word.startswith("-"):
            return word if word in COMMAND_NAMES else None
    return None


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["__complete"]:  # what the completion scripts ask
        from taskctl.completion import complete

        print("\n".join(complete(words[1:])))
        return int(Exit.OK)
    args: Any = plain_args.read(words, COMMANDS, GLOBAL_OPTIONS)
    if args is None:  # help, or a mistake to explain: argparse's
        parser = build_parser(command_of(words))
        args = parser.parse_args(words)
        if args.command is None:
            parser.print_help(sys.stderr)
            return int(Exit.USAGE)
    handler: Handler = args.handler
    try:
        timeout = args.request_timeout or None
        with Client(args.socket, timeout=timeout, connect_timeout=args.connect_timeout) as client:
            return int(handler(client, args))
    except UsageError as exc:
        _fail(args, "usage", str(exc), Exit.USAGE)
    except errors.RequestTimeout as exc:
        message = f"{exc.message}; --request-timeout sets how long to wait"
        _fail(args, exc.code, message, Exit.TEMPFAIL)
    except errors.TaskdError as exc:
        message = exc.message
        if isinstance(exc, errors.PayloadInvalid) and getattr(args, "payload", "") is None:
            message += "; no --payload was given, so the task got {}: give one with --payload"
        _fail(args, exc.code, message, _EXIT_FOR_ERROR.get(type(exc), Exit.SOFTWARE))
    except KeyboardInterrupt:
        job_id = getattr(args, "waiting_for", None)
        if job_id is None:
            _fail(args, "interrupted", "interrupted", Exit.INTERRUPTED)
        _fail(
            args,
            "interrupted",
            f"interrupted; job {job_id} goes on in taskd: `taskctl wait {job_id}` waits for it "
            f"again, `taskctl cancel {job_id}` stops it",
            Exit.INTERRUPTED,
        )
    except BrokenPipeError:
        return int(Exit.OK)


def command() -> NoReturn:
    """The `taskctl` command: `main`, then an exit that leaves the interpreter's teardown
    out (freeing every module and object: ~15% of a command's CPU time, for nothing, as
    taskctl registers no exit handlers). Output is flushed first; a flush that fails (a
    full disk) is left to the interpreter's own exit to report, as without this."""
    try:
        code = main()
    except SystemExit as exc:
        if not isinstance(exc.code, int | None):
            raise  # a message to print: the interpreter's exit says it
        code = exc.code or 0
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        raise SystemExit(code) from None
    os._exit(code)


if __name__ == "__main__":
    command()
