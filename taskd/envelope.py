"""What can still be read of a request whose body msgspec could not decode.

msgspec decodes recursively, so a value nested about a thousand levels deep anywhere in a
request makes the whole body undecodable, id included; and a string that is not valid UTF-8
fails the decoding without saying where it is. This reader walks msgpack without recursion,
so that such a request is still answered under its own id, with the field at fault named
(`$.jobs[1].key`). Standard library and msgspec only.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec
import msgspec.inspect as types

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

Step = str | int  # a key of a map, or an index of an array


class Unreadable(ValueError):
    """The body is not a msgpack map whose keys can be walked."""


def _item(body: bytes, pos: int) -> tuple[int, int, int | None]:
    """The msgpack item at `pos`: where its header ends, where its own bytes end, and for a
    map or an array the number of items that follow it (None for a scalar)."""
    if pos >= len(body):
        raise Unreadable("truncated")
    lead = body[pos]
    pos += 1
    if lead <= 0x7F or lead >= 0xE0:
        return pos, pos, None
    if lead <= 0x8F:
        return pos, pos, 2 * (lead & 0x0F)
    if lead <= 0x9F:
        return pos, pos, lead & 0x0F
    if lead <= 0xBF:
        return pos, pos + (lead & 0x1F), None
    if lead in _FIXED:
        return pos, pos + _FIXED[lead], None
    if lead in _SIZED:
        width, extra = _SIZED[lead]
        start = pos + width + extra
        return start, start + _read_length(body, pos, width), None
    if lead in _CONTAINERS:
        width, per_item = _CONTAINERS[lead]
        return pos + width, pos + width, per_item * _read_length(body, pos, width)
    raise Unreadable(f"byte 0x{lead:02x} starts no msgpack value")


def skip(body: bytes, pos: int) -> tuple[int, int]:
    """The end of the msgpack value at `pos`, and how deeply it nests (1 for a scalar)."""
    remaining = [1]  # values still to read at each open level
    depth = 0
    while remaining:
        if remaining[-1] == 0:
            remaining.pop()
            continue
        remaining[-1] -= 1
        _, pos, items = _item(body, pos)
        if items is not None:
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


def _is_map(value: bytes) -> bool:
    return 0x80 <= value[0] <= 0x8F or value[0] in (0xDE, 0xDF)


def _is_string(value: bytes) -> bool:
    return 0xA0 <= value[0] <= 0xBF or value[0] in (0xD9, 0xDA, 0xDB)


def _children(value: bytes) -> list[tuple[bytes, int]]:
    """The items a map (keys and values, alternately) or an array holds, each with how
    deeply it nests; Unreadable if `value` is neither."""
    pos, _, items = _item(value, 0)
    if items is None:
        raise Unreadable("not a map or an array")
    children = []
    for _ in range(items):
        end, depth = skip(value, pos)
        children.append((value[pos:end], depth))
        pos = end
    return children


def _steps(value: bytes) -> list[tuple[Step | None, bytes, int]]:
    """What a map or an array holds, with its key (None if not a string) or index."""
    children = _children(value)
    if not _is_map(value):
        return [(index, item, depth) for index, (item, depth) in enumerate(children)]
    return [
        (_decoded(key, str), item, depth)
        for (key, _), (item, depth) in zip(children[::2], children[1::2], strict=True)
    ]


def top_level(body: bytes) -> dict[str, tuple[bytes, int]]:
    """The top-level map of `body`: each string key's raw value and how deeply it nests."""
    if not body or not _is_map(body):
        raise Unreadable("not a map")
    return {key: (item, depth) for key, item, depth in _steps(body) if isinstance(key, str)}


def request_head(body: bytes) -> tuple[int | None, str | None, str | None, bytes | None]:
    """The id, method and params of a request, as far as they can be read, and the
    top-level key whose value nests deepest (None if nothing nests)."""
    try:
        entries = top_level(body)
    except Unreadable:
        return None, None, None, None
    request_id = _decoded(entries.get("id", (b"", 0))[0], int)
    method = _decoded(entries.get("method", (b"", 0))[0], str)
    deepest = max(entries, key=lambda key: entries[key][1], default=None)
    if deepest is not None and entries[deepest][1] <= 1:
        deepest = None
    params = entries["params"][0] if "params" in entries else None
    return request_id, method, deepest, params


def _decoded(raw: bytes, kind: type[T]) -> T | None:
    if not raw:
        return None
    try:
        return msgspec.msgpack.decode(raw, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError):
        return None


# -- the field at fault, found by walking the value beside the type it is decoded as ---------


def field_path(steps: Sequence[Step]) -> str:
    """A path as msgspec writes it in its errors: `$.jobs[1].key`."""
    return "$" + "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in steps)


def _bare(kind: types.Type | None) -> types.Type | None:
    """`kind` without its constraints and its None alternative; None if it is a union."""
    while isinstance(kind, types.Metadata):
        kind = kind.type
    if isinstance(kind, types.UnionType):
        others = [member for member in kind.types if not isinstance(member, types.NoneType)]
        return _bare(others[0]) if len(others) == 1 else None
    return kind


def _inside(kind: types.Type | None, step: Step | None) -> types.Type | None:
    """The type of what a value of `kind` holds at `step` (None: not known)."""
    kind = _bare(kind)
    if isinstance(kind, types.StructType):
        return next((field.type for field in kind.fields if field.encode_name == step), None)
    if isinstance(kind, types.ListType):
        return kind.item_type
    if isinstance(kind, types.DictType):
        return kind.value_type
    return None


def _holds(kind: types.Type | None, value: bytes) -> bool:
    """Whether `value` is the map or the array a value of `kind` is decoded from."""
    kind = _bare(kind)
    if isinstance(kind, types.StructType | types.DictType):
        return _is_map(value)
    return (
        isinstance(kind, types.ListType) and not _is_map(value) and _item(value, 0)[2] is not None
    )


def deepest_field(value: bytes, kind: Any) -> tuple[list[Step], bool]:
    """Where `value`, decoded as `kind`, nests deepest: the path of the field that holds the
    deep part, and whether that field is raw msgpack (a payload, passed on undecoded)."""
    shape: types.Type | None = types.type_info(kind)
    path: list[Step] = []
    while not isinstance(_bare(shape), types.RawType):
        if not _holds(shape, value):
            return path, False
        steps = _steps(value)
        if not steps:
            return path, False
        step, value, _ = max(steps, key=lambda entry: entry[2])
        if step is None:
            return path, False
        path.append(step)
        shape = _inside(shape, step)
    return path, True


def invalid_string(value: bytes, kind: Any) -> tuple[list[Step], bool] | None:
    """The first string in `value`, decoded as `kind`, that is not valid UTF-8, outside raw
    fields (a payload is its task's business): its path, and whether it is a key of the map
    there (else the value itself); None if there is none."""
    todo: list[tuple[list[Step], types.Type | None, bytes, bool]] = [
        ([], types.type_info(kind), value, False)
    ]
    while todo:
        path, shape, value, is_key = todo.pop()
        if isinstance(_bare(shape), types.RawType):
            continue
        if _is_string(value):
            start, end, _ = _item(value, 0)
            try:
                value[start:end].decode()
            except UnicodeDecodeError:
                return path, is_key
            continue
        if is_key or _item(value, 0)[2] is None:
            continue
        children = _children(value)
        inner: list[tuple[list[Step], types.Type | None, bytes, bool]] = []
        if _is_map(value):
            for (key, _), (item, _) in zip(children[::2], children[1::2], strict=True):
                step = _decoded(key, str)
                inner.append((path, None, key, True))
                inner.append(([*path, step or "?"], _inside(shape, step), item, False))
        else:
            for index, (item, _) in enumerate(children):
                inner.append(([*path, index], _inside(shape, index), item, False))
        todo.extend(reversed(inner))  # in the order they were written
    return None
