"""The tasks folder: file paths to task names, loading files by path, payload schemas."""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import inspect
import sys
import traceback
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec

from taskd.config import SharedLimitOptions, TaskOptions
from taskd.definition import TaskContext, TaskDefinition
from taskd.models import Hook, SingleFlight, TaskInfo, did_you_mean, parse_rate
from taskd.policy import default_attempts

MODULE_PREFIX = "taskd_tasks."
TICK_FIELDS = ("scheduled_time", "cron")  # what taskd merges into the payload of every tick


class TaskLoadError(Exception):
    """The tasks folder cannot be loaded; the message names each file and its problem."""


def task_name(relative: Path) -> str:
    """The name a path gives: jobs/send-email.py -> jobs:send-email, db/index.py -> db."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "index" and len(parts) > 1:
        parts.pop()
    return ":".join(parts)


def is_hidden(name: str) -> bool:
    """Files and folders starting with `_` or `.` hold helpers, not tasks."""
    return name.startswith(("_", "."))


def discover(directory: Path) -> list[Path]:
    """Every task file under `directory`, sorted, skipping hidden files and folders."""
    found: list[Path] = []
    for path in sorted(directory.rglob("*.py")):
        relative = path.relative_to(directory)
        if not any(is_hidden(part) for part in relative.parts):
            found.append(path)
    return found


class Task:
    """A loaded task: its function, how to call it, and how to check its payload."""

    __slots__ = (
        "backoff",
        "concurrency",
        "description",
        "fields",
        "file",
        "fn",
        "is_async",
        "limit_key",
        "limits",
        "max_attempts",
        "max_backoff",
        "name",
        "on_failure",
        "on_success",
        "other_keys",
        "payload_decoder",
        "payload_schema",
        "payload_type",
        "rate_interval",
        "rate_limit",
        "single_flight",
        "takes_context",
        "takes_payload",
        "timeout",
        "undeclared_tick_fields",
        "unique_for",
    )

    def __init__(self, name: str, file: Path, definition: TaskDefinition, options: TaskOptions):
        self.name = name
        self.file = file
        self.fn = definition.fn
        self.description = definition.description or ""
        self.timeout = _first(options.timeout, definition.timeout)
        self.max_attempts = _first(options.max_attempts, definition.max_attempts)
        self.backoff = _first(options.backoff, definition.backoff)
        self.max_backoff = _first(options.max_backoff, definition.max_backoff)
        self.concurrency = _first(options.concurrency, definition.concurrency)
        self.rate_limit = _first(options.rate_limit, definition.rate_limit)
        self.unique_for = _first(options.unique_for, definition.unique_for)
        self.single_flight: SingleFlight = (
            options.single_flight or definition.single_flight or "task"
        )
        # Seconds between two starts under the rate limit (None: none).
        self.rate_interval: float | None = None
        if self.rate_limit is not None:
            starts, period = parse_rate(self.rate_limit)
            self.rate_interval = period / starts
        self.on_failure = _first(options.on_failure, definition.on_failure)
        self.on_success = _first(options.on_success, definition.on_success)
        # The shared limits ([limits.NAME]) its jobs count against, besides its own.
        limits = options.limits if options.limits is not None else definition.limits
        self.limits: tuple[str, ...] = tuple(dict.fromkeys(limits or ()))
        # The payload field its concurrency and rate limit count per value of.
        self.limit_key = _first(options.limit_key, definition.limit_key)
        self.is_async = inspect.iscoroutinefunction(self.fn)
        self.takes_payload, self.takes_context, self.payload_type = _call_shape(self.fn)
        try:
            self.payload_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
                self.payload_type
            )
        except TypeError as exc:
            raise TaskLoadError(
                f"payload annotation {self.payload_type!r} is not a type msgspec validates: {exc}"
            ) from None
        self.fields, self.other_keys = _payload_fields(self.payload_type)
        self.undeclared_tick_fields = (
            frozenset() if self.fields is None else frozenset(TICK_FIELDS) - self.fields.keys()
        )
        # Built once: `list_tasks` (taskctl list, GET /_nitro/tasks) would spend most of its
        # time building it again.
        self.payload_schema = _json_schema(self.payload_type)

    def decode_payload(self, payload: bytes, *, tick: bool = False) -> Any:
        """The payload as the task's annotation types it; raises msgspec.ValidationError.

        The payload of a `tick` holds scheduled_time and cron: a payload type that names
        its fields (a Struct, a TypedDict, a dataclass) gets those it declares, so that a
        strict one need not declare them (ctx.scheduled_time and ctx.cron have them); any
        other type (dict, Any) gets both, as in Nitro.
        """
        if tick and self.undeclared_tick_fields:
            payload = _without_keys(payload, self.undeclared_tick_fields)
        return self.payload_decoder.decode(payload)

    def query_payload(self, query: dict[str, str | list[str]]) -> dict[str, Any]:
        """Query parameters (strings) as the payload's field types have them: `?sections=2`
        is 2 for an `int` field. A value that does not convert, or whose type is a string or
        anything, stays as it came, for the payload's validation to judge."""
        payload: dict[str, Any] = {}
        for key, value in query.items():
            kind = self.other_keys if self.fields is None else self.fields.get(key, Any)
            try:
                payload[key] = msgspec.to_builtins(msgspec.convert(value, kind, strict=False))
            except (msgspec.ValidationError, TypeError):
                payload[key] = value
        return payload

    def call(self, payload: Any, ctx: TaskContext) -> Any:
        """Call the task function with the arguments it takes."""
        if self.takes_payload and self.takes_context:
            return self.fn(payload, ctx)
        if self.takes_payload:
            return self.fn(payload)
        if self.takes_context:
            return self.fn(ctx)
        return self.fn()

    def info(
        self, schedules: list[str] | None = None, next_run_at: float | None = None
    ) -> TaskInfo:
        return TaskInfo(
            name=self.name,
            description=self.description,
            file=str(self.file),
            schedules=schedules or [],
            next_run_at=next_run_at,
            timeout=self.timeout,
            max_attempts=self.max_attempts,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
            concurrency=self.concurrency,
            rate_limit=self.rate_limit,
            single_flight=self.single_flight,
            payload_schema=self.payload_schema,
            on_success=self.on_success,
            on_failure=self.on_failure,
            limits=list(self.limits),
            limit_key=self.limit_key,
        )


class SharedLimitDefinition:
    """A `[limits.NAME]` table and the tasks that name it: their jobs share its budget."""

    __slots__ = ("concurrency", "interval", "name", "rate", "tasks")

    def __init__(self, name: str, options: SharedLimitOptions, tasks: tuple[str, ...]) -> None:
        self.name = name
        self.rate = options.rate  # "25/s"
        self.concurrency = options.concurrency
        self.tasks = tasks
        self.interval: float | None = None  # seconds between two starts under its rate
        if options.rate is not None:
            starts, period = parse_rate(options.rate)
            self.interval = period / starts


class TaskRegistry:
    """The tasks loaded from one scan of the tasks folder. The daemon keeps one and, at a
    reload, puts the tasks of the new scan in it (`replace`), for every part that has it."""

    def __init__(
        self,
        directory: Path,
        tasks: Mapping[str, Task],
        limits: Mapping[str, SharedLimitOptions] | None = None,
    ) -> None:
        self.directory = directory
        self._tasks = dict(sorted(tasks.items()))
        self._limit_options = dict(limits or {})
        # The shared limits, with the tasks that count against each.
        self.limits: dict[str, SharedLimitDefinition] = {
            name: SharedLimitDefinition(
                name, options, tuple(t.name for t in self._tasks.values() if name in t.limits)
            )
            for name, options in sorted(self._limit_options.items())
        }

    def replace(self, other: TaskRegistry) -> None:
        """From now on, hold the tasks of `other` (a reload's)."""
        self.directory, self._tasks = other.directory, other._tasks
        self._limit_options, self.limits = other._limit_options, other.limits

    def with_task(self, task: Task) -> TaskRegistry:
        """These tasks and a built-in one (taskd's own, defined in no file)."""
        tasks = {**self._tasks, task.name: task}
        return TaskRegistry(self.directory, tasks, self._limit_options)

    def get(self, name: str) -> Task | None:
        return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        return list(self._tasks)

    def limit_keys(self) -> dict[str, str]:
        """The `limit_key` of each task that has one (task -> payload field)."""
        return {t.name: t.limit_key for t in self._tasks.values() if t.limit_key is not None}

    def hook(self, task: Task, status: str) -> Hook | None:
        """The hook job to enqueue when a job of `task` ends `status` (succeeded or failed
        for good), if it has one."""
        name = task.on_success if status == "succeeded" else task.on_failure
        hook = self._tasks.get(name) if name is not None else None
        if hook is None:
            return None
        return Hook(hook.name, default_attempts(False, hook.max_attempts))

    def failure_hooks(self) -> dict[str, Hook]:
        """The on_failure hook of each task that has one (for jobs a recovery fails)."""
        hooks = {task.name: self.hook(task, "failed") for task in self}
        return {name: hook for name, hook in hooks.items() if hook is not None}


def load_tasks(
    directory: Path,
    options: Mapping[str, TaskOptions] | None = None,
    limits: Mapping[str, SharedLimitOptions] | None = None,
) -> TaskRegistry:
    """Load every task file under `directory`, with the shared limits of the configuration
    (`limits`); all problems are reported together."""
    if not directory.is_dir():
        raise TaskLoadError(f"tasks folder {directory} does not exist or is not a folder")
    options = options or {}
    _forget_modules(directory)
    if str(directory) not in sys.path:  # lets task files import helpers such as `_lib.py`
        sys.path.insert(0, str(directory))
    tasks: dict[str, Task] = {}
    errors: list[str] = []
    for path in discover(directory):
        try:
            task = _load_file(directory, path, options)
        except TaskLoadError as exc:
            errors.append(f"{path}: {exc}")
            continue
        if (other := tasks.get(task.name)) is not None:
            errors.append(f"{path}: task name {task.name!r} is already taken by {other.file}")
            continue
        tasks[task.name] = task
    for name in options:
        if name not in tasks:
            errors.append(f'configuration [task."{name}"] names no task in {directory}')
    for task in tasks.values():
        for what, hook in (("on_failure", task.on_failure), ("on_success", task.on_success)):
            if hook is not None and hook not in tasks:
                errors.append(
                    f"task {task.name}: {what} names task {hook!r}, which is not in {directory}"
                    f"{did_you_mean(hook, list(tasks))}"
                )
    limits = limits or {}
    for task in tasks.values():
        for name in task.limits:
            if name not in limits:
                known = f" (known: {', '.join(sorted(limits))})" if limits else ""
                errors.append(
                    f"task {task.name}: limits names {name!r}, which no [limits.{name}] table "
                    f"in the configuration defines{did_you_mean(name, list(limits))}{known}"
                )
    if errors:
        raise TaskLoadError("\n".join(errors))
    return TaskRegistry(directory, tasks, limits)


def _load_file(directory: Path, path: Path, options: Mapping[str, TaskOptions]) -> Task:
    default_name = task_name(path.relative_to(directory))
    if default_name == "index":
        raise TaskLoadError("index.py at the top of the tasks folder gives no task name")
    module_name = MODULE_PREFIX + default_name
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TaskLoadError("cannot be loaded as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        raise TaskLoadError(f"failed to import: {_describe(exc, path)}") from None
    definitions = [
        value
        for value in vars(module).values()
        if isinstance(value, TaskDefinition)
        and getattr(value.fn, "__module__", None) == module_name
    ]
    if not definitions:
        raise TaskLoadError(
            "defines no task (a task file has one function decorated with @define_task); "
            f"helpers go in files starting with `_`, e.g. `_{path.name}`, which task files "
            f"import as `import _{path.stem}`"
        )
    if len(definitions) > 1:
        found = ", ".join(d.fn.__name__ for d in definitions)
        raise TaskLoadError(
            f"a task file must define exactly one task with @define_task, found {len(definitions)}"
            f" ({found})"
        )
    definition = definitions[0]
    name = definition.name or default_name
    if not name or any(ch.isspace() for ch in name):
        raise TaskLoadError(f"invalid task name {name!r}: it must be non-empty without spaces")
    return Task(name, path, definition, options.get(name, TaskOptions()))


def _call_shape(fn: Callable[..., Any]) -> tuple[bool, bool, Any]:
    """Whether `fn` takes a payload and a context, and the payload's type."""
    try:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError, ValueError) as exc:
        raise TaskLoadError(f"cannot read the signature of {fn.__name__}: {exc}") from None
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    required_other = [
        p.name
        for p in signature.parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    ]
    if len(positional) > 2 or required_other:
        raise TaskLoadError(
            f"{fn.__name__} must take (payload, ctx), (payload), (ctx) or no arguments"
        )
    if len(positional) == 2:
        return True, True, hints.get(positional[0].name, Any)
    if len(positional) == 1:
        annotation = hints.get(positional[0].name, Any)
        if annotation is TaskContext:
            return False, True, Any
        return True, False, annotation
    return False, False, Any


class Tick(msgspec.Struct, frozen=True):
    """What taskd merges into the payload of a tick: its time and its expression."""

    scheduled_time: dt.datetime | None = None
    cron: str | None = None


_tick_decoder = msgspec.msgpack.Decoder(Tick)


def read_tick(payload: bytes) -> Tick:
    """The tick's own fields in the payload of a job a schedule started."""
    try:
        return _tick_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return Tick()


def _payload_fields(payload_type: Any) -> tuple[dict[str, Any] | None, Any]:
    """The type of each field of a payload made of named fields (a Struct, a TypedDict, a
    dataclass, or a union of them), by its name in the payload, else None; and the type of
    the values of other keys (a dict's values; Any: anything)."""
    union = typing.get_origin(payload_type) in (typing.Union, types.UnionType)
    members = [m for m in (typing.get_args(payload_type) if union else (payload_type,))
               if m is not type(None)]  # fmt: skip
    fields: dict[str, Any] = {}
    for member in members:
        if isinstance(member, type) and issubclass(member, msgspec.Struct):
            fields.update({f.encode_name: f.type for f in msgspec.structs.fields(member)})
        elif typing.is_typeddict(member) or dataclasses.is_dataclass(member):
            fields.update(typing.get_type_hints(member))
        else:
            break
    else:
        if members:
            return fields, Any
    if len(members) == 1 and typing.get_origin(members[0]) in (dict, Mapping):
        return None, (typing.get_args(members[0]) or (Any, Any))[1]
    return None, Any


def _without_keys(payload: bytes, keys: frozenset[str]) -> bytes:
    """A msgpack map without `keys` (anything else as it is)."""
    value = msgspec.msgpack.decode(payload)
    if not isinstance(value, dict) or not keys & value.keys():
        return payload
    return msgspec.msgpack.encode({k: v for k, v in value.items() if k not in keys})


def _json_schema(payload_type: Any) -> dict[str, Any] | None:
    if payload_type is Any:
        return None
    try:
        return msgspec.json.schema(payload_type)
    except (TypeError, ValueError):
        return None


def _describe(exc: BaseException, path: Path) -> str:
    """The exception and the line of the task file where it was raised."""
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == str(path):
            where = f" (line {frame.lineno})"
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def _forget_modules(directory: Path) -> None:
    """Drop task and helper modules of an earlier load so that a reload reads files afresh."""
    prefix = str(directory) + "/"
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) or ""
        if name.startswith(MODULE_PREFIX) or file.startswith(prefix):
            del sys.modules[name]


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)
