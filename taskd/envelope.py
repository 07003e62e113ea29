"""What can still be read of a request whose body msgspec could not decode.

msgspec decodes recursively, so a value nested about a thousand levels deep anywhere in a
request makes the whole body undecodable, id included. This reader walks the top-level map
without recursion, so that such a request is still answered under its own id, and can say
which of its top-level values was the problem. Standard library and msgspec only.
"""

from __future__ import annotations

import struct
from typing import TypeVar

import msgspec

T = TypeVar("T")

# Lead byte -> (bytes of a length that follows, fixed size of the rest) for the scalars.
_SIZED = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),  # bin 8/16/32
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),  # ext 8/16/32 (and the type byte)
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),  # str 8/16/32
}  # fmt: skip
_FIXED = {
    0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
    0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,
}  # fmt: skip
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # array/map 16/32
_LENGTH = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}


class Unreadable(ValueError):
    """The body is not a msgpack map whose keys can be walked."""


def skip(body: bytes, pos: int) -> tuple[int, int]:
    """The end of the msgpack value at `pos`, and how deeply it nests (1 for a scalar)."""
    remaining = [1]  # values still to read at each open level
    depth = 0
    while remaining:
        if remaining[-1] == 0:
            remaining.pop()
            continue
        remaining[-1] -= 1
        if pos >= len(body):
            raise Unreadable("truncated")
        lead = body[pos]
        pos += 1
        items = 0
        if lead <= 0x7F or lead >= 0xE0:
            pass
        elif lead <= 0x8F:
            items = 2 * (lead & 0x0F)
        elif lead <= 0x9F:
            items = lead & 0x0F
        elif lead <= 0xBF:
            pos += lead & 0x1F
        elif lead in _FIXED:
            pos += _FIXED[lead]
        elif lead in _SIZED:
            width, extra = _SIZED[lead]
            pos += width + extra + _read_length(body, pos, width)
        elif lead in _CONTAINERS:
            width, per_item = _CONTAINERS[lead]
            items = per_item * _read_length(body, pos, width)
            pos += width
        else:
            raise Unreadable(f"byte 0x{lead:02x} starts no msgpack value")
        if lead in _CONTAINERS or 0x80 <= lead <= 0x9F:
            remaining.append(items)
            depth = max(depth, len(remaining) - 1)
    if pos > len(body):
        raise Unreadable("truncated")
    return pos, max(depth, 1)


def _read_length(body: bytes, pos: int, width: int) -> int:
    if pos + width > len(body):
        raise Unreadable("truncated")
    (length,) = _LENGTH[width].unpack_from(body, pos)
    return int(length)


def top_level(body: bytes) -> dict[str, tuple[bytes, int]]:
    """The top-level map of `body`: each string key's raw value and how deeply it nests."""
    if not body:
        raise Unreadable("empty")
    lead = body[0]
    if 0x80 <= lead <= 0x8F:
        count, pos = lead & 0x0F, 1
    elif lead in (0xDE, 0xDF):
        width = _CONTAINERS[lead][0]
        count, pos = _read_length(body, 1, width), 1 + width
    else:
        raise Unreadable("not a map")
    entries: dict[str, tuple[bytes, int]] = {}
    for _ in range(count):
        key_end, _depth = skip(body, pos)
        try:
            key = msgspec.msgpack.decode(body[pos:key_end], type=str)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeError):
            key = None
        value_end, depth = skip(body, key_end)
        if key is not None:
            entries[key] = (body[key_end:value_end], depth)
        pos = value_end
    return entries


def request_head(body: bytes) -> tuple[int | None, str | None, str | None]:
    """The id and method of a request, if they can be read, and the top-level key whose
    value nests deepest (None if nothing nests)."""
    try:
        entries = top_level(body)
    except Unreadable:
        return None, None, None
    request_id = _decoded(entries.get("id"), int)
    method = _decoded(entries.get("method"), str)
    deepest = max(entries, key=lambda key: entries[key][1], default=None)
    if deepest is not None and entries[deepest][1] <= 1:
        deepest = None
    return request_id, method, deepest


def _decoded(entry: tuple[bytes, int] | None, kind: type[T]) -> T | None:
    if entry is None:
        return None
    try:
        return msgspec.msgpack.decode(entry[0], type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError):
        return None
