"""Cron expressions and their ticks in a time zone: parsing, validation, next tick (pure).

Expressions have 5 fields (minute hour day-of-month month day-of-week) or 6 with the
seconds first, as croner and Nitro read them; day-of-month and day-of-week combine with OR
as in cron; the macros @yearly @annually @monthly @weekly @daily @midnight @hourly stand
for their 5-field forms. croniter matches the fields against wall-clock times; this module
turns wall-clock matches into instants (Unix seconds) in a time zone, with this DST rule:

- A wall time that a spring-forward transition skips (02:30 in Berlin on the last Sunday of
  March) fires once, at the first instant after the gap (03:00 CEST); several skipped wall
  times collapse into that one firing. Like cronie, which runs the skipped jobs at once: the
  run is as close to the intended time as the clock allows, never before it, and ticks keep
  their order.
- A wall time that a fall-back transition repeats (02:30 in Berlin on the last Sunday of
  October) fires once, at its first occurrence: a daily job runs once a day.
- Schedules whose hour field is `*` run every hour (`*/15 * * * *`, `@hourly`, every
  second) and follow real time instead, like cronie's wildcard jobs: they fire in both passes
  of a repeated hour (otherwise an every-minute schedule would stop for an hour), and wall
  times in a gap are simply not there (`59 * * * *` fires at 01:59 CET, then 03:59 CEST, an
  hour later, not also at 03:00). So `@hourly` fires once per real hour: 23 times on the
  spring-forward day, 25 on the fall-back day.

croniter 7 handles time-zone-aware datetimes itself but fires a daily 02:30 twice on the
fall-back day, so only its naive wall-clock matching is used here.
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from collections import deque

from croniter import CroniterError, croniter

from taskd.models import counted

STARTUP = "@startup"
MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
FIELDS_5 = ("minute", "hour", "day-of-month", "month", "day-of-week")
FIELDS_6 = ("second", *FIELDS_5)
ALLOWED = {
    "second": "0-59",
    "minute": "0-59",
    "hour": "0-23",
    "day-of-month": "1-31 or L",
    "month": "1-12 or jan-dec",
    "day-of-week": "0-7 or sun-sat, 0 and 7 are Sunday",
}
HOUR_FIELD = 1  # croniter's index of the hour in its expanded fields (seconds moved last)

EPOCH = dt.datetime(1970, 1, 1)
DAY = 86400
ALMOST = dt.timedelta(milliseconds=1)  # "at or after x" is "after x - 1 ms": ticks are whole
MAX_SEGMENTS = 1000  # zone transitions one next-tick search may cross before giving up


class CronError(ValueError):
    """An expression or time zone that cannot be used; the message says why (the caller
    names the schedule and its expression)."""


class Cron:
    """A parsed cron expression. `Cron.parse("*/5 * * * *")`; `text` is its normal form."""

    __slots__ = ("_matcher", "every_hour", "has_seconds", "text")

    def __init__(self, text: str, matcher: croniter[dt.datetime], has_seconds: bool) -> None:
        self.text = text
        self.has_seconds = has_seconds
        self.every_hour = matcher.expanded[HOUR_FIELD] == ["*"]
        self._matcher = matcher

    def __repr__(self) -> str:
        return f"Cron({self.text!r})"

    @classmethod
    def parse(cls, expression: str) -> Cron:
        """Parse and check an expression; raises CronError saying what is wrong."""
        text = normalize(expression)
        fields = MACROS.get(text, text).split()
        if text.startswith("@") and text not in MACROS:
            macros = ", ".join(MACROS)
            raise CronError(f'unknown macro "{text}": use {macros} or {STARTUP}')
        if len(fields) not in (5, 6):
            raise CronError(
                f"{counted(len(fields), 'field')}: use 5 (minute hour day-of-month month "
                "day-of-week) or 6 with the seconds first (second minute hour day-of-month month "
                "day-of-week)"
            )
        try:
            matcher = croniter(
                " ".join(fields), EPOCH, ret_type=dt.datetime, second_at_beginning=True
            )
        except CroniterError as exc:
            raise CronError(_explain(fields, exc)) from None
        cron = cls(text, matcher, has_seconds=len(fields) == 6)
        try:
            cron.next_wall(dt.datetime(2000, 1, 1))
        except CroniterError:
            raise CronError("never fires: no date matches its day-of-month and month") from None
        return cron

    def next_wall(self, wall: dt.datetime) -> dt.datetime:
        """The first wall-clock time (naive) strictly after `wall` that the fields match."""
        result: dt.datetime = self._matcher.get_next(dt.datetime, start_time=wall)
        return result


def normalize(expression: str) -> str:
    """The normal form of an expression: single spaces, macros in lower case."""
    text = " ".join(expression.split())
    return text.lower() if text.startswith("@") else text


def _explain(fields: list[str], exc: Exception) -> str:
    """Name the field croniter refused, with what it accepts."""
    names = FIELDS_6 if len(fields) == 6 else FIELDS_5
    for index, field in enumerate(fields):
        probe = ["*"] * len(fields)
        probe[index] = field
        try:
            croniter.expand(" ".join(probe), second_at_beginning=True)
        except CroniterError:
            name = names[index]
            return f'the {name} field "{field}" is not valid (allowed: {ALLOWED[name]})'
    return f"not a valid cron expression: {exc}"


def time_zone(name: str) -> dt.tzinfo:
    """The IANA time zone `name`; raises CronError with a hint."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise CronError(
            f'unknown time zone "{name}": use an IANA name such as Europe/Berlin, '
            "America/New_York or UTC"
        ) from None


def iso(instant: float, zone: dt.tzinfo) -> str:
    """An instant as ISO-8601 wall time with its UTC offset in `zone`."""
    return dt.datetime.fromtimestamp(instant, zone).isoformat()


# -- from wall-clock matches to instants ---------------------------------------------------


def next_tick(cron: Cron, zone: dt.tzinfo, after: float) -> float:
    """The first tick of `cron` in `zone` strictly after the instant `after` (Unix seconds).

    Walks from one UTC offset to the next: matches wall times under the current offset, and
    when a zone transition comes first, applies the DST rule of the module docstring.
    """
    start, offset = after, _offset(zone, after)
    floor = _wall(after, offset)
    if not cron.every_hour and (repeated := _repeated_until(zone, after, offset)) is not None:
        floor = max(floor, repeated - ALMOST)  # these wall times fired in the first pass
    for _ in range(MAX_SEGMENTS):
        wall = cron.next_wall(floor)
        candidate = _instant(wall, offset)
        change = _next_transition(zone, start, candidate, offset)
        if change is None:
            return candidate
        new_offset = _offset(zone, change)
        if new_offset > offset:  # spring forward: wall times in the gap do not exist
            if wall < _wall(change, new_offset) and not cron.every_hour:
                return change
            floor = _wall(change, new_offset) - ALMOST
        else:  # fall back: wall times from the transition's new wall time come again
            floor = _wall(change, new_offset if cron.every_hour else offset) - ALMOST
        start, offset = change, new_offset
    raise CronError(f"no tick found after {after}")  # pragma: no cover


def recent_ticks(
    cron: Cron, zone: dt.tzinfo, after: float, until: float, limit: int
) -> list[float]:
    """The latest `limit` ticks in (`after`, `until`], oldest first.

    Looks back over windows that grow fourfold, so that a long gap (a week of an
    every-second schedule) costs about as much as the ticks returned, not the ticks missed.
    """
    if limit < 1 or until <= after:
        return []
    span = 1.0
    while True:
        start = max(after, until - span)
        ticks: deque[float] = deque(maxlen=limit)
        tick = next_tick(cron, zone, start)
        while tick <= until:
            ticks.append(tick)
            tick = next_tick(cron, zone, tick)
        if len(ticks) == limit or start == after:
            return list(ticks)
        span *= 4


def _offset(zone: dt.tzinfo, instant: float) -> float:
    offset = dt.datetime.fromtimestamp(instant, zone).utcoffset()
    return 0.0 if offset is None else offset.total_seconds()


def _wall(instant: float, offset: float) -> dt.datetime:
    return EPOCH + dt.timedelta(seconds=instant + offset)


def _instant(wall: dt.datetime, offset: float) -> float:
    return (wall - EPOCH).total_seconds() - offset


def _next_transition(zone: dt.tzinfo, start: float, end: float, offset: float) -> float | None:
    """The first instant in (`start`, `end`] whose UTC offset is not `offset`, or None.

    Probes a day at a time (no zone changes its offset twice within a day), then bisects.
    """
    low = start
    while low < end:
        high = min(low + DAY, end)
        if _offset(zone, high) != offset:
            return _bisect(zone, low, high, offset)
        low = high
    return None


def _bisect(zone: dt.tzinfo, low: float, high: float, offset: float) -> float:
    """The transition in (`low`, `high`]: `low` has `offset`, `high` does not."""
    lo, hi = math.floor(low), math.ceil(high)
    while hi - lo > 1:
        middle = (lo + hi) // 2
        if _offset(zone, middle) == offset:
            lo = middle
        else:
            hi = middle
    return float(hi)


def _repeated_until(zone: dt.tzinfo, instant: float, offset: float) -> dt.datetime | None:
    """If `instant` lies in the second pass of a repeated hour, the wall time that ends it."""
    earlier = _offset(zone, instant - DAY)
    if earlier <= offset:
        return None
    change = _bisect(zone, instant - DAY, instant, earlier)
    end = _wall(change, earlier)
    return end if _wall(instant, offset) < end else None
