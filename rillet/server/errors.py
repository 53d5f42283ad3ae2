"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error a client gets back as an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_bytes(status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps(error_body(status, message, None, code)).encode()


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key; send it as `Authorization: Bearer KEY`.",
                    code="invalid_api_key")


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the server's limit of {limit} bytes.",
                    code="request_too_large")


def queue_full(limit: int, retry_after_s: int) -> APIError:
    return APIError(429, f"The server's waiting queue is full ({limit} sequences); retry later.",
                    code="queue_full", headers={"Retry-After": str(retry_after_s)})


def unavailable(message: str) -> APIError:
    return APIError(503, message, code="unavailable", headers={"Retry-After": "1"})


def internal(message: str) -> APIError:
    return APIError(500, message, code="internal_error")


# -- FastAPI handlers -----------------------------------------------------------------------------

async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else None
    return APIError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {})).response()


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error(exc.errors()).response()


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return internal("The server failed to handle the request.").response()


def validation_error(errors: Any) -> APIError:
    """A pydantic error list as one 400: the first problem, named by its JSON path."""
    first = list(errors)[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if not _is_type_tag(part)]
    param = ".".join(loc) or None
    where = f" at `{param}`" if param else ""
    return bad_request(f"Invalid request{where}: {first.get('msg', 'invalid value')}", param)


def _is_type_tag(part: Any) -> bool:
    # pydantic names the union member that failed: ("stop", "list[str]", 0)
    return part == "body" or (isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part))


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"})


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
