"""The limits of a request, in taskd's words.

Each limit is declared once, on the wire types (taskd.protocol: msgspec `Meta`, with the
unit in its `extra`); msgspec enforces them as it decodes a request from the socket or the
HTTP API, and this module says which value broke which limit, with its unit (`delay: at most
10 years, got 20 years`), for the socket, the HTTP API, requests from task code
(taskd.submit) and transactional enqueues (taskd.pg), which check the same limits.
Standard library and msgspec only.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Mapping
from typing import Any

import msgspec
import msgspec.inspect as types

from taskd.models import RUN_KEY
from taskd.protocol import EnqueueParams

YEAR = 365 * 86400


def max_payload_size(max_frame_size: int) -> int:
    """The largest payload or result: a job holding both, and its errors, fits in a reply."""
    return max_frame_size // 4


def out_of_limits(kind: Any, value: Any) -> str | None:
    """Which part of `value` (plain data, as decoded without a type) breaks a limit its type
    `kind` declares, and how: `jobs[2].delay: at most 10 years, got 20 years`; None if no
    part does (values of the wrong type are the decoder's to name)."""
    return _check(_type_info(kind), value, "", None)


@functools.cache
def _type_info(kind: Any) -> types.Type:
    return types.type_info(kind)


def enqueue_problem(fields: Mapping[str, Any]) -> str | None:
    """What is wrong with the options of an enqueue (`EnqueueParams`' fields, None where not
    given) that did not come through the decoder: a limit, or a rule of `rule_broken`;
    None if nothing is."""
    given = {name: value for name, value in fields.items() if value is not None}
    try:  # msgspec checks the limits in C; only a value it refuses is looked at again, in Python
        msgspec.convert({"task": "-", **given}, EnqueueParams)
    except msgspec.ValidationError:
        problem = out_of_limits(EnqueueParams, fields)
    else:
        problem = None
    return problem or rule_broken(fields.get("delay"), fields.get("run_at"), fields.get("key"))


def rule_broken(delay: float | None, run_at: float | None, key: str | None) -> str | None:
    """The rules of an enqueue that its types do not state, for every request (the decoder
    checks none of them): delay or run_at, not both; keys starting with '@' are taskd's."""
    if delay is not None and run_at is not None:
        return "give delay or run_at, not both"
    if key is not None and key.startswith("@"):
        return (
            f"key {key!r}: keys starting with '@' are reserved for taskd ({RUN_KEY!r} is the "
            "key of runs that give none); pick another key"
        )
    return None


def _check(kind: types.Type, value: Any, path: str, unit: str | None) -> str | None:
    if isinstance(kind, types.Metadata):
        extra = kind.extra or {}
        return _check(kind.type, value, path, extra.get("unit", extra.get("form", unit)))
    if isinstance(kind, types.UnionType):
        for member in kind.types:
            if (problem := _check(member, value, path, unit)) is not None:
                return problem
        return None
    if isinstance(kind, types.StructType) and isinstance(value, Mapping):
        for field in kind.fields:
            if value.get(field.encode_name) is not None:
                inner = f"{path}.{field.encode_name}" if path else field.encode_name
                problem = _check(field.type, value[field.encode_name], inner, None)
                if problem is not None:
                    return problem
        return None
    if isinstance(kind, types.ListType) and isinstance(value, list):
        for index, item in enumerate(value):
            if (problem := _check(kind.item_type, item, f"{path}[{index}]", None)) is not None:
                return problem
        return None
    if isinstance(kind, types.IntType | types.FloatType) and _is_number(value):
        return _number(kind, value, path, unit)
    if isinstance(kind, types.StrType) and isinstance(value, str):
        return _form(kind, value, path, unit) or _length(kind, value, path)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(
    kind: types.IntType | types.FloatType, value: float, path: str, unit: str | None
) -> str | None:
    # Written so that NaN breaks every limit, as msgspec has it.
    if kind.le is not None and not value <= kind.le:
        return f"{path}: at most {_shown(kind.le, unit)}, got {_shown(value, unit)}"
    if kind.lt is not None and not value < kind.lt:
        return f"{path}: less than {_shown(kind.lt, unit)}, got {_shown(value, unit)}"
    if kind.ge is not None and not value >= kind.ge:
        return f"{path}: at least {_shown(kind.ge, unit)}, got {_shown(value, unit)}"
    if kind.gt is not None and not value > kind.gt:
        return f"{path}: more than {_shown(kind.gt, unit)}, got {_shown(value, unit)}"
    return None


def _length(kind: types.StrType, value: str, path: str) -> str | None:
    shortest, longest = kind.min_length or 0, kind.max_length
    if len(value) < shortest or (longest is not None and len(value) > longest):
        if shortest == longest:
            return f"{path}: exactly {longest} characters, got {len(value)}"
        most = f" to {longest}" if longest is not None else " or more"
        return f"{path}: {shortest}{most} characters, got {len(value)}"
    return None


def _form(kind: types.StrType, value: str, path: str, form: str | None) -> str | None:
    """A string that does not have the form its pattern gives (`form` says it in words)."""
    if kind.pattern is None or re.search(kind.pattern, value) is not None:
        return None
    shown = value if len(value) <= 80 else value[:77] + "..."
    return f"{path}: expected {form or 'a string matching ' + kind.pattern}, got {shown!r}"


def _shown(number: float, unit: str | None) -> str:
    """A limit or a value, in its unit: seconds as years, days or seconds; a Unix time as
    ISO-8601 in UTC."""
    if unit == "seconds":
        if number and number % YEAR == 0:
            return f"{number / YEAR:g} years"
        if number and number % 86400 == 0:
            return f"{number / 86400:g} days"
        return f"{number:g} seconds"
    if unit == "unix time":
        try:
            moment = dt.datetime.fromtimestamp(number, dt.UTC)
        except (OverflowError, ValueError, OSError):
            return f"{number:g} (a Unix time in seconds)"
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{number:g}" if isinstance(number, float) else str(number)


def params_error(method: str, kind: Any, raw: bytes, exc: msgspec.ValidationError) -> str:
    """The message for params that msgspec refused: the limit they break, in taskd's words,
    if that is what is wrong, else msgspec's own message."""
    try:
        value = msgspec.msgpack.decode(raw)
    except (msgspec.DecodeError, RecursionError, UnicodeError, TypeError):
        value = None  # TypeError: a map as a map's key, before msgspec 0.19 called it malformed
    problem = out_of_limits(kind, value) if value is not None else None
    return f"invalid params for {method}: {problem or exc}"
