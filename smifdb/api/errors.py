"""JSON errors for every failure: bad input is a 4xx with a message, never a 500 page."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"data": None, "error": {"code": status, "message": message}}, status)


async def api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail))


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}")


HANDLERS = {ApiError: api_error, HTTPException: http_error, Exception: unexpected}


async def read_json(request: Request, *, max_bytes: int) -> Any:
    """The request's JSON body; 413 if too large, 400 if it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body over {max_bytes} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, f"request body over {max_bytes} bytes")
    if not body.strip():
        raise ApiError(400, "a JSON body is required")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from exc


def int_param(request: Request, name: str) -> int:
    value = request.path_params[name]
    if isinstance(value, int):
        return value
    if not str(value).isdigit() or len(str(value)) > 18:
        raise ApiError(404, f"no {name.removesuffix('_id')} {value!r}")
    return int(value)
