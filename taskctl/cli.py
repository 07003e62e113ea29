"""`taskctl`: the command line of taskd. One function per command; exit codes are stable."""

from __future__ import annotations

import argparse
import contextlib
import enum
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import msgspec

from taskctl import errors
from taskctl.client import WAIT_MARGIN, Client
from taskd import __version__
from taskd.models import (
    FINISHED_STATUSES,
    JOB_STATUSES,
    counted,
    format_duration,
    parse_duration,
)
from taskd.protocol import client_socket_path

DEFAULT_REQUEST_TIMEOUT = 30.0


class Exit(enum.IntEnum):
    """taskctl's exit statuses."""

    OK = 0
    JOB_FAILED = 1  # the task ran and failed, or was cancelled
    USAGE = 2  # bad flags or arguments; --payload that is not JSON
    CONFLICT = 3  # the job's state does not allow it (e.g. cancel a finished job)
    NOT_FOUND = 4  # unknown task, job or schedule
    UNAVAILABLE = 7  # taskd is not reachable on the socket
    PAYLOAD_REJECTED = 65  # the payload does not match the task's schema
    SOFTWARE = 70  # taskd or taskctl misbehaved (protocol error, internal error)
    TEMPFAIL = 75  # taskd is busy, stopping, or its store failed, or did not answer in time
    PERMISSION = 77  # not allowed to use taskd (or this command)
    CONFIG = 78  # reload refused: the new configuration or a task file is broken
    TIMEOUT = 124  # `wait --timeout` ran out before the job ended
    INTERRUPTED = 130  # Ctrl-C, as shells report it (128 + SIGINT)


EXIT_HELP = """\
exit status:
    0  success
    1  the task ran and failed, or was cancelled (its error on stderr)
    2  usage error: bad flags or arguments, --payload that is not valid JSON
    3  the job's state does not allow this (e.g. cancel a job that already finished)
    4  unknown task, job or schedule
    7  taskd is not reachable (the message names the socket that was tried)
   65  the payload was rejected by the task's schema (the message names the field)
   70  internal or protocol error
   75  taskd is busy or stopping, its database failed, or it did not answer within
       --request-timeout: try again
   77  permission denied: ask for access to the socket
   78  reload refused: the new configuration or a task file is broken
  124  wait --timeout ran out before the job ended
  130  interrupted (Ctrl-C); a job that was started goes on in taskd
"""

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
        raise argparse.ArgumentTypeError(str(exc)) from None


def moment(text: str) -> float:
    """--at: an ISO-8601 time; without an offset it is local time. A time in the past is
    accepted (the job is due at once), with a warning."""
    import datetime as dt
    import time

    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: use ISO-8601 such as 2026-12-01T08:00:00+01:00"
        ) from None
    stamp = value.timestamp()
    if stamp < time.time():
        local = "" if value.tzinfo else f" (read as local time, {time.strftime('%Z')})"
        print(f"taskctl: --at {text}{local} is in the past: the job is due at once",
              file=sys.stderr)  # fmt: skip
    return stamp


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def statuses(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in JOB_STATUSES:
            raise argparse.ArgumentTypeError(
                f"unknown status {name!r}; choose from {', '.join(JOB_STATUSES)}"
            )
    return names


# -- commands ----------------------------------------------------------------------------


def cmd_list(client: Client, args: argparse.Namespace) -> Exit:
    tasks = client.list_tasks()
    return _show(args, tasks, lambda: _render().tasks_table(tasks))


def cmd_run(client: Client, args: argparse.Namespace) -> Exit:
    payload = read_payload(args.payload)
    # Started detached, then waited for: a Ctrl-C while waiting can name the job.
    outcome = client.run_job(
        args.task, payload, key=args.key, max_attempts=args.max_attempts, detach=True
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


def _follow(client: Client, job_id: int, timeout: float | None, say: Callable[[str], None]) -> Any:
    """Wait for the job's end, saying (on stderr) each failed attempt and when the next starts.

    Each `wait` returns at the job's end or at the next failed attempt (taskd tells it):
    no polling."""
    deadline = None if timeout is None else time.monotonic() + timeout
    reported = 0  # the highest attempt whose failure was shown
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            job = client.wait(job_id, left, after_attempt=reported)
        except errors.WaitTimeout as exc:  # said of the whole --timeout, not of its rest
            status = exc.data.get("status", "unfinished")
            spent = format_duration(timeout or 0.0)
            message = f"job {job_id} is still {status} after {spent}"
            raise errors.WaitTimeout(message, exc.data) from None
        if job.status in FINISHED_STATUSES:
            return job
        for error in job.errors:
            if error.kind != "retried" and error.attempt > reported:
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


def cmd_enqueue(client: Client, args: argparse.Namespace) -> Exit:
    payload = read_payload(args.payload)
    if args.delay is not None and args.at is not None:
        raise UsageError("give --delay or --at, not both")
    result = client.enqueue(
        args.task,
        payload,
        delay=args.delay,
        run_at=args.at,
        priority=args.priority,
        max_attempts=args.max_attempts,
        key=args.key,
    )
    if args.json:
        _render().print_json(result)
    else:
        print(result.job_id)
        if result.duplicate:
            print(
                f"taskctl: job {result.job_id} with key {args.key!r} is already pending or "
                "running; nothing new was enqueued",
                file=sys.stderr,
            )
    return Exit.OK


def cmd_job(client: Client, args: argparse.Namespace) -> Exit:
    job = client.job(args.id)
    return _show(args, job, lambda: _render().job_detail(job))


def cmd_jobs(client: Client, args: argparse.Namespace) -> Exit:
    wanted = [name for group in args.status or [] for name in group] or None
    if args.watch:
        fetch = lambda: client.jobs(status=wanted, task=args.task, limit=args.limit)  # noqa: E731
        with contextlib.suppress(KeyboardInterrupt):
            _live().watch_jobs(client, fetch, sys.stdout)
        return Exit.OK
    jobs = client.jobs(status=wanted, task=args.task, limit=args.limit, payloads=args.payloads)
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


# -- parser ------------------------------------------------------------------------------

Command = Callable[[Client, argparse.Namespace], Exit]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, told the terminal's width as argparse would find it, but
    without importing shutil (and, through it, compression modules) on every call."""

    def __init__(self, prog: str) -> None:
        try:
            width = int(os.environ["COLUMNS"])
        except (KeyError, ValueError):
            try:
                width = os.get_terminal_size(1).columns
            except (ValueError, OSError):
                width = 80
        super().__init__(prog, width=width - 2)


# The global options that take a value (so that the word after one is not the command).
VALUED_OPTIONS = ("--socket", "--connect-timeout", "--request-timeout")
NAME_HELP = "the task's name, as `taskctl list` shows it (e.g. jobs:send-email)"
ID_HELP = "a job id, as `taskctl enqueue` prints it or `taskctl jobs` lists it"
ATTEMPTS_HELP = "attempts before the job fails for good (default: the task's max_attempts, else {})"
EXAMPLES: dict[str, tuple[str, ...]] = {
    "list": ("taskctl list", "taskctl list --json"),
    "run": (
        "taskctl run hello",
        "taskctl run jobs:send-email --payload @email.json",
        """echo '{"name": "Ada"}' | taskctl run hello --payload -""",
    ),
    "enqueue": (
        "taskctl enqueue jobs:send-email --delay 5m --payload "
        """'{"to": "ada@example.com", "subject": "Hi", "body": "Welcome!"}'""",
        "taskctl enqueue reports:daily --at 2027-01-04T08:00:00+01:00 --key 2027-01-04",
    ),
    "job": ("taskctl job 42",),
    "jobs": (
        "taskctl jobs --status failed --task jobs:send-email",
        "taskctl jobs --json --payloads --limit 10",
        "taskctl jobs --watch --status running,pending",
    ),
    "logs": ("taskctl logs 42", "taskctl logs 42 -f"),
    "top": ("taskctl top",),
    "wait": ("taskctl wait 42 --timeout 1m",),
    "why": ("taskctl why 42", "taskctl why 42 --json"),
    "cancel": ("taskctl cancel 42",),
    "retry": ("taskctl retry 42",),
    "status": ("taskctl status", "taskctl status --json"),
    "prune": ("taskctl prune --older-than 1d",),
    "reload": ("taskctl reload",),
    "metrics": ("taskctl metrics", "taskctl metrics | grep '^taskd_queue_depth'"),
    "completion": (
        "source <(taskctl completion bash)        # in ~/.bashrc",
        "source <(taskctl completion zsh)         # in ~/.zshrc",
        "taskctl completion fish | source         # in ~/.config/fish/config.fish",
    ),
    "schedules": (
        "taskctl schedules",
        "taskctl schedules pause nightly-index",
        "taskctl schedules trigger '*/5 * * * *'",
    ),
}


def _epilog(examples: tuple[str, ...]) -> str:
    lines = "".join(f"\n  {line}" for line in examples)
    return (
        f"example{'s' if len(examples) > 1 else ''}:{lines}\n\nexit statuses: see `taskctl --help`"
    )


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The global options (--socket, --json, the timeouts), before or after the command.

    Below the top level they default to SUPPRESS, so that a subcommand without them keeps
    what was given before it.
    """

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=default(None),
        help=f"taskd's control socket (default: $TASKD_SOCKET or {client_socket_path()})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON on stdout, and only JSON (errors too, on stderr)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=duration,
        default=default(0.0),
        metavar="DUR",
        help="keep trying this long while taskd is starting (default: fail at once)",
    )
    parser.add_argument(
        "--request-timeout",
        type=duration,
        default=default(DEFAULT_REQUEST_TIMEOUT),
        metavar="DUR",
        help="give up (exit 75) when taskd has not answered a call within this long "
        f"(default: {DEFAULT_REQUEST_TIMEOUT:g}s; 0: no limit). It does not cut short a `run` "
        "waiting for its job, nor `wait`, which gives up after its own --timeout plus "
        f"{WAIT_MARGIN:g}s",
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """taskctl's parser; with `only`, with just that command (a command line names one, and
    building the other fifteen would cost it milliseconds)."""

    def wanted(name: str) -> bool:
        return only is None or name == only

    parser = argparse.ArgumentParser(
        prog="taskctl",
        description="Control taskd: list and run tasks, enqueue jobs, inspect them.",
        epilog=EXIT_HELP,
        formatter_class=_Formatter,
    )
    _global_options(parser, top=True)
    parser.add_argument("--version", action="version", version=f"taskctl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Command, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            description=help,
            epilog=_epilog(EXAMPLES[name]),
            formatter_class=_Formatter,
        )
        _global_options(sub, top=False)
        sub.set_defaults(handler=handler)
        return sub

    if wanted("list"):
        command("list", cmd_list, "list the tasks taskd has loaded")

    if wanted("run"):
        run = command(
            "run", cmd_run, "run a task (or join its running execution) and print its result"
        )
        run.add_argument("task", metavar="NAME", help=NAME_HELP)
        _payload_argument(run)
        run.add_argument(
            "--detach", action="store_true", help="print the job id and return at once"
        )
        run.add_argument(
            "--key", help="single-flight key: runs with the same key share one execution"
        )
        run.add_argument(
            "--max-attempts", type=positive_int, metavar="N", help=ATTEMPTS_HELP.format(1)
        )

    if wanted("enqueue"):
        enqueue = command("enqueue", cmd_enqueue, "add a job to the queue and print its id")
        enqueue.add_argument("task", metavar="NAME", help=NAME_HELP)
        _payload_argument(enqueue)
        enqueue.add_argument(
            "--delay", type=duration, metavar="DUR", help="run after 30s, 5m, 2h ..."
        )
        enqueue.add_argument(
            "--at",
            type=moment,
            metavar="TIME",
            help="run at an ISO-8601 time (local time without an offset)",
        )
        enqueue.add_argument(
            "--priority", type=int, default=0, metavar="N", help="lower runs first (default 0)"
        )
        enqueue.add_argument(
            "--max-attempts", type=positive_int, metavar="N", help=ATTEMPTS_HELP.format(3)
        )
        enqueue.add_argument(
            "--key", metavar="K", help="unique key: no second pending or running job with this key"
        )

    if wanted("job"):
        job = command("job", cmd_job, "show one job, with the errors of all its attempts")
        job.add_argument("id", type=int, metavar="ID", help=ID_HELP)

    if wanted("jobs"):
        jobs = command("jobs", cmd_jobs, "list recent jobs, newest first")
        jobs.add_argument(
            "--status",
            type=statuses,
            action="append",
            metavar="S",
            help=f"only these statuses (comma-separated or repeated): {', '.join(JOB_STATUSES)}",
        )
        jobs.add_argument("--task", metavar="NAME", help="only jobs of this task")
        jobs.add_argument("--limit", type=positive_int, default=50, metavar="N", help="default 50")
        jobs.add_argument(
            "--payloads",
            action="store_true",
            help="with --json: include each job's payload and result (`taskctl job ID` shows them)",
        )
        jobs.add_argument(
            "--watch", action="store_true", help="redraw the table as jobs change (Ctrl-C stops)"
        )

    if wanted("logs"):
        logs = command("logs", cmd_logs, "print the lines a job wrote with ctx.logger")
        logs.add_argument("id", type=int, metavar="ID", help=ID_HELP)
        logs.add_argument(
            "-f",
            "--follow",
            action="store_true",
            help="print new lines as they come, until the job ends",
        )

    if wanted("top"):
        command(
            "top",
            cmd_top,
            "full-screen view: running jobs and their progress, queues, failures, next ticks",
        )

    if wanted("wait"):
        wait = command("wait", cmd_wait, "wait for a job to end and print its result")
        wait.add_argument("id", type=int, metavar="ID", help=ID_HELP)
        wait.add_argument("--timeout", type=duration, metavar="DUR", help="give up after this long")

    if wanted("why"):
        why = command(
            "why", cmd_why, "say why a job is not running yet (or what it did), with its timeline"
        )
        why.add_argument("id", type=int, metavar="ID", help=ID_HELP)

    if wanted("cancel"):
        cancel = command("cancel", cmd_cancel, "cancel a pending or running job")
        cancel.add_argument("id", type=int, metavar="ID", help=ID_HELP)

    if wanted("retry"):
        retry = command("retry", cmd_retry, "put a failed or cancelled job back in the queue")
        retry.add_argument("id", type=int, metavar="ID", help=ID_HELP)

    if wanted("status"):
        command("status", cmd_status, "show the daemon, its queue and its running jobs")

    if wanted("prune"):
        prune = command(
            "prune", cmd_prune, "delete finished jobs now (default: past their retention)"
        )
        prune.add_argument(
            "--older-than",
            type=duration,
            metavar="DUR",
            help="delete finished jobs older than this (1d, 12h ...), whatever the retention",
        )

    if wanted("reload"):
        command("reload", cmd_reload, "re-read taskd.toml and the tasks folder (like SIGHUP)")

    if wanted("metrics"):
        command(
            "metrics", cmd_metrics, "print the Prometheus metrics (jobs, durations, retries, ticks)"
        )

    if wanted("schedules"):
        schedules = command(
            "schedules",
            cmd_schedules,
            "list the schedules (next and last tick, last outcome, coalesced ticks); "
            "or pause, resume or trigger one",
        )
        actions = schedules.add_subparsers(dest="action", metavar="[ACTION]")
        for name, handler, help in (
            ("pause", cmd_schedules_pause, "stop a schedule ticking (remembered across restarts)"),
            ("resume", cmd_schedules_resume, "let a paused schedule tick again, from now on"),
            ("trigger", cmd_schedules_trigger, "fire a schedule now; its regular ticks stay"),
        ):
            action = actions.add_parser(
                name,
                help=help,
                usage=f"taskctl schedules {name} [-h] ID|CRON",
                description=f"{help}. Name the schedule by its id or by its cron expression "
                "(quoted, so that the shell keeps it whole).",
                epilog=_epilog((f"taskctl schedules {name} nightly-index",)),
                formatter_class=_Formatter,
            )
            _global_options(action, top=False)
            action.add_argument("schedule", nargs="+", metavar="ID|CRON")
            action.set_defaults(handler=handler)

    if wanted("completion"):
        completion = command(
            "completion",
            cmd_completion,
            "print a shell completion script: commands, options, task names and job ids",
        )
        completion.add_argument("shell", choices=["bash", "zsh", "fish"], metavar="SHELL",
                                help="bash, zsh or fish")  # fmt: skip

    return parser


def _payload_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--payload",
        metavar="JSON",
        help="the payload: JSON text, @FILE with JSON, or - to read JSON from stdin "
        "(without it the task gets {})",
    )


def command_of(words: list[str]) -> str | None:
    """The command a command line names, if it names a known one: the first word that is
    not a global option or its value."""
    remaining = iter(words)
    for word in remaining:
        if word in VALUED_OPTIONS:
            next(remaining, None)
        elif not word.startswith("-"):
            return word if word in EXAMPLES else None
    return None


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["__complete"]:  # what the completion scripts ask
        from taskctl.completion import complete

        print("\n".join(complete(build_parser(), words[1:])))
        return int(Exit.OK)
    parser = build_parser(command_of(words))
    args = parser.parse_args(words)
    if args.command is None:
        parser.print_help(sys.stderr)
        return int(Exit.USAGE)
    handler: Command = args.handler
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


if __name__ == "__main__":
    sys.exit(main())
