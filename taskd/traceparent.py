"""The W3C `traceparent` a job carries: read from the caller's current OpenTelemetry span
without importing OpenTelemetry, and checked.

A program that has a span has imported `opentelemetry.trace`; one that has not imported it
has no span to pass on. So the clients (`Client`, `AsyncClient`, `taskd.outbox`) and task
code look the module up in `sys.modules` and never import it: without the `otel` extra, or
in a program that does not trace, this costs a dictionary lookup. Standard library only:
taskctl imports this module.
"""

from __future__ import annotations

import functools
import re
import sys

from taskd.protocol import TRACEPARENT_PATTERN


@functools.cache
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The traceparent, and a later version's start: compiled on first use (taskctl starts
    without them)."""
    return re.compile(TRACEPARENT_PATTERN), re.compile("(?!00)[0-9a-f]{2}-")


def current_traceparent() -> str | None:
    """The traceparent of the calling code's current span; None if it has none (or does
    not use OpenTelemetry)."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    try:
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return format_traceparent(context.trace_id, context.span_id, int(context.trace_flags))
    except Exception:  # a half-imported or unusual OpenTelemetry: no trace rather than a failure
        return None


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags & 0xFF:02x}"


def parse_traceparent(text: str) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a valid traceparent, else None."""
    if len(text) != 55 or _patterns()[0].match(text) is None:
        return None
    return int(text[3:35], 16), int(text[36:52], 16), int(text[53:55], 16)


def is_traceparent(text: str) -> bool:
    return parse_traceparent(text) is not None


def traceparent_or_current(explicit: str | None) -> str | None:
    """What a client sends: the traceparent it was given, else its current span's."""
    return explicit if explicit is not None else current_traceparent()


def header_traceparent(value: str | bytes | None) -> str | None:
    """The traceparent of an HTTP `traceparent` header, None if absent or malformed (W3C
    Trace Context: a receiver that cannot parse it ignores it and starts a new trace).
    A later version's header is read for its version-00 fields, as the standard says."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip()
    future = _patterns()[1].match(value) is not None and value[:2] != "ff"
    if future and (len(value) == 55 or value[55:56] == "-"):
        value = "00" + value[2:55]  # a later version: its first fields are version 00's
    return value if is_traceparent(value) else None
