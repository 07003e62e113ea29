"""taskd.toml: the daemon's configuration, declared once as a frozen Struct, and default paths."""

from __future__ import annotations

import datetime as dt
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import msgspec.inspect

from taskd.models import (
    SingleFlight,
    check_limit_key,
    did_you_mean,
    parse_duration,
    parse_rate,
)
from taskd.protocol import DEFAULT_MAX_FRAME, default_socket_path


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the problem."""


# Marks a setting that the running daemon cannot change: a reload that changes it says so,
# and it takes effect at the next restart.
RESTART = msgspec.Meta(extra={"restart": True})


def restart_only(table: type[msgspec.Struct]) -> tuple[str, ...]:
    """The settings of `table` (Config, HttpConfig) marked RESTART, in their order."""
    return tuple(
        field.name
        for field in msgspec.inspect.type_info(table).fields  # type: ignore[attr-defined]
        if isinstance(field.type, msgspec.inspect.Metadata)
        and (field.type.extra or {}).get("restart")
    )


class Seconds(float):
    """A duration in the configuration: seconds as a number, or a string such as "5m"."""


class TaskOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-task overrides of what `define_task` set, in a `[task."name"]` table."""

    timeout: Seconds | None = None
    max_attempts: int | None = None
    backoff: Seconds | None = None
    max_backoff: Seconds | None = None
    concurrency: int | None = None
    rate_limit: str | None = None  # "10/s", "600/m", "100/15m": see README, "Flow control"
    unique_for: Seconds | None = None  # an enqueue's key stays taken this long
    single_flight: SingleFlight | None = None  # "task", "payload" or "none"
    limits: list[str] | None = None  # shared limits ([limits.NAME]) its jobs also count against
    # A payload field ("customer_id", dotted for a nested one): concurrency and rate_limit
    # count per value of it, and the values take turns.
    limit_key: str | None = None
    on_failure: str | None = None  # a task enqueued when a job fails after its last attempt
    on_success: str | None = None  # a task enqueued when a job succeeds

    def __post_init__(self) -> None:
        if self.rate_limit is not None:
            parse_rate(self.rate_limit)
        if self.limit_key is not None:
            check_limit_key(self.limit_key)
        for field in ("max_attempts", "concurrency"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"{field} must be at least 1, got {value}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be more than 0 seconds, got {self.timeout}")


class SharedLimitOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A `[limits.NAME]` table: a budget several tasks share (`limits = ["NAME"]` on each),
    such as one external API's. See README, "Flow control"."""

    rate: str | None = None  # "25/s": at most that many of their attempts start per period
    concurrency: int | None = None  # at most that many of their jobs run at once

    def __post_init__(self) -> None:
        if self.rate is None and self.concurrency is None:
            raise ValueError('give rate (such as "25/s"), concurrency (such as 4), or both')
        if self.rate is not None:
            parse_rate(self.rate)
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")


class Retention(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How long finished jobs are kept before the background pruning deletes them."""

    succeeded: Seconds = Seconds(7 * 86400)
    failed: Seconds = Seconds(30 * 86400)
    cancelled: Seconds = Seconds(30 * 86400)


MAX_JITTER = 86400.0  # a day: a longer spread is a different schedule


class Schedule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A `[[schedule]]` table: the long form of a `[scheduled_tasks]` entry."""

    cron: str
    tasks: list[str] | str
    id: str | None = None
    timezone: str | None = None
    payload: dict[str, Any] | None = None
    catch_up: Literal["skip", "latest", "all"] = "skip"
    max_catch_up: int = 10
    enabled: bool = True
    # Each tick's jobs are due at an offset in [0, jitter) after the tick, the same on every
    # daemon (derived from the schedule's id and the tick): spreads the load of many daemons
    # or schedules on one minute, like systemd's RandomizedDelaySec=.
    jitter: Seconds | None = None

    def __post_init__(self) -> None:
        if self.jitter is not None and not 0 <= self.jitter <= MAX_JITTER:
            raise ValueError(f"jitter must be 0 to 1 day, got {self.jitter:g} s")
        if self.max_catch_up < 1:
            raise ValueError(f"max_catch_up must be at least 1, got {self.max_catch_up}")


WEBHOOK_EVENTS = (
    "job.failed",
    "job.succeeded",
    "job.cancelled",
    "batch.finished",
    "schedule.missed",
)


class Webhook(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A `[[webhook]]` table: where to POST which events, signed with the secret in a file."""

    url: str
    events: list[str]
    secret_file: str
    tasks: list[str] = []  # fnmatch patterns of task names; none: every task's events

    def __post_init__(self) -> None:
        scheme = self.url.partition("://")[0] if "://" in self.url else ""
        if scheme not in ("http", "https") or not self.url.partition("://")[2].strip("/"):
            raise ValueError(
                f"url {self.url!r}: only http:// and https:// URLs, such as "
                '"https://hooks.example.com/taskd"'
            )
        if not self.events:
            raise ValueError(f"events is empty; name some of {', '.join(WEBHOOK_EVENTS)}")
        for event in self.events:
            if event not in WEBHOOK_EVENTS:
                raise ValueError(
                    f"unknown event {event!r}{did_you_mean(event, WEBHOOK_EVENTS)}"
                    f" (events: {', '.join(WEBHOOK_EVENTS)})"
                )


class SqliteOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[sqlite]`: how the embedded store trades durability for speed."""

    # "full" syncs every commit to disk: an acknowledged job survives a power cut.
    # "normal" survives a crash of taskd (kill -9) but may lose the last commits on power loss.
    synchronous: Literal["full", "normal"] = "full"
    busy_timeout: Seconds = Seconds(5)  # how long a write waits for a lock held by another
    # The group that may read the database's files (0640, e.g. for backups); none: 0600.
    group: str | None = None


class PostgresOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[postgres]`: where the job store lives in a PostgreSQL database, and its connections."""

    schema: str = "taskd"  # the PostgreSQL schema of taskd's tables, created if missing
    pool_size: int = 8  # connections for reads and writes (plus one that listens)
    connect_timeout: Seconds = Seconds(10)  # a connection attempt gives up after this

    def __post_init__(self) -> None:
        if not SCHEMA_NAME.fullmatch(self.schema):
            raise ValueError(
                f"schema {self.schema!r}: use 1 to 63 lowercase letters, digits and _, "
                "starting with a letter or _"
            )
        if self.pool_size < 2:
            raise ValueError(f"pool_size must be at least 2, got {self.pool_size}")
        if self.connect_timeout <= 0:
            raise ValueError("connect_timeout must be more than 0 seconds")


# `scheme://rest`: a database URL rather than a file path.
_URL = re.compile(r"([a-z][a-z0-9+.-]*)://(.*)", re.DOTALL)
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres")
POSTGRES_SCHEMES = ("postgresql", "postgres")
# A PostgreSQL schema of taskd's tables ([postgres] schema, taskd.pg's `schema`).
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# A node id names a daemon on the jobs it runs (`id/N`); it must survive that form.
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,99}")


class HttpConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[http]`: the optional HTTP API (no table, no listener). See README.md, "HTTP API"."""

    listen: Annotated[str, RESTART]  # "127.0.0.1:8080", "[::1]:8080" or "unix:/run/taskd/http.sock"
    tokens: list[str] = []  # Bearer tokens with full access (on a TCP address)
    readonly_tokens: list[str] = []  # Bearer tokens that may list and read, not change
    tokens_file: str | None = None  # more tokens, one per line; "readonly TOKEN" for read-only
    max_body_size: Annotated[int, RESTART] = 4 * 1024 * 1024  # bytes; bigger bodies get 413
    # Half of them for connections that have shown no token yet.
    max_connections: Annotated[int, RESTART] = 256
    read_timeout: Annotated[Seconds, RESTART] = Seconds(30)  # a request arrives whole within
    # Its line and headers within this of its first byte.
    header_timeout: Annotated[Seconds, RESTART] = Seconds(5)
    # A connection waiting for a request is closed after this.
    keepalive_timeout: Annotated[Seconds, RESTART] = Seconds(5)
    # `GET /events` streams open at once (each holds a connection with a token; one such
    # connection is always left for other requests).
    max_event_streams: Annotated[int, RESTART] = 32
    # A stream with nothing to say sends a comment this often, so that proxies keep it open.
    event_heartbeat: Annotated[Seconds, RESTART] = Seconds(15)
    # The web dashboard under /ui/ (README, "Dashboard").
    dashboard: Annotated[bool, RESTART] = True
    # A dashboard session not used for this long is signed out.
    session_idle: Seconds = Seconds(30 * 60)
    # Sessions held at once; past that, signing in signs out the least recently used one.
    max_sessions: Annotated[int, RESTART] = 64
    # Proxies (IP addresses) whose `X-Forwarded-Proto: https` marks the session cookie Secure.
    trusted_proxies: list[str] = []

    def __post_init__(self) -> None:
        if not self.listen.strip():
            raise ValueError("listen must not be empty")
        if self.max_body_size < 1024:
            raise ValueError(f"max_body_size must be at least 1024 bytes, got {self.max_body_size}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")
        if self.max_event_streams < 0:
            raise ValueError(f"max_event_streams must be 0 or more, got {self.max_event_streams}")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {self.max_sessions}")
        for name in (
            "read_timeout",
            "header_timeout",
            "keepalive_timeout",
            "event_heartbeat",
            "session_idle",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be more than 0 seconds")

    def resolved(self, base: Path) -> HttpConfig:
        """The same settings with relative paths (a unix socket, the tokens file) from `base`."""
        listen, tokens_file = self.listen, self.tokens_file
        if listen.startswith("unix:"):
            listen = "unix:" + os.path.abspath(base / listen.removeprefix("unix:"))
        if tokens_file is not None:
            tokens_file = os.path.abspath(base / tokens_file)
        return msgspec.structs.replace(self, listen=listen, tokens_file=tokens_file)


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything taskd.toml can say. Relative paths are relative to the file's folder."""

    tasks: str = "tasks"
    # A file path or a URL: sqlite:///PATH, postgresql://HOST/DB.
    database: Annotated[str | None, RESTART] = None
    # This daemon's name in the job store; default: its host and socket.
    node_id: Annotated[str | None, RESTART] = None
    socket: Annotated[str | None, RESTART] = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Annotated[Literal["text", "json"], RESTART] = "text"  # json: an object a line
    workers: Annotated[int, RESTART] = 16
    grace_period: Seconds = Seconds(30)
    lease: Annotated[Seconds, RESTART] = Seconds(60)
    quarantine_after: int = 3
    max_frame_size: Annotated[int, RESTART] = DEFAULT_MAX_FRAME
    max_connections: Annotated[int, RESTART] = 256
    max_connections_per_user: Annotated[int, RESTART] = 32
    read_timeout: Annotated[Seconds, RESTART] = Seconds(30)
    idle_timeout: Annotated[Seconds, RESTART] = Seconds(300)
    max_stuck_threads: Annotated[int, RESTART] = 16
    timezone: str = "UTC"
    retention: Retention = Retention()
    sqlite: Annotated[SqliteOptions, RESTART] = SqliteOptions()
    postgres: Annotated[PostgresOptions, RESTART] = PostgresOptions()
    task: dict[str, TaskOptions] = {}
    limits: dict[str, SharedLimitOptions] = {}  # shared limits, by name: [limits.NAME]
    scheduled_tasks: dict[str, list[str] | str] = {}
    schedule: list[Schedule] = []
    socket_group: Annotated[str | None, RESTART] = None
    allow_users: list[str | int] = []
    allow_groups: list[str | int] = []
    readonly_users: list[str | int] = []
    readonly_groups: list[str | int] = []
    http: HttpConfig | None = None  # no [http] table: no HTTP listener
    # Traces (the otel extra): true, false, or absent: on when OTEL_* variables name an
    # exporter or an OTLP endpoint (README, "Tracing (OpenTelemetry)").
    otel: Annotated[bool | None, RESTART] = None
    webhook: list[Webhook] = []  # README.md, "Signed webhooks"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.quarantine_after < 1:
            raise ValueError(f"quarantine_after must be at least 1, got {self.quarantine_after}")
        if not 1024 <= self.max_frame_size <= 1 << 31:
            raise ValueError("max_frame_size must be between 1024 and 2147483648 bytes")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")
        if self.lease < 1:
            raise ValueError(f"lease must be at least 1 second, got {self.lease}")
        if self.read_timeout <= 0:
            raise ValueError("read_timeout must be more than 0 seconds")
        if self.max_connections_per_user < 1:
            raise ValueError(
                f"max_connections_per_user must be at least 1, got {self.max_connections_per_user}"
            )
        if self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be more than 0 seconds")
        if self.max_stuck_threads < 0:
            raise ValueError(f"max_stuck_threads must be 0 or more, got {self.max_stuck_threads}")
        url = _URL.fullmatch(self.database or "")
        if url and url.group(1) not in DATABASE_SCHEMES:
            raise ValueError(
                f"database: unsupported URL scheme {url.group(1)!r}; use a file path, "
                "sqlite:///path/to/taskd.db or postgresql://user@host/dbname"
            )
        if self.node_id is not None and not _NODE_ID.fullmatch(self.node_id):
            raise ValueError(
                f"node_id {self.node_id!r}: use 1 to 100 letters, digits and . _ : @ -"
            )


def _decode_hook(kind: type, value: Any) -> Any:
    if kind is Seconds:
        if isinstance(value, str):
            return Seconds(parse_duration(value))
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return Seconds(value)
        raise ValueError(f'expected a duration such as 30 or "5m", got {value!r}')
    raise NotImplementedError(kind)


T = TypeVar("T", bound=msgspec.Struct)


def _decoded(data: dict[str, Any], kind: type[T], where: str, file: Path) -> T:
    """`data` as a `kind` table, or ConfigError naming the file, the table and the problem
    in taskd's words where it can: the closest known key to an unknown one, the values of
    a choice; a task's or a schedule's own table is named in what goes wrong inside it."""
    _check_table(data, kind, where, file)
    try:
        return msgspec.convert(
            data,
            kind,
            dec_hook=_decode_hook,
            builtin_types=(dt.datetime, dt.date, dt.time),
            str_keys=True,
        )
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{file}: {where}{exc}") from None


def _check_table(data: dict[str, Any], kind: type[msgspec.Struct], where: str, file: Path) -> None:
    fields = {field.encode_name: field for field in msgspec.structs.fields(kind)}
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            table = f"{where.removesuffix(': ')} of " if where else ""
            raise ConfigError(f'unknown key "{key}" in {table}{file}{did_you_mean(key, fields)}')
        annotation = _bare(field.type)
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
        if choices and value not in choices:
            listed = ", ".join(f'"{choice}"' for choice in choices)
            got = f'"{value}"' if isinstance(value, str) else repr(value)
            raise ConfigError(f"{file}: {where}{key} must be one of {listed}, got {got}")
        if isinstance(value, dict) and _is_table(annotation):
            _decoded(value, annotation, f"[{key}]: ", file)
        elif isinstance(value, dict) and typing.get_origin(annotation) is dict:
            _, entry = typing.get_args(annotation)
            for name, table in value.items():
                if isinstance(table, dict) and _is_table(entry):
                    _decoded(table, entry, f'[{key}."{name}"]: ', file)
        elif isinstance(value, list) and typing.get_origin(annotation) is list:
            (entry,) = typing.get_args(annotation)
            for number, table in enumerate(value, 1):
                if isinstance(table, dict) and _is_table(entry):
                    _decoded(table, entry, f"[[{key}]] number {number}: ", file)


def _bare(annotation: Any) -> Any:
    """The type of a setting, without its markings and its None."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        others = [member for member in typing.get_args(annotation) if member is not type(None)]
        return others[0] if len(others) == 1 else annotation
    return annotation


def _is_table(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)


def load_config(path: str | os.PathLike[str] | None) -> tuple[Config, Path]:
    """The configuration in `path` (or the defaults) and the folder relative paths start from.

    Raises ConfigError naming the file, the setting and the problem.
    """
    if path is None:
        return Config(), Path.cwd()
    file = Path(path)
    try:
        text = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {file}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text.decode())
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: invalid TOML: it is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:  # its message says where the syntax is wrong
        raise ConfigError(f"{file}: invalid TOML: {exc}") from None
    config = _decoded(data, Config, "", file)
    base = file.resolve().parent
    if config.http is not None:
        config = msgspec.structs.replace(config, http=config.http.resolved(base))
    if config.webhook:
        webhooks = [
            msgspec.structs.replace(hook, secret_file=os.path.abspath(base / hook.secret_file))
            for hook in config.webhook
        ]
        config = msgspec.structs.replace(config, webhook=webhooks)
    return config, base


def config_path_from_environment() -> str | None:
    """`$TASKD_CONFIG`, else taskd.toml in systemd's `$CONFIGURATION_DIRECTORY`, if present."""
    if explicit := os.environ.get("TASKD_CONFIG"):
        return explicit
    if directory := os.environ.get("CONFIGURATION_DIRECTORY"):
        candidate = os.path.join(directory.split(":")[0], "taskd.toml")
        if os.path.exists(candidate):
            return candidate
    return None


def state_directory() -> Path:
    """Where the database lives by default: systemd's StateDirectory, /var/lib/taskd or XDG."""
    if state := os.environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0])
    if os.getuid() == 0:
        return Path("/var/lib/taskd")
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(xdg) / "taskd"


class Paths(msgspec.Struct, frozen=True):
    """The resolved absolute paths the daemon uses; the database as a URL."""

    tasks: Path
    database: str
    socket: Path


def database_url(setting: str, base: Path) -> str:
    """The database setting as a URL: a file path, or `sqlite://PATH`, becomes
    `sqlite:///absolute/path` (a relative path is taken from `base`)."""
    url = _URL.fullmatch(setting)
    if url is None:
        return f"sqlite://{os.path.abspath(base / setting)}"
    if url.group(1) == "sqlite":
        return f"sqlite://{os.path.abspath(base / url.group(2))}"
    return setting


def resolve_paths(config: Config, base: Path) -> Paths:
    """Absolute paths from the configuration, relative ones taken from `base`."""
    database = database_url(config.database or str(state_directory() / "taskd.db"), base)
    if is_postgres(database):
        _postgres_driver()
    if config.otel and not otel_installed():
        raise ConfigError(f"otel = true: {OTEL_MISSING}")
    socket = base / config.socket if config.socket else Path(default_socket_path())
    return Paths(
        tasks=Path(os.path.abspath(base / config.tasks)),
        database=database,
        socket=Path(os.path.abspath(socket)),
    )


def _postgres_driver() -> None:
    """PostgreSQL's driver is an extra: without it, say which (one line, exit 78)."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        raise ConfigError(
            "database: PostgreSQL needs asyncpg, which taskd's postgres extra installs: "
            "pip install 'taskd[postgres]'"
        ) from None


OTEL_MISSING = (
    "tracing needs OpenTelemetry, which taskd's otel extra installs: pip install 'taskd[otel]'"
)


def otel_installed() -> bool:
    """Whether tracing's extra is installed: found, not imported (a daemon that does not
    trace never imports it). `otel = true` without it is one line, exit 78."""
    import importlib.util

    try:
        return importlib.util.find_spec("opentelemetry.sdk") is not None
    except (ImportError, ValueError):  # `opentelemetry` itself is missing or broken
        return False


def is_postgres(url: str) -> bool:
    return url.startswith(tuple(f"{scheme}://" for scheme in POSTGRES_SCHEMES))
