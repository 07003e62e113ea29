"""The JSON Schema of the control protocol, generated from the msgspec types themselves.

contrib/protocol.schema.json is this module's output, and a test fails when the two differ,
so the document other clients are written from cannot drift from the daemon. Regenerate it
with `make schema` (`python -m taskd.schema > contrib/protocol.schema.json`).
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any

import msgspec

from taskd.protocol import METHODS, PROTOCOL_VERSION, ErrorBody, Reply, Request

REF = "#/$defs/{name}"


def protocol_schema() -> dict[str, Any]:
    """Every request, reply and object of the protocol, with each method's params and result.

    Reply objects always carry every key (taskd never leaves one out), so all their
    properties are required; a params key that is absent takes the default shown.
    """
    names = list(METHODS)
    params = [METHODS[name][0] for name in names]
    results = [METHODS[name][1] for name in names]
    envelope = [Request, Reply, ErrorBody]
    schemas, definitions = msgspec.json.schema_components(
        [*params, *results, *envelope], ref_template=REF
    )
    _, sent = msgspec.json.schema_components([*results, ErrorBody], ref_template=REF)
    for name in sent:
        definition = definitions[name]
        if definition.get("type") == "object" and definition.get("properties"):
            definition["required"] = sorted(definition["properties"])
            for field in definition["properties"].values():
                field.pop("default", None)  # never absent, so no default applies
    methods = {
        name: {
            "access": "write" if METHODS[name][2] else "read",
            "params": schemas[index],
            "result": schemas[len(names) + index],
        }
        for index, name in enumerate(names)
    }
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"taskd control protocol, version {PROTOCOL_VERSION}",
        "description": (
            "Frames are a 4-byte big-endian length and a MessagePack body (see protocol.md). "
            "A request is `Request`, with `method` one of `methods` and `params` that method's "
            "params; the reply is `Reply`, whose `result` is that method's result. Times are "
            "Unix seconds, durations seconds."
        ),
        "protocol": PROTOCOL_VERSION,
        "request": {"$ref": REF.format(name="Request")},
        "reply": {"$ref": REF.format(name="Reply")},
        "methods": methods,
        "$defs": dict(sorted(definitions.items())),
    }
    normalized: dict[str, Any] = _normalized(schema)
    return normalized


def _normalized(node: Any) -> Any:
    """The same schema whichever msgspec wrote it: docstrings dedented, `anyOf` sorted."""
    if isinstance(node, list):
        return [_normalized(item) for item in node]
    if not isinstance(node, dict):
        return node
    result = {key: _normalized(value) for key, value in node.items()}
    if isinstance(result.get("description"), str):
        result["description"] = inspect.cleandoc(result["description"])
    if "anyOf" in result:
        result["anyOf"] = sorted(result["anyOf"], key=lambda item: json.dumps(item, sort_keys=True))
    return result


def main() -> None:
    sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(protocol_schema())) + b"\n")


if __name__ == "__main__":
    main()
