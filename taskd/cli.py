"""`taskd`: parse the command line, set up logging, run the daemon."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path

import msgspec

import taskd
from taskd.config import (
    Config,
    ConfigError,
    Paths,
    config_path_from_environment,
    database_url,
    load_config,
)
from taskd.config import resolve_paths as resolve_config_paths
from taskd.logqueue import QueuedLog
from taskd.models import counted

EX_CONFIG = 78  # sysexits: configuration error; the unit does not restart on it

DESCRIPTION = """\
taskd runs the tasks in a tasks folder: on request from taskctl or the Python client, from
a durable job queue, and on cron schedules. Every execution is a job in its database: SQLite,
or PostgreSQL shared by several daemons.

Flags override taskd.toml, which comes from --config, $TASKD_CONFIG, or taskd.toml in
systemd's $CONFIGURATION_DIRECTORY. Signals: SIGTERM/SIGINT stop (running jobs get
grace_period to finish, then go back to the queue); SIGHUP reloads the configuration and
the tasks folder.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskd",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 stopped cleanly, 1 failed, 2 usage error, 78 bad configuration"
        " or task files",
    )
    parser.add_argument("--config", metavar="FILE", help="configuration file (taskd.toml)")
    parser.add_argument("--tasks", metavar="DIR", help="tasks folder (default: ./tasks)")
    parser.add_argument(
        "--database",
        metavar="PATH|URL",
        help="SQLite database file (or sqlite:///PATH), or postgresql://user@host/dbname",
    )
    parser.add_argument("--socket", metavar="PATH", help="control socket to listen on")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="default: info"
    )
    parser.add_argument(
        "--allow-empty-store",
        action="store_true",
        help="start even if the database taskd had created is now missing or empty (its jobs"
        " are lost): begin again with an empty job store",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="load the configuration and the tasks, report problems, and exit",
    )
    parser.add_argument("--version", action="version", version=f"taskd {taskd.__version__}")
    return parser


class ConfigSource:
    """Reads taskd.toml and applies the command-line flags on top, now and at each reload."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._file = args.config or config_path_from_environment()
        cwd = Path.cwd()
        # Flags are relative to where taskd was started; the file's paths to the file.
        self._overrides = {
            name: str((cwd / value).resolve()) if name in ("tasks", "socket") else value
            for name in ("tasks", "database", "socket", "log_level")
            if (value := getattr(args, name)) is not None
        }
        if args.database is not None:
            self._overrides["database"] = database_url(args.database, cwd)

    def __call__(self) -> tuple[Config, Paths]:
        config, base = load_config(self._file)
        if self._overrides:
            config = msgspec.structs.replace(config, **self._overrides)
        return config, resolve_config_paths(config, base)


class _JournalFormatter(logging.Formatter):
    """`<priority>` prefixes that journald turns into log levels; it adds the time itself."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 2)
        return f"<{priority}>{super().format(record)}"


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the task, job and
    traceback where there are any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in ("task", "job_id"):
            if (value := getattr(record, field, None)) is not None:
                entry[field] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


_JsonFormatter.converter = time.gmtime


def setup_logging(level: str, log_format: str = "text") -> None:
    """taskd's log on its stderr, through a queue that never blocks (taskd.logqueue)."""
    handler = QueuedLog(sys.stderr.fileno())
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):  # journald adds the time and the unit itself
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for replaced in root.handlers:
        replaced.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = ConfigSource(args)
    try:
        config, paths = source()
    except ConfigError as exc:
        print(f"taskd: {exc}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(config.log_level, config.log_format)
    if args.check:
        return check(config, paths)

    import uvloop

    from taskd.daemon import Daemon, StartupError
    from taskd.output import routed_output
    from taskd.tracing import start_tracing

    try:
        tracing = start_tracing(config.otel)  # None, and nothing imported, unless it traces
    except ConfigError as exc:
        print(f"taskd: {exc}", file=sys.stderr)
        return EX_CONFIG
    daemon = Daemon(
        source, config, paths, allow_empty_store=args.allow_empty_store, tracing=tracing
    )
    _quiet_replies_after_the_loop()
    try:
        with routed_output():
            status = uvloop.run(daemon.run())
    except StartupError as exc:  # the daemon has logged why
        status = exc.exit_code
    if tracing is not None and not tracing.shutdown():  # the spans still queued go out
        logging.getLogger("taskd").warning(
            "the last spans could not be sent within a few seconds; exiting without them"
        )
        logging.shutdown()
        os._exit(status)  # the exporter's threads may still be trying: not waited for
    if (threads := daemon.threads_alive()) > 0:
        # Plain-function tasks cannot be interrupted; their jobs are back in the queue, and
        # waiting for the threads could take forever.
        logging.getLogger("taskd").warning(
            "%s %s still running; exiting without them",
            counted(threads, "task thread"),
            "is" if threads == 1 else "are",
        )
        logging.shutdown()
        os._exit(status)
    if _threads_left(grace=1.0):
        # A database call of a start-up that was stopped, waiting for another process's
        # lock (for up to busy_timeout): it wrote nothing, and a stop must not wait for it.
        logging.shutdown()
        os._exit(status)
    return status


def _quiet_replies_after_the_loop() -> None:
    """A thread whose call ends once the event loop has closed (a database call of a
    start-up that was stopped, a task thread) cannot hand its reply back: its "Event loop is
    closed" is expected, nobody waits for the reply, and it is no traceback in the log."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        error = args.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            name = args.thread.name if args.thread is not None else "a thread"
            logging.getLogger("taskd").debug("%s ended after the event loop closed", name)
            return
        previous(args)

    threading.excepthook = hook


def _threads_left(grace: float) -> bool:
    """Whether threads the interpreter would wait for at exit still run after `grace` s."""
    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return True
    return False


def check(config: Config, paths: Paths) -> int:
    """`taskd --check`: would this configuration start?"""
    from taskd.access import AccessPolicy, group_id
    from taskd.http.settings import load_settings
    from taskd.schedules import load_schedules
    from taskd.tasks import TaskLoadError
    from taskd.tracing import check_tracing
    from taskd.webhooks import load_tasks_and_webhooks

    try:
        tracing = check_tracing(config.otel)
        registry, _ = load_tasks_and_webhooks(paths.tasks, config)
        schedules = load_schedules(config, registry)
        AccessPolicy.from_config(config)
        if config.sqlite.group is not None:
            group_id(config.sqlite.group, "[sqlite] group")
        if config.http is not None:
            load_settings(config.http)
    except (TaskLoadError, ConfigError) as exc:
        print(f"taskd: {exc}", file=sys.stderr)
        return EX_CONFIG
    tasks, timed = counted(len(registry), "task"), counted(len(schedules), "schedule")
    print(f"configuration ok: {tasks} in {paths.tasks}, {timed}")
    for task in registry:
        print(f"  {task.name}")
    for schedule in schedules:
        name = f'"{schedule.id}"' + (
            f" {schedule.expression}" if schedule.id != schedule.expression else ""
        )
        print(f"  schedule {name} ({schedule.timezone}): {', '.join(schedule.tasks)}")
    if tracing is not None:
        print(tracing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
