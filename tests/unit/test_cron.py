"""Next-tick computation over tables of expressions, zones and DST transitions (pure)."""

from __future__ import annotations

import datetime as dt

import pytest

from taskd.cron import Cron, CronError, iso, next_tick, recent_ticks, time_zone


def at(text: str, zone: str = "UTC") -> float:
    """An instant from local wall time in `zone`; a trailing +HH:MM picks the fold."""
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=time_zone(zone))
    return moment.timestamp()


def ticks(expression: str, zone: str, start: str, count: int) -> list[str]:
    """The next `count` ticks after `start` (wall time in `zone`), as ISO-8601 with offsets."""
    cron, tz = Cron.parse(expression), time_zone(zone)
    instant, result = at(start, zone), []
    for _ in range(count):
        instant = next_tick(cron, tz, instant)
        result.append(iso(instant, tz))
    return result


@pytest.mark.parametrize(
    ("expression", "start", "expected"),
    [
        # 5 fields: minute hour day-of-month month day-of-week.
        ("*/5 * * * *", "2026-06-01T10:03", ["2026-06-01T10:05:00", "2026-06-01T10:10:00"]),
        ("0 0 * * *", "2026-06-01T10:03", ["2026-06-02T00:00:00", "2026-06-03T00:00:00"]),
        ("0 8 * * 1", "2026-06-01T10:00", ["2026-06-08T08:00:00", "2026-06-15T08:00:00"]),
        ("0 8 * * mon-fri", "2026-06-05T09:00", ["2026-06-08T08:00:00", "2026-06-09T08:00:00"]),
        ("0 0 * * 7", "2026-06-01T00:00", ["2026-06-07T00:00:00", "2026-06-14T00:00:00"]),
        ("0 0 29 2 *", "2026-01-01T00:00", ["2028-02-29T00:00:00", "2032-02-29T00:00:00"]),
        ("0 0 L * *", "2026-02-10T00:00", ["2026-02-28T00:00:00", "2026-03-31T00:00:00"]),
        # Strictly after: a start on a tick gives the following one.
        ("*/5 * * * *", "2026-06-01T10:05", ["2026-06-01T10:10:00"]),
        ("*/5 * * * *", "2026-06-01T10:04:59.999", ["2026-06-01T10:05:00"]),
        # 6 fields: the FIRST is seconds.
        ("* * * * * *", "2026-06-01T10:00:00.5", ["2026-06-01T10:00:01", "2026-06-01T10:00:02"]),
        ("*/2 * * * * *", "2026-06-01T10:00:01", ["2026-06-01T10:00:02", "2026-06-01T10:00:04"]),
        ("30 0 12 * * *", "2026-06-01T00:00", ["2026-06-01T12:00:30", "2026-06-02T12:00:30"]),
        ("15,45 * * * * *", "2026-06-01T10:00:20", ["2026-06-01T10:00:45", "2026-06-01T10:01:15"]),
        # Macros.
        ("@yearly", "2026-06-01T00:00", ["2027-01-01T00:00:00", "2028-01-01T00:00:00"]),
        ("@annually", "2026-06-01T00:00", ["2027-01-01T00:00:00"]),
        ("@monthly", "2026-06-15T00:00", ["2026-07-01T00:00:00", "2026-08-01T00:00:00"]),
        ("@weekly", "2026-06-01T00:00", ["2026-06-07T00:00:00", "2026-06-14T00:00:00"]),
        ("@daily", "2026-06-01T00:00", ["2026-06-02T00:00:00"]),
        ("@midnight", "2026-06-01T00:00", ["2026-06-02T00:00:00"]),
        ("@hourly", "2026-06-01T10:30", ["2026-06-01T11:00:00", "2026-06-01T12:00:00"]),
        ("@HOURLY", "2026-06-01T10:30", ["2026-06-01T11:00:00"]),
        # Day-of-month and day-of-week combine with OR, as in cron: the 13th, and Fridays.
        (
            "0 0 13 * fri",
            "2026-03-01T00:00",
            ["2026-03-06T00:00:00", "2026-03-13T00:00:00", "2026-03-20T00:00:00"],
        ),
        # Either side alone restricts as usual.
        ("0 0 13 * *", "2026-03-01T00:00", ["2026-03-13T00:00:00", "2026-04-13T00:00:00"]),
    ],
)
def test_next_ticks_in_utc(expression: str, start: str, expected: list[str]) -> None:
    assert ticks(expression, "UTC", start, len(expected)) == [f"{t}+00:00" for t in expected]


# The DST rule: a wall time skipped by spring-forward fires once, at the first instant after
# the gap; a wall time repeated by fall-back fires once, at its first occurrence. Schedules
# that run every hour (hour field *) follow real time instead: they fire in both passes of a
# repeated hour, and wall times in a gap are simply not there.
DST = [
    # Europe/Berlin: 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET.
    (
        "Europe/Berlin",
        "30 2 * * *",
        "2026-03-28T12:00",
        ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"],
    ),
    (
        "Europe/Berlin",
        "30 2 * * *",
        "2026-10-24T12:00",
        ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"],
    ),
    (
        "Europe/Berlin",
        "*/20 * * * *",
        "2026-03-29T01:30",
        ["2026-03-29T01:40:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T03:20:00+02:00"],
    ),
    (
        "Europe/Berlin",
        "59 * * * *",  # every hour: the missing 02:59 is not moved to 03:00
        "2026-03-29T01:00",
        ["2026-03-29T01:59:00+01:00", "2026-03-29T03:59:00+02:00"],
    ),
    (
        "Europe/Berlin",
        "*/20 2 * * *",  # particular hour, all in the gap: once, at its end
        "2026-03-29T00:00",
        ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"],
    ),
    (
        "Europe/Berlin",
        "*/20 * * * *",
        "2026-10-25T02:30+02:00",
        [
            "2026-10-25T02:40:00+02:00",
            "2026-10-25T02:00:00+01:00",
            "2026-10-25T02:20:00+01:00",
            "2026-10-25T02:40:00+01:00",
            "2026-10-25T03:00:00+01:00",
        ],
    ),
    (
        "Europe/Berlin",
        "0 30 2 * * *",  # 6 fields, particular hour: once on both days
        "2026-10-25T00:00",
        ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"],
    ),
    # America/New_York: 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST.
    (
        "America/New_York",
        "30 2 * * *",
        "2026-03-07T12:00",
        ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"],
    ),
    (
        "America/New_York",
        "30 1 * * *",
        "2026-10-31T12:00",
        ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
    ),
    (
        "America/New_York",
        "0 * * * *",
        "2026-11-01T00:30",
        ["2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T02:00:00-05:00"],
    ),
    (
        "America/New_York",
        "0 * * * *",
        "2026-03-08T00:30",
        ["2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-08T04:00:00-04:00"],
    ),
    (
        "America/New_York",
        "*/20 1 * * *",  # every 20 minutes, but only in hour 1: the repeated hour runs once
        "2026-11-01T00:30",
        [
            "2026-11-01T01:00:00-04:00",
            "2026-11-01T01:20:00-04:00",
            "2026-11-01T01:40:00-04:00",
            "2026-11-02T01:00:00-05:00",
        ],
    ),
    (
        "America/New_York",
        "15 2 8 3 *",  # a yearly tick that falls into the gap
        "2026-01-01T00:00",
        ["2026-03-08T03:00:00-04:00", "2027-03-08T02:15:00-05:00"],
    ),
    # Australia/Sydney (southern hemisphere): 2026-04-05 03:00 AEDT -> 02:00 AEST,
    # 2026-10-04 02:00 AEST -> 03:00 AEDT.
    (
        "Australia/Sydney",
        "30 2 * * *",
        "2026-04-04T12:00",
        ["2026-04-05T02:30:00+11:00", "2026-04-06T02:30:00+10:00"],
    ),
    (
        "Australia/Sydney",
        "30 2 * * *",
        "2026-10-03T12:00",
        ["2026-10-04T03:00:00+11:00", "2026-10-05T02:30:00+11:00"],
    ),
    # Australia/Lord_Howe shifts by 30 minutes: 2026-04-05 02:00 +11 -> 01:30 +10:30,
    # 2026-10-04 02:00 +10:30 -> 02:30 +11.
    (
        "Australia/Lord_Howe",
        "0,30 * * * *",
        "2026-04-05T01:10",
        ["2026-04-05T01:30:00+11:00", "2026-04-05T01:30:00+10:30", "2026-04-05T02:00:00+10:30"],
    ),
    (
        "Australia/Lord_Howe",
        "15 * * * *",
        "2026-10-04T01:00",
        ["2026-10-04T01:15:00+10:30", "2026-10-04T03:15:00+11:00"],
    ),
    (
        "Australia/Lord_Howe",
        "15 2 * * *",
        "2026-10-03T12:00",
        ["2026-10-04T02:30:00+11:00", "2026-10-05T02:15:00+11:00"],
    ),
]


@pytest.mark.parametrize(("zone", "expression", "start", "expected"), DST)
def test_dst_transitions(zone: str, expression: str, start: str, expected: list[str]) -> None:
    assert ticks(expression, zone, start, len(expected)) == expected


def test_daily_job_runs_once_on_each_dst_day() -> None:
    for zone, spring, autumn in (
        ("Europe/Berlin", "2026-03-29", "2026-10-25"),
        ("America/New_York", "2026-03-08", "2026-11-01"),
    ):
        for day in (spring, autumn):
            start, end = at(f"{day}T00:00", zone) - 1, at(f"{day}T23:59", zone)
            found = recent_ticks(Cron.parse("30 2 * * *"), time_zone(zone), start, end, 10)
            assert len(found) == 1, (zone, day, found)
            hours = round((end - start) / 3600)  # 23 in spring, 25 in autumn
            assert hours == (23 if day == spring else 25)
            hourly = recent_ticks(Cron.parse("@hourly"), time_zone(zone), start, end, 100)
            assert len(hourly) == hours  # one per real hour


def test_a_start_inside_the_repeated_hour_does_not_fire_a_particular_hour_twice() -> None:
    # 02:10 CET is the second pass; 02:30 already fired at 02:30 CEST.
    assert ticks("30 2 * * *", "Europe/Berlin", "2026-10-25T02:10+01:00", 1) == [
        "2026-10-26T02:30:00+01:00"
    ]
    assert ticks("*/30 * * * *", "Europe/Berlin", "2026-10-25T02:10+01:00", 1) == [
        "2026-10-25T02:30:00+01:00"
    ]


def test_recent_ticks_returns_the_latest_ones_oldest_first() -> None:
    cron, utc = Cron.parse("* * * * * *"), time_zone("UTC")
    # A week of an every-second schedule: only the ten latest are computed.
    latest = recent_ticks(cron, utc, 0.0, 604_800.5, 10)
    assert latest == [float(t) for t in range(604_791, 604_801)]
    assert recent_ticks(cron, utc, 10.0, 13.0, 10) == [11.0, 12.0, 13.0]
    assert recent_ticks(cron, utc, 10.0, 10.0, 10) == []
    assert recent_ticks(cron, utc, 10.0, 20.0, 0) == []
    yearly = recent_ticks(Cron.parse("@yearly"), utc, 0.0, at("2026-06-01T00:00"), 2)
    assert [iso(t, utc) for t in yearly] == [
        "2025-01-01T00:00:00+00:00",
        "2026-01-01T00:00:00+00:00",
    ]


def test_normal_form_and_fields() -> None:
    cron = Cron.parse("  */5   *  * * *  ")
    assert (cron.text, cron.has_seconds, cron.every_hour) == ("*/5 * * * *", False, True)
    assert Cron.parse("0 30 2 * * *").has_seconds
    assert not Cron.parse("30 2 * * *").every_hour


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * * *", "4 fields: use 5 (minute hour day-of-month month day-of-week) or 6 with"),
        ("* * * * * * *", "7 fields"),
        ("", "0 fields"),
        ("61 * * * *", 'the minute field "61" is not valid (allowed: 0-59)'),
        ("0 24 * * *", 'the hour field "24" is not valid (allowed: 0-23)'),
        ("0 0 32 * *", 'the day-of-month field "32" is not valid'),
        ("0 0 * 13 *", 'the month field "13" is not valid (allowed: 1-12 or jan-dec)'),
        ("0 0 * * 8", 'the day-of-week field "8" is not valid (allowed: 0-7 or sun-sat'),
        ("0 0 * * funday", 'the day-of-week field "funday" is not valid'),
        ("60 * * * * *", 'the second field "60" is not valid (allowed: 0-59)'),
        ("*/0 * * * *", 'the minute field "*/0" is not valid'),
        ("H * * * *", 'the minute field "H" is not valid'),
        ("0 0 30 2 *", "never fires: no date matches its day-of-month and month"),
        ("@reboot", 'unknown macro "@reboot": use @yearly, @annually, @monthly, @weekly'),
        ("@every 5m", 'unknown macro "@every 5m"'),
    ],
)
def test_invalid_expressions_say_what_is_wrong(expression: str, message: str) -> None:
    with pytest.raises(CronError) as caught:
        Cron.parse(expression)
    assert message in str(caught.value)


def test_unknown_time_zone() -> None:
    with pytest.raises(CronError, match='unknown time zone "Europe/Berln": use an IANA name'):
        time_zone("Europe/Berln")
    with pytest.raises(CronError, match="unknown time zone"):
        time_zone("../../etc/passwd")
