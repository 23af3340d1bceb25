"""The OpenAPI 3.1 document of the HTTP/JSON front, built from the route table (`http_routes`)
and the memspace.v1 protobuf descriptors (schemas in the proto3 JSON mapping, with the .proto's
field names). The server serves it at /openapi.json; docs/openapi.json is the committed copy,
which `make lint` checks against this code:

    python -m memspace_server.api.openapi --check docs/openapi.json
    python -m memspace_server.api.openapi --write docs/openapi.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf import descriptor

from memspace_contract.v1 import memspace_pb2 as pb
from memspace_server.api import errors_map
from memspace_server.api.http_routes import ROUTES, Body, Operation

TITLE = "memspace HTTP/JSON API"
VERSION = "v1"
ERROR_STATUSES = (400, 401, 403, 404, 409, 429, 503)
"""The refusals every operation documents (errors_map.HTTP_STATUS of the codes memspace uses)."""
_F = descriptor.FieldDescriptor
UINT64 = {
    "anyOf": [
        {"type": "string", "pattern": "^[0-9]{1,20}$"},
        {"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
    ],
    "description": "A 64-bit unsigned integer; answers carry it as a decimal string",
}
_SCALARS: dict[int, dict[str, Any]] = {
    _F.TYPE_STRING: {"type": "string"},
    _F.TYPE_BOOL: {"type": "boolean"},
    _F.TYPE_FLOAT: {"type": "number"},
    _F.TYPE_DOUBLE: {"type": "number"},
    _F.TYPE_UINT32: {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    _F.TYPE_UINT64: UINT64,
}


def _field_schema(field: descriptor.FieldDescriptor) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _single(value)}
    single = _single(field)
    if field.is_repeated:
        return {"type": "array", "items": single}
    return single


def _single(field: descriptor.FieldDescriptor) -> dict[str, Any]:
    if field.message_type is not None:
        if field.message_type.full_name == "google.protobuf.Timestamp":
            return {"type": "string", "format": "date-time"}
        return {"$ref": f"#/components/schemas/{field.message_type.name}"}
    if field.enum_type is not None:
        return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
    return dict(_SCALARS[field.type])


def message_schema(
    message: descriptor.Descriptor, leave_out: frozenset[str] = frozenset()
) -> dict[str, Any]:
    properties = {
        field.name: _field_schema(field) for field in message.fields if field.name not in leave_out
    }
    return {"type": "object", "properties": properties, "additionalProperties": False}


def _messages() -> list[descriptor.Descriptor]:
    """Every message type the routes send or answer, and the ones they hold."""
    found: dict[str, descriptor.Descriptor] = {}

    def visit(message: descriptor.Descriptor) -> None:
        if message.GetOptions().map_entry:
            for field in message.fields:
                if field.message_type is not None:
                    visit(field.message_type)
            return
        if message.full_name in found or message.full_name.startswith("google.protobuf."):
            return
        found[message.full_name] = message
        for field in message.fields:
            if field.message_type is not None:
                visit(field.message_type)

    for op in ROUTES:
        method = _method(op)
        visit(method.input_type)
        visit(method.output_type)
    return sorted(found.values(), key=lambda message: message.name)


def _method(op: Operation) -> descriptor.MethodDescriptor:
    return pb.DESCRIPTOR.services_by_name[op.service].methods_by_name[op.method]


def _parameters(op: Operation) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for name in op.path_fields:
        schema: dict[str, Any] = {"type": "string", "minLength": 1}
        if name == "space":
            schema = {
                "type": "string",
                "pattern": "^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$",
                "examples": ["default"],
            }
        elif name == "id":
            schema = {"type": "string", "minLength": 1, "maxLength": 128}
        found.append({"name": name, "in": "path", "required": True, "schema": schema})
    input_type = _method(op).input_type
    found.extend(
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": _single(input_type.fields_by_name[name]),
        }
        for name in op.query
    )
    if "space" in input_type.fields_by_name:
        found.append(
            {
                "name": "X-Memory-Space",
                "in": "header",
                "required": False,
                "description": "The call's space; wins over the path's. Naming another space "
                "than the path is refused (400), never a fallback.",
                "schema": {"type": "string"},
            }
        )
    if op.events:
        found.append(
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "description": "The LSN of the last event seen: the stream resumes after it",
                "schema": {"type": "string", "pattern": "^[0-9]{1,20}$"},
            }
        )
    found.append(
        {
            "name": "X-Request-Id",
            "in": "header",
            "required": False,
            "description": "The ID the server logs the call under (else it makes one)",
            "schema": {"type": "string", "maxLength": 64},
        }
    )
    return found


def _request_body(op: Operation) -> dict[str, Any] | None:
    input_type = _method(op).input_type
    schema: dict[str, Any]
    if op.body is Body.NONE:
        return None
    if op.body is Body.MEMORY:
        schema = {"$ref": "#/components/schemas/Memory"}
    elif op.body is Body.MEMORIES:
        schema = {
            "type": "object",
            "properties": {
                "memories": {"type": "array", "items": {"$ref": "#/components/schemas/Memory"}}
            },
            "required": ["memories"],
            "additionalProperties": False,
        }
    else:
        schema = message_schema(input_type, frozenset({*op.path_fields, "space"}))
    return {
        "required": op.body is not Body.FIELDS,
        "content": {"application/json": {"schema": schema}},
    }


def _operation(op: Operation) -> dict[str, Any]:
    output = _method(op).output_type.name
    ok: dict[str, Any]
    if op.events:
        ok = {
            "description": "Server-Sent Events: `id` the LSN, `event` remembered, forgotten or "
            f"error, `data` a {output} (an Error for `error`) as JSON",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    else:
        ok = {
            "description": output,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{output}"}}},
        }
    responses: dict[str, Any] = {"200": ok}
    for status in ERROR_STATUSES:
        codes = sorted(
            code.name for code, mapped in errors_map.HTTP_STATUS.items() if mapped == status
        )
        responses[str(status)] = {
            "description": " or ".join(codes),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    found: dict[str, Any] = {
        "operationId": op.operation_id + ("OfEverySpace" if "{space}" not in op.path else ""),
        "summary": op.summary,
        "tags": [op.service],
        "parameters": _parameters(op),
    }
    body = _request_body(op)
    if body is not None:
        found["requestBody"] = body
    found["responses"] = responses
    return found


ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "The gRPC status code name"},
        "message": {"type": "string"},
        "retry_after_s": {"type": "number", "description": "Seconds until a retry can succeed"},
        "resume_lsn": {
            "type": "string",
            "description": "Subscribe: the since_lsn to resume the stream from",
        },
    },
    "required": ["code", "message"],
}


@functools.cache
def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in ROUTES:
        paths.setdefault(op.path, {})[op.verb.lower()] = _operation(op)
    schemas: dict[str, Any] = {message.name: message_schema(message) for message in _messages()}
    schemas["Error"] = ERROR_SCHEMA
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "memspace.v1 over HTTP/JSON: every MemoryService and SpaceService "
            "method, through the same routing, auth and error table as gRPC (docs/api.md).",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }


def text() -> str:
    return json.dumps(document(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", type=Path, metavar="FILE", help="fail if FILE differs")
    action.add_argument("--write", type=Path, metavar="FILE", help="write the document to FILE")
    args = parser.parse_args(argv)
    if args.write is not None:
        args.write.write_text(text())
        return 0
    current = args.check.read_text() if args.check.exists() else ""
    if current != text():
        print(
            f"{args.check} is not the document the code serves: run "
            f"`python -m memspace_server.api.openapi --write {args.check}` and commit it",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
