"""The JSON Schema of the control protocol and the OpenAPI document of the HTTP API, both
generated from the msgspec types themselves.

contrib/protocol.schema.json and contrib/openapi.json are this module's output, and tests
fail when they differ from it, so the documents other clients are written from cannot drift
from the daemon. Regenerate them with `make schema` (`python -m taskd.schema [openapi]`).
"""

from __future__ import annotations

import http
import inspect
import json
import sys
from typing import Any

import msgspec
import msgspec.inspect

from taskd.http.api import ALIASES, DOCUMENTED_TOO, JSON, ROUTES, STREAMED, ErrorReply, Route
from taskd.protocol import (
    METHODS,
    PROTOCOL_VERSION,
    ErrorBody,
    JobEvent,
    Reply,
    Request,
    Traceparent,
)

REF = "#/$defs/{name}"
COMPONENT = "#/components/schemas/{name}"


def protocol_schema() -> dict[str, Any]:
    """Every request, reply and object of the protocol, with each method's params and result.

    Reply objects always carry every key (taskd never leaves one out), so all their
    properties are required; a params key that is absent takes the default shown.
    """
    names = list(METHODS)
    params = [METHODS[name].params for name in names]
    results = [METHODS[name].result for name in names]
    envelope = [Request, Reply, ErrorBody]
    sent = [*results, ErrorBody, JobEvent]
    schemas, definitions = _schemas([*params, *results, *envelope], sent, REF)
    _integer_keys(sent, definitions)
    # A reply has its id and exactly one of the others, never nil.
    reply = definitions["Reply"]
    reply["properties"] |= {
        "error": {"$ref": REF.format(name="ErrorBody")},
        "event": {"$ref": REF.format(name="JobEvent")},
    }
    reply["properties"]["result"] = {"description": "the method's result: see `methods`"}
    reply |= {
        "additionalProperties": False,
        "oneOf": [{"required": [key]} for key in ("result", "error", "event")],
    }
    methods = {
        name: {
            "access": "write" if METHODS[name].writes else "read",
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


def _schemas(
    types: list[Any], sent: list[Any], ref_template: str
) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    """The schema of each type and the definitions they refer to.

    Objects taskd sends always carry every key, so all properties of the `sent` types (and
    of what they hold) are required.
    """
    schemas, definitions = msgspec.json.schema_components(types, ref_template=ref_template)
    _, sent_definitions = msgspec.json.schema_components(sent, ref_template=ref_template)
    for name in sent_definitions:
        definition = definitions[name]
        if definition.get("type") == "object" and definition.get("properties"):
            definition["required"] = sorted(definition["properties"])
            for field in definition["properties"].values():
                field.pop("default", None)  # never absent, so no default applies
    return schemas, definitions


def _integer_keys(types: list[Any], definitions: dict[str, Any]) -> None:
    """Maps whose keys are integers say so with `propertyNames`: msgpack keeps them integers
    (JSON Schema's objects would have strings)."""
    seen: set[str] = set()
    pending = list(msgspec.inspect.multi_type_info(types))
    while pending:
        kind = pending.pop()
        if isinstance(kind, msgspec.inspect.Metadata):
            pending.append(kind.type)
        elif isinstance(kind, msgspec.inspect.UnionType):
            pending.extend(kind.types)
        elif isinstance(kind, msgspec.inspect.ListType):
            pending.append(kind.item_type)
        elif isinstance(kind, msgspec.inspect.DictType):
            pending.append(kind.value_type)
        elif isinstance(kind, msgspec.inspect.StructType) and kind.cls.__name__ not in seen:
            seen.add(kind.cls.__name__)
            for field in kind.fields:
                pending.append(field.type)
                if isinstance(field.type, msgspec.inspect.DictType) and isinstance(
                    field.type.key_type, msgspec.inspect.IntType
                ):
                    properties = definitions[kind.cls.__name__]["properties"]
                    properties[field.encode_name]["propertyNames"] = {"type": "integer"}


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP API (taskd/http/api.py's routes)."""
    sent = [t for route in ROUTES for t in route.responses.values() if not isinstance(t, str)]
    sent += DOCUMENTED_TOO
    received = [t for r in ROUTES for t in (r.path_params, r.query, r.body) if t is not None]
    types = list(dict.fromkeys([*received, *sent, ErrorReply]))
    schemas, definitions = _schemas(types, [*sent, ErrorReply], COMPONENT)
    schema_of = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(
            route, schema_of, definitions
        )
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "taskd HTTP API",
            "version": str(PROTOCOL_VERSION),
            "description": (
                "taskd's optional HTTP API (the [http] table of taskd.toml), with Nitro's task "
                "endpoints. On a TCP address every request but /healthz needs "
                "`Authorization: Bearer TOKEN`; read-only tokens get 403 from the routes that "
                "run, enqueue, cancel or retry. On a Unix socket the caller's credentials "
                'decide, as for the control socket. Errors are `{"error": {"code", '
                '"message", "data"}}` with the codes of protocol.md and a few of HTTP\'s '
                "own. Times are Unix seconds, durations seconds."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(definitions.items())),
            "responses": {
                "Error": {
                    "description": "An error; `error.code` says which (see protocol.md)",
                    "content": {JSON: {"schema": schema_of[ErrorReply]}},
                }
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
    normalized: dict[str, Any] = _normalized(document)
    return normalized


# Statuses any route may answer besides its own: a bad request, a missing or unknown token
# (not for public routes), too little access, a slow or oversized request, a daemon that is
# busy, stopping or whose store failed, and a bug.
_COMMON_STATUSES = (400, 401, 403, 408, 413, 431, 500, 503)


def _operation(
    route: Route, schema_of: dict[Any, dict[str, Any]], definitions: dict[str, Any]
) -> dict[str, Any]:
    short = "_short" if route.path in ALIASES.values() else ""
    operation: dict[str, Any] = {
        "operationId": f"{route.operation}_{route.method.lower()}{short}",
        "summary": route.summary,
        "x-taskd-access": route.access,
    }
    if route.description is not None:
        operation["description"] = route.description
    parameters = _parameters(route, schema_of, definitions)
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": route.body_required,
            "content": {JSON: {"schema": schema_of[route.body]}},
        }
    responses: dict[str, Any] = {}
    statuses = set(route.responses) | set(_COMMON_STATUSES)
    if route.access == "public":
        statuses.discard(401)
        operation["security"] = []
    for status in sorted(statuses):
        bodies = [route.responses.get(status), ErrorReply if status >= 400 else None]
        content = [_content(body, schema_of) for body in dict.fromkeys(bodies) if body is not None]
        if route.responses.get(status, ErrorReply) is ErrorReply:
            responses[str(status)] = {"$ref": "#/components/responses/Error"}
            continue
        media = content[0][0]
        schema = content[0][1] if len(content) == 1 else {"anyOf": [c[1] for c in content]}
        responses[str(status)] = {
            "description": http.HTTPStatus(status).phrase,
            "content": {media: {"schema": schema}},
        }
    operation["responses"] = responses
    return operation


def _content(body: Any, schema_of: dict[Any, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The media type and schema of a response body: a type's JSON, or text."""
    if body == JSON:
        return JSON, {"type": "object"}
    if isinstance(body, str):
        return body.split(";")[0], {"type": "string"}
    if body in STREAMED:  # the schema of one event
        return STREAMED[body], schema_of[body]
    return JSON, schema_of[body]


def _parameters(
    route: Route, schema_of: dict[Any, dict[str, Any]], definitions: dict[str, Any]
) -> list[dict[str, Any]]:
    """The path parameters and query parameters, one per field of their Structs."""
    parameters = []
    for where, kind in (("path", route.path_params), ("query", route.query)):
        if kind is None:
            continue
        schema = schema_of[kind]
        if "$ref" not in schema:  # free-form: each query parameter is a payload key
            parameters.append({"name": "payload", "in": where, "schema": schema,
                               "style": "form", "explode": True})  # fmt: skip
            continue
        definition = definitions[schema["$ref"].rsplit("/", 1)[1]]
        for name, field in definition["properties"].items():
            parameter = {
                "name": name,
                "in": where,
                "required": where == "path" or name in definition.get("required", ()),
                "schema": _without_null(field),
            }
            if "description" in field:
                parameter["description"] = field["description"]
            if parameter["schema"].get("type") == "array":  # status=pending,failed
                parameter |= {"style": "form", "explode": False}
            parameters.append(parameter)
    if route.traced:
        schema = msgspec.json.schema(Traceparent)
        parameters.append({
            "name": "traceparent",
            "in": "header",
            "required": False,
            "description": "W3C Trace Context: the caller's span, under which the job's "
            "attempts are traced (README, \"Tracing\"); a malformed one is ignored"
            + (", and the body's `traceparent` wins" if route.operation == "enqueue" else ""),
            "schema": {k: v for k, v in schema.items() if k != "description"},
        })  # fmt: skip
    return parameters


def _without_null(field: dict[str, Any]) -> dict[str, Any]:
    """A field's schema less its `null` alternative, which a URL cannot express."""
    alternatives = [a for a in field.get("anyOf", ()) if a != {"type": "null"}]
    if len(alternatives) == 1:
        field = {**{k: v for k, v in field.items() if k != "anyOf"}, **alternatives[0]}
    return {k: v for k, v in field.items() if k != "description"}


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
    document = openapi_schema() if sys.argv[1:] == ["openapi"] else protocol_schema()
    sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(document)) + b"\n")


if __name__ == "__main__":
    main()
