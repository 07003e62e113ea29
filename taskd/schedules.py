"""The schedules taskd.toml declares, checked against cron syntax, time zones and the tasks.

Two forms: `[scheduled_tasks]` ("*/5 * * * *" = ["scheduled:cleanup"]) and `[[schedule]]`
tables with options. A schedule's id is the `id` of its `[[schedule]]` table, else its
expression in normal form (single spaces), so that state kept for a schedule (its last
tick, whether it is paused) survives reloads and restarts as long as its expression does.
Everything wrong is reported together, each problem naming the schedule and what to fix.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from taskd.config import Config, ConfigError, Schedule
from taskd.cron import STARTUP, Cron, CronError, iso, normalize, time_zone
from taskd.models import did_you_mean
from taskd.tasks import TICK_FIELDS, TaskRegistry

CatchUp = Literal["skip", "latest", "all"]
SAMPLE_TICK = 1_767_225_600.0  # 2026-01-01T00:00:00Z: a tick for checking payload schemas


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """One validated schedule. `cron` is None for @startup."""

    id: str
    expression: str
    timezone: str
    zone: dt.tzinfo = field(compare=False)
    cron: Cron | None = field(compare=False)
    tasks: tuple[str, ...]
    payload: dict[str, Any]
    catch_up: CatchUp = "skip"
    max_catch_up: int = 10
    enabled: bool = True
    jitter: float = 0.0

    @property
    def startup(self) -> bool:
        return self.cron is None

    def due_at(self, tick: float) -> float:
        """When the jobs of the tick at `tick` are due: the tick, plus its jitter."""
        return tick + jitter_offset(self.id, tick, self.jitter)

    def tick_payload(self, tick: float) -> bytes:
        """The payload of a firing at `tick`: its time in the schedule's zone, the
        expression, and the static payload."""
        fields = {"scheduled_time": iso(tick, self.zone), "cron": self.expression}
        return msgspec.msgpack.encode({**fields, **self.payload})


def jitter_offset(schedule: str, tick: float, jitter: float) -> float:
    """The offset in [0, jitter) of a schedule's tick: a hash of the schedule's id and the
    tick, so that every daemon (and every restart) computes the same one, and the tick
    still fires once."""
    if jitter <= 0:
        return 0.0
    digest = hashlib.sha256(f"{schedule}\0{tick!r}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * jitter


def load_schedules(config: Config, registry: TaskRegistry) -> list[ScheduleSpec]:
    """Every schedule of the configuration; raises ConfigError listing all problems."""
    errors: list[str] = []
    try:
        time_zone(config.timezone)
    except CronError as exc:
        errors.append(f"timezone: {exc}")
    declared = [
        (f'[scheduled_tasks] "{expression}"', Schedule(cron=expression, tasks=tasks))
        for expression, tasks in config.scheduled_tasks.items()
    ]
    declared += [
        (f"[[schedule]] number {number} ({_label(entry)})", entry)
        for number, entry in enumerate(config.schedule, start=1)
    ]
    specs: list[ScheduleSpec] = []
    seen: dict[str, str] = {}
    for where, entry in declared:
        try:
            spec = _spec(entry, config.timezone, registry)
        except CronError as exc:
            errors.append(f"{where}: {exc}")
            continue
        if (other := seen.get(spec.id)) is not None:
            errors.append(
                f'{where}: schedule id "{spec.id}" is already taken by {other}; '
                "give one of them its own id in a [[schedule]] table"
            )
            continue
        seen[spec.id] = where
        specs.append(spec)
    if errors:
        raise ConfigError("invalid schedules:\n" + "\n".join(errors))
    return specs


def _label(entry: Schedule) -> str:
    cron = f'cron "{normalize(entry.cron)}"'
    return f'id "{entry.id}", {cron}' if entry.id else cron


def _spec(entry: Schedule, default_zone: str, registry: TaskRegistry) -> ScheduleSpec:
    """One schedule; raises CronError (its message says what is wrong) on the first problem."""
    expression = normalize(entry.cron)
    cron = None if expression == STARTUP else Cron.parse(expression)
    zone_name = entry.timezone or default_zone
    zone = time_zone(zone_name)
    tasks = (entry.tasks,) if isinstance(entry.tasks, str) else tuple(entry.tasks)
    payload = dict(entry.payload or {})
    if entry.id is not None and not entry.id.strip():
        raise CronError("id must not be empty")
    if not tasks:
        raise CronError("names no tasks")
    if duplicates := sorted({task for task in tasks if tasks.count(task) > 1}):
        raise CronError(f"lists task {duplicates[0]} more than once")
    if clash := [name for name in TICK_FIELDS if name in payload]:
        raise CronError(
            f'payload must not set "{clash[0]}": taskd sets scheduled_time and cron on every firing'
        )
    if cron is None and entry.catch_up != "skip":
        raise CronError(f"{STARTUP} fires once at each start; catch_up does not apply to it")
    spec = ScheduleSpec(
        id=entry.id.strip() if entry.id else expression,
        expression=expression,
        timezone=zone_name,
        zone=zone,
        cron=cron,
        tasks=tasks,
        payload=payload,
        catch_up=entry.catch_up,
        max_catch_up=entry.max_catch_up,
        enabled=entry.enabled,
        jitter=float(entry.jitter or 0.0),
    )
    if cron is None and spec.jitter:
        raise CronError(f"{STARTUP} fires once at each start; jitter does not apply to it")
    for task in tasks:
        _check_task(spec, task, registry)
    return spec


def _check_task(spec: ScheduleSpec, name: str, registry: TaskRegistry) -> None:
    task = registry.get(name)
    if task is None:
        hint = did_you_mean(name, registry.names())
        raise CronError(f'names unknown task "{name}"{hint} (tasks: {", ".join(registry.names())})')
    try:
        task.decode_payload(spec.tick_payload(SAMPLE_TICK), tick=True)
    except msgspec.ValidationError as exc:
        raise CronError(
            f"task {name} cannot accept this schedule's payload (scheduled_time, cron and the "
            f"schedule's static payload): {exc}. Give the schedule a payload the task "
            "accepts, or let the task's payload type allow these fields"
        ) from None


def digest(specs: Sequence[ScheduleSpec]) -> str:
    """A short fingerprint of the schedules, which daemons sharing a store compare."""
    described = sorted(
        [s.id, s.expression, s.timezone, list(s.tasks), s.payload, s.catch_up, s.max_catch_up,
         s.enabled]
        for s in specs
    )  # fmt: skip
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
