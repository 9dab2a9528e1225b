"""The OpenAPI 3.1 document (``/openapi.json``) and the API reference page (``/docs``).

The document is generated, never written by hand: its component schemas come from the pydantic response models in
``shared.schema`` that the views build their JSON with (and from the dataclass the worker builds a result with), and
its paths from the app's own URL map. Each view says what it answers with ``@operation(...)`` beside its route; a
route without one is left out of the document, and the suite fails on any such route (tests/test_openapi.py).
Limits that are settings (the longest ``wait``, the largest upload) are read from the app's settings, so the document
describes the server that serves it.

``/docs`` is Swagger UI from vendored files (web/static/docs, see its README), under the same strict
Content-Security-Policy as every page: it needs no inline script or style.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify

from shared.config import Settings
from shared.schema import openapi_schemas
from web import services

bp = Blueprint("openapi", __name__)

SCHEMAS = "#/components/schemas/"
BEARER = "bearerAuth"

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    """A reference to the component schema ``name`` (a model of shared.schema)."""
    return {"$ref": SCHEMAS + name}


def json_body(name: str) -> dict[str, Schema]:
    return {"application/json": ref(name)}


@dataclass(frozen=True)
class Reply:
    """One documented response: a description, its bodies by media type, its headers (names in ``HEADERS``)."""

    description: str
    content: Mapping[str, Schema] = field(default_factory=dict)
    headers: tuple[str, ...] = ()


# Response headers the API sends: (schema, description, whether every response that lists it carries it).
HEADERS: dict[str, tuple[Schema, str, bool]] = {
    "Location": ({"type": "string"}, "the job's URL (GET it for the result)", True),
    "Content-Location": ({"type": "string"}, "the job record this answer was made from", True),
    "Retry-After": ({"type": "integer", "minimum": 0}, "seconds to wait before trying again", True),
    "WWW-Authenticate": ({"type": "string"}, 'always `Bearer realm="arabic-words"`', True),
    "RateLimit-Limit": ({"type": "integer"}, "the client's requests per minute (only when it is limited)", False),
    "RateLimit-Remaining": ({"type": "integer"}, "requests left in the client's bucket now", False),
    "RateLimit-Reset": ({"type": "integer"}, "seconds until the bucket is full again", False),
}
RATE_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")

# What each error status means across the API; an operation may say more (``errors(..., notes=...)``).
ERRORS: dict[int, tuple[str, tuple[str, ...]]] = {
    400: ("invalid request (the body's `error.code` says which field)", ()),
    401: ("no API key, or an unknown one, while keys are required (AUTH_MODE): `unauthorized`", ("WWW-Authenticate",)),
    403: ("the API key was revoked: `key_revoked`", ()),
    404: ("unknown or expired job id, or another key's job: `not_found`", ()),
    413: ("the upload is over MAX_UPLOAD_BYTES: `upload_too_large`", ()),
    415: (
        "`unsupported_media_type`: neither multipart nor an audio body; `invalid_audio`: the bytes are not a WebM, "
        "OGG, MP3, M4A/MP4, AAC, WAV, FLAC or AIFF file (nothing is stored)",
        (),
    ),
    429: (
        "`queue_full` (admission control), `rate_limited`, `too_many_inflight` or `quota_exceeded` (the client's "
        "limits)",
        ("Retry-After",),
    ),
    500: ("a bug of ours: `internal_error`", ()),
    503: ("Redis or the queue is unavailable: `service_unavailable` (an upload was not accepted)", ("Retry-After",)),
    504: ("the job ran past its time limit: `timeout`", ()),
}


def errors(*statuses: int, schema: str = "ErrorBody", notes: Mapping[int, str] | None = None) -> dict[int, Reply]:
    """The documented error responses ``statuses``, with the body ``schema`` and ``ERRORS``' descriptions."""
    notes = notes or {}
    return {
        status: Reply(notes.get(status, ERRORS[status][0]), json_body(schema), ERRORS[status][1]) for status in statuses
    }


Resolvable = Callable[[Settings], Any]


@dataclass(frozen=True)
class Operation:
    """What one route answers. ``parameters`` and ``request_body`` may be functions of the app's settings (limits
    that are settings); ``path`` describes the route's path variables; ``secured``: under the API's bearer auth."""

    summary: str
    responses: Mapping[int, Reply]
    description: str = ""
    tags: tuple[str, ...] = ()
    parameters: list[Schema] | Resolvable = field(default_factory=list)
    request_body: Schema | Resolvable | None = None
    path: Mapping[str, str] = field(default_factory=dict)
    secured: bool = True

    def build(self, operation_id: str, path_args: list[str], settings: Settings) -> Schema:
        parameters = [
            {"name": name, "in": "path", "required": True, "description": self.path.get(name, ""),
             "schema": {"type": "string", "minLength": 1}}
            for name in path_args
        ]  # fmt: skip
        parameters += _resolve(self.parameters, settings)
        out: Schema = {"operationId": operation_id, "summary": self.summary, "tags": list(self.tags)}
        if self.description:
            out["description"] = self.description
        if parameters:
            out["parameters"] = parameters
        body = _resolve(self.request_body, settings)
        if body is not None:
            out["requestBody"] = body
        out["responses"] = {
            str(status): _reply(reply, rate_headers=self.secured) for status, reply in sorted(self.responses.items())
        }
        out["security"] = [{BEARER: []}] if self.secured else []
        return out


def operation(summary: str, responses: Mapping[int, Reply], **details: Any) -> Callable:
    """Document the view it decorates (put it under the route decorator); ``details``: Operation's other fields."""
    spec = Operation(summary, responses, **details)

    def attach(view: Callable) -> Callable:
        view.openapi = spec  # type: ignore[attr-defined]
        return view

    return attach


def _resolve(value: Any, settings: Settings) -> Any:
    return value(settings) if callable(value) else value


def _reply(reply: Reply, rate_headers: bool) -> Schema:
    out: Schema = {"description": reply.description}
    names = list(reply.headers) + (list(RATE_HEADERS) if rate_headers else [])
    if names:
        out["headers"] = {name: {"$ref": f"#/components/headers/{name}"} for name in names}
    if reply.content:
        out["content"] = {media: {"schema": schema} for media, schema in reply.content.items()}
    return out


# Routes registered without ``@operation`` (web/pages.py, web/metrics.py), documented here by endpoint.
EXTERNAL: dict[str, Operation] = {
    "pages.index": Operation(
        "The recording page",
        {200: Reply("an HTML page (record a word or pick a file)", {"text/html": {}})},
        tags=("pages",),
        secured=False,
    ),
    "metrics": Operation(
        "Prometheus metrics of this web server (keep it off the public internet)",
        {200: Reply("the Prometheus text exposition format", {"text/plain": {"type": "string"}})},
        tags=("health",),
        secured=False,
    ),
}
# Endpoints that are not part of the API (files under /static).
UNDOCUMENTED = {"static"}

_PATH_VARIABLE = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")

DESCRIPTION = """\
Asynchronous transcription of short Arabic spoken words: upload a recording, get a job id, poll (or long-poll) for
the text, its confidence and word timings. `POST /v1/audio/transcriptions` is an OpenAI-compatible synchronous
wrapper over the same queue.

Every `/v1` route takes `Authorization: Bearer <key>` when the server requires keys (`AUTH_MODE`; by default when it
binds a non-loopback address); otherwise the header is not needed and not checked. Limited clients get
`RateLimit-*` headers. Errors are JSON `{"error": {"code", "message"}}` (on the OpenAI-compatible route, OpenAI's
`{"error": {"message", "type", "param", "code"}}`)."""


def document(app: Flask) -> Schema:
    """The OpenAPI document of ``app`` (built once per app)."""
    cached = app.extensions.get("arabic_words_openapi")
    if cached is None:
        cached = app.extensions["arabic_words_openapi"] = build_document(app)
    return cached


def build_document(app: Flask) -> Schema:
    settings = services(app).settings
    paths: dict[str, dict[str, Schema]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        spec = described(app, rule.endpoint)
        if spec is None:
            continue
        path = _PATH_VARIABLE.sub(r"{\1}", rule.rule)
        path_args = _PATH_VARIABLE.findall(rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operation_id = rule.endpoint.replace(".", "_")
            paths.setdefault(path, {})[method.lower()] = spec.build(operation_id, path_args, settings)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "arabic-words",
            "version": _version(),
            "description": DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },  # fmt: skip
        "paths": paths,
        "components": {
            "schemas": openapi_schemas(ref_prefix=SCHEMAS),
            "headers": {
                name: {"description": text, "required": required, "schema": schema}
                for name, (schema, text, required) in HEADERS.items()
            },
            "securitySchemes": {
                BEARER: {"type": "http", "scheme": "bearer", "description": "an API key (`arabic-words keys create`)"}
            },
        },
    }


def described(app: Flask, endpoint: str) -> Operation | None:
    """The documentation of ``endpoint``, None for an undocumented one."""
    view = app.view_functions.get(endpoint)
    return getattr(view, "openapi", None) or EXTERNAL.get(endpoint)


def _version() -> str:
    try:
        return metadata.version("arabic-words")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


# ---------------------------------------------------------------------------------------------------- routes
@bp.get("/openapi.json")
@operation(
    "This document", {200: Reply("the OpenAPI 3.1 document of this server", {"application/json": {"type": "object"}})},
    tags=("docs",), secured=False,
)  # fmt: skip
def openapi_json():
    return jsonify(document(current_app))


@bp.get("/docs")
@operation(
    "The API reference page", {200: Reply("Swagger UI, from this server's own files", {"text/html": {}})},
    tags=("docs",), secured=False,
)  # fmt: skip
def docs():
    return current_app.send_static_file("docs/index.html")
