"""`taskctl`: the command line of taskd. One function per command; exit codes are stable."""

from __future__ import annotations

import argparse
import enum
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import msgspec

from taskctl import errors
from taskctl.client import Client
from taskd.models import JOB_STATUSES, parse_duration
from taskd.protocol import client_socket_path


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
    TEMPFAIL = 75  # taskd is busy, stopping, or its store failed; try again
    PERMISSION = 77  # not allowed to use taskd (or this command)
    CONFIG = 78  # reload refused: the new configuration or a task file is broken
    TIMEOUT = 124  # `wait --timeout` ran out before the job ended


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
   75  taskd is busy or stopping, or its database failed: try again
   77  permission denied: ask for access to the socket
   78  reload refused: the new configuration or a task file is broken
  124  wait --timeout ran out before the job ended
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
    errors.JobFailed: Exit.JOB_FAILED,
}


class UsageError(Exception):
    pass


def _fail(message: str, code: Exit) -> NoReturn:
    print(f"taskctl: {message}", file=sys.stderr)
    raise SystemExit(int(code))


# -- argument types ----------------------------------------------------------------------


def read_payload(spec: str | None) -> Any:
    """--payload: JSON text, @FILE holding JSON, or - for JSON on stdin."""
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
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise UsageError(f"{source} is not valid JSON: {exc}") from None


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def moment(text: str) -> float:
    """--at: an ISO-8601 time; without an offset it is local time."""
    import datetime as dt

    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: use ISO-8601 such as 2026-12-01T08:00:00+01:00"
        ) from None
    return value.timestamp()


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
    outcome = client.run_job(
        args.task, payload, key=args.key, max_attempts=args.max_attempts, detach=args.detach
    )
    job = outcome.job
    if outcome.joined:
        print(
            f"taskctl: joined job {job.id} of {job.task}, which was already "
            f"{'running' if job.started_at else 'pending'}; its payload was used, not yours",
            file=sys.stderr,
        )
    render = _render()
    if args.detach:
        if args.json:
            render.print_json({"id": job.id, "joined": outcome.joined, "status": job.status})
        else:
            print(job.id)
        return Exit.OK
    if args.json:
        render.print_json(job)
    elif job.status == "succeeded":
        print(render.result_text(job.result))
    return _job_exit(job)


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
        _render().print_json({"id": result.job_id, "duplicate": result.duplicate})
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
    jobs = client.jobs(status=wanted, task=args.task, limit=args.limit, payloads=args.payloads)
    return _show(args, jobs, lambda: _render().jobs_table(jobs))


def cmd_wait(client: Client, args: argparse.Namespace) -> Exit:
    job = client.wait(args.id, args.timeout)
    render = _render()
    if args.json:
        render.print_json(job)
    elif job.status == "succeeded":
        print(render.result_text(job.result))
    return _job_exit(job)


def cmd_cancel(client: Client, args: argparse.Namespace) -> Exit:
    job = client.cancel(args.id)
    return _show(args, job, lambda: f"job {job.id} {job.task} cancelled")


def cmd_retry(client: Client, args: argparse.Namespace) -> Exit:
    job = client.retry(args.id)
    return _show(
        args,
        job,
        lambda: f"job {job.id} {job.task} is pending again with {job.max_attempts} attempts",
    )


def cmd_status(client: Client, args: argparse.Namespace) -> Exit:
    status = client.status()
    return _show(args, status, lambda: _render().status_detail(status))


def cmd_prune(client: Client, args: argparse.Namespace) -> Exit:
    deleted = client.prune(args.older_than)
    return _show(args, {"deleted": deleted}, lambda: f"deleted {deleted} finished jobs")


def cmd_reload(client: Client, args: argparse.Namespace) -> Exit:
    result = client.reload()
    return _show(
        args, result, lambda: f"reloaded: {result.tasks} tasks, {result.schedules} schedules"
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
        next_tick = _render().local_time(schedule.next_tick)
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
    attempts = f"after {job.attempts} attempt{'s' if job.attempts != 1 else ''}"
    print(f"taskctl: job {job.id} {job.task} {job.status} {attempts}: {job.error}", file=sys.stderr)
    return Exit.JOB_FAILED


def _render() -> Any:
    from taskctl import render

    return render


# -- parser ------------------------------------------------------------------------------

Command = Callable[[Client, argparse.Namespace], Exit]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskctl",
        description="Control taskd: list and run tasks, enqueue jobs, inspect them.",
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=f"taskd's control socket (default: $TASKD_SOCKET or {client_socket_path()})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON on stdout, and only JSON")
    parser.add_argument(
        "--connect-timeout",
        type=duration,
        default=0.0,
        metavar="DUR",
        help="keep trying this long while taskd is starting (default: fail at once)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Command, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            description=help,
            epilog=EXIT_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler)
        return sub

    command("list", cmd_list, "list the tasks taskd has loaded")

    run = command("run", cmd_run, "run a task (or join its running execution) and print its result")
    run.add_argument("task", metavar="NAME")
    _payload_argument(run)
    run.add_argument("--detach", action="store_true", help="print the job id and return at once")
    run.add_argument("--key", help="single-flight key: runs with the same key share one execution")
    run.add_argument("--max-attempts", type=positive_int, metavar="N")

    enqueue = command("enqueue", cmd_enqueue, "add a job to the queue and print its id")
    enqueue.add_argument("task", metavar="NAME")
    _payload_argument(enqueue)
    enqueue.add_argument("--delay", type=duration, metavar="DUR", help="run after 30s, 5m, 2h ...")
    enqueue.add_argument("--at", type=moment, metavar="TIME", help="run at an ISO-8601 time")
    enqueue.add_argument(
        "--priority", type=int, default=0, metavar="N", help="lower runs first (default 0)"
    )
    enqueue.add_argument("--max-attempts", type=positive_int, metavar="N")
    enqueue.add_argument(
        "--key", metavar="K", help="unique key: no second pending or running job with this key"
    )

    job = command("job", cmd_job, "show one job, with the errors of all its attempts")
    job.add_argument("id", type=int, metavar="ID")

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

    wait = command("wait", cmd_wait, "wait for a job to end and print its result")
    wait.add_argument("id", type=int, metavar="ID")
    wait.add_argument("--timeout", type=duration, metavar="DUR", help="give up after this long")

    cancel = command("cancel", cmd_cancel, "cancel a pending or running job")
    cancel.add_argument("id", type=int, metavar="ID")

    retry = command("retry", cmd_retry, "put a failed or cancelled job back in the queue")
    retry.add_argument("id", type=int, metavar="ID")

    command("status", cmd_status, "show the daemon, its queue and its running jobs")

    prune = command("prune", cmd_prune, "delete finished jobs now (default: past their retention)")
    prune.add_argument("--older-than", type=duration, metavar="DUR")

    command("reload", cmd_reload, "re-read taskd.toml and the tasks folder (like SIGHUP)")

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
            epilog=EXIT_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        action.add_argument("schedule", nargs="+", metavar="ID|CRON")
        action.set_defaults(handler=handler)
    return parser


def _payload_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--payload",
        metavar="JSON",
        help="the payload: JSON text, @FILE with JSON, or - to read JSON from stdin",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Command = args.handler
    try:
        with Client(args.socket, connect_timeout=args.connect_timeout) as client:
            return int(handler(client, args))
    except UsageError as exc:
        _fail(str(exc), Exit.USAGE)
    except errors.TaskdError as exc:
        _fail(exc.message, _EXIT_FOR_ERROR.get(type(exc), Exit.SOFTWARE))
    except KeyboardInterrupt:
        _fail("interrupted; the job itself goes on in taskd", Exit.TEMPFAIL)
    except BrokenPipeError:
        return int(Exit.OK)


if __name__ == "__main__":
    sys.exit(main())
