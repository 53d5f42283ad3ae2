"""The server's OpenAPI schema, with the request bodies the handlers parse themselves.

Handlers read their bodies as bytes (to answer malformed JSON, invalid UTF-8 and oversized bodies
with OpenAI errors), so FastAPI cannot see the request models; they are added here. Fuzzers
(schemathesis) and client generators read the schema at `GET /openapi.json`.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from rillet.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

_ERROR = {"description": "An OpenAI error body: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}"}


def request_bodies() -> dict[str, type[BaseModel]]:
    """The JSON body of each POST route."""
    from rillet.server.sessions import SessionAppend, SessionGenerate, SessionOpen

    return {
        "/v1/completions": CompletionRequest,
        "/v1/chat/completions": ChatCompletionRequest,
        "/tokenize": TokenizeRequest,
        "/detokenize": DetokenizeRequest,
        "/v1/sessions": SessionOpen,
        "/v1/sessions/{session_id}/append": SessionAppend,
        "/v1/sessions/{session_id}/generate": SessionGenerate,
    }


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema of the routes, with each POST route's JSON body and error statuses."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    bodies = request_bodies()
    models: list[tuple[type[BaseModel], Literal["validation"]]] = [(m, "validation") for m in bodies.values()]
    refs, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    for path, model in bodies.items():
        post = schema.get("paths", {}).get(path, {}).get("post")
        if post is None:
            continue
        post["requestBody"] = {"required": True,
                               "content": {"application/json": {"schema": refs[(model, "validation")]}}}
        post["responses"].update({str(status): _ERROR for status in (400, 401, 404, 413, 429, 500, 503)})
    app.openapi_schema = schema
    return schema
