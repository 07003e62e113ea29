from __future__ import annotations

import pytest

from taskd.models import cut_utf8, format_duration, parse_duration
from taskd.policy import backoff_delay, default_attempts


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("90", 90),
        ("1.5", 1.5),
        ("250ms", 0.25),
        ("30s", 30),
        ("5m", 300),
        ("2h", 7200),
        ("1h30m", 5400),
        ("7d", 604800),
        ("1w", 604800),
        (" 10S ", 10),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5 minutes", "-3", "1x", "nan", "inf", "5m-"])
def test_parse_duration_rejects_with_a_helpful_message(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (5, "5.0s"), (42, "42s"), (330, "5m30s"), (7500, "2h5m"), (273600, "3d4h")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("attempt", "base", "cap", "fraction", "expected"),
    [
        (1, 60, 3600, 0.0, 60),  # Nitro's recipe: 1 min, 2 min, 4 min
        (2, 60, 3600, 0.0, 120),
        (3, 60, 3600, 0.0, 240),
        (3, 60, 3600, 0.999, 240 * 1.0999),
        (10, 60, 3600, 0.0, 3600),  # capped
        (10, 60, 3600, 0.5, 3600 * 1.05),  # jitter on top of the cap
        (500, 1, 10, 0.0, 10),  # no overflow for absurd attempt numbers
    ],
)
def test_backoff_delay(
    attempt: int, base: float, cap: float, fraction: float, expected: float
) -> None:
    assert backoff_delay(attempt, base, cap, fraction) == pytest.approx(expected)


def test_default_attempts() -> None:
    assert default_attempts(single_flight=True, task_max_attempts=None) == 1
    assert default_attempts(single_flight=False, task_max_attempts=None) == 3
    assert default_attempts(single_flight=True, task_max_attempts=5) == 5


@pytest.mark.parametrize(
    ("text", "limit", "keep_end", "cut"),
    [
        ("short", 8, False, "short"),
        ("x" * 10, 10, False, "x" * 10),
        ("x" * 11, 10, False, "x" * 7 + "…"),
        ("é" * 6, 10, False, "ééé…"),
        ("xx" + "é" * 5, 10, False, "xxéé…"),  # the third "é" would end on the 8th byte
        ("a€€€€", 10, False, "a€€…"),
        ("𝄞" * 4, 10, False, "𝄞…"),
        ("é" * 6, 10, True, "…ééé"),
        ("€" * 4 + "a", 10, True, "…€€a"),
        ("\udcff" * 8, 10, False, "\udcff\udcff…"),  # a lone surrogate (from a file name)
    ],
)
def test_cut_utf8_never_splits_a_character(text: str, limit: int, keep_end: bool, cut: str) -> None:
    kept = cut_utf8(text, limit, keep_end=keep_end)
    assert kept == cut and len(kept.encode("utf-8", "surrogatepass")) <= limit
