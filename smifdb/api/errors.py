"""JSON errors for every failure: bad input is a 4xx with a message, never a 500 page."""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from smifdb import errors
from smifdb.api.cpu import maybe_heavy
from smifdb.limits import MAX_DEPTH, MAX_YAML_BODY, LimitError, load_yaml

log = logging.getLogger(__name__)


class ApiError(errors.Error):
    """An answer only HTTP has a word for; the store's own errors (smifdb.errors) map alike."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        problems: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, problems=problems, headers=headers)
        self.status = status


def error_response(
    request: Request,
    status: int,
    message: str,
    problems: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """smif's envelope under /api/; elsewhere (the DAFNI shim) the shape dafni-cli reads."""
    if request.url.path.startswith("/api/"):
        error: dict[str, Any] = {"code": status, "message": message}
        if problems:
            error["problems"] = problems
        return JSONResponse({"data": None, "error": error}, status, headers=headers)
    body: dict[str, Any] = {"error": HTTPStatus(status).phrase, "error_message": message}
    if problems:
        body["errors"] = problems
    return JSONResponse(body, status, headers=headers)


async def api_error(request: Request, exc: Exception) -> JSONResponse:
    """Every smifdb.errors.Error, mapped once: its status, message, problems and headers."""
    assert isinstance(exc, errors.Error)
    return error_response(request, exc.status, exc.message, exc.problems, exc.headers)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(request, exc.status_code, str(exc.detail), headers=exc.headers)


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, 500, f"internal error: {type(exc).__name__}")


HANDLERS = {errors.Error: api_error, HTTPException: http_error, Exception: unexpected}


async def read_body(request: Request, *, max_bytes: int) -> bytes:
    """The request's body; 413 as soon as it is known to be too large."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body over {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"request body over {max_bytes} bytes")
    return b"".join(chunks)


def _encodable(value: Any, *, strings: bool = True) -> Any:
    """JSON allows escaped lone surrogates ("\\ud800"), which no UTF-8 column can store;
    nor may anything nest past MAX_DEPTH. Walked level by level without recursion, checking
    both (strings only if ``strings``)."""
    level, depth = [value], 0
    while level:
        containers = []
        for item in level:
            if isinstance(item, dict):
                if strings:
                    _strings(item)
                    _strings(item.values())
                containers += [v for v in item.values() if type(v) in _CONTAINERS]
            elif isinstance(item, list):
                if strings:
                    _strings(item)
                containers += [v for v in item if type(v) in _CONTAINERS]
            elif strings and isinstance(item, str):
                item.encode()
        if containers and (depth := depth + 1) >= MAX_DEPTH:
            raise LimitError(f"nested more than {MAX_DEPTH} levels deep")
        level = containers
    return value


_CONTAINERS = (dict, list)


def _strings(items: Any) -> None:
    for item in items:
        if type(item) is str:
            item.encode()


def _load_json(body: bytes) -> Any:
    """json.loads, then _encodable's walk where the text could need it: a surrogate can only
    come from a \\uD8xx-\\uDFxx escape, and only more brackets than MAX_DEPTH can nest that
    deep. (Cheaper than load_json's pre-scan, which files and specs still use: a runner's
    batch of outcomes is decoded in half the time.)"""
    encoding = json.detect_encoding(body)
    # Strict UTF-8 (json.loads would pass surrogates encoded in it); others, as json.loads.
    text = body.decode(encoding, "strict" if encoding == "utf-8" else "surrogatepass")
    try:
        value = _DECODER.decode(text)
    except RecursionError:  # the C parser's own limit, far past MAX_DEPTH
        raise LimitError(f"nested more than {MAX_DEPTH} levels deep") from None
    escapes = encoding != "utf-8" or _SURROGATE_ESCAPE.search(body) is not None
    if escapes or body.count(b"[") + body.count(b"{") > MAX_DEPTH:
        _encodable(value, strings=escapes)
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _Constant(ValueError):
    """NaN, Infinity or -Infinity: json.loads takes them, JSON and jsonb do not."""


def _no_constant(name: str) -> Any:
    raise _Constant(f"{name} is not JSON (nor storable as jsonb)")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)  # made once: json.loads makes one a call


def decode(body: bytes, *, yaml_too: bool = False) -> Any:
    """JSON (or, for definitions sent as files, YAML) text as values; 400 if it is neither,
    or nests too deep, or holds NaN or Infinity; 413 if YAML aliases expand it too far."""
    try:
        return _load_json(body)
    except UnicodeEncodeError as exc:
        raise ApiError(400, "the body has an unpaired surrogate (\\ud800-\\udfff)") from exc
    except LimitError as exc:
        raise ApiError(exc.status, f"the body is {exc}") from exc
    except _Constant as exc:
        raise ApiError(400, f"the body is refused: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        if not yaml_too:
            raise ApiError(400, f"malformed JSON: {exc}") from exc
        if len(body) > MAX_YAML_BODY:
            raise ApiError(
                413,
                f"a body that is not JSON is read as YAML up to {MAX_YAML_BODY} bytes: "
                f"send a larger one as JSON ({exc})",
            ) from exc
    import yaml

    try:
        return _encodable(load_yaml(body))
    except UnicodeEncodeError as exc:
        raise ApiError(400, "the body has an unpaired surrogate (\\ud800-\\udfff)") from exc
    except LimitError as exc:
        raise ApiError(exc.status, f"the body is refused: {exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is neither JSON nor YAML: {exc}") from exc


async def read_json(request: Request, *, max_bytes: int, required: bool = True) -> Any:
    """The request's JSON body (a big one decoded off the event loop); 413 if too large, 400 if
    it is not JSON."""
    body = await read_body(request, max_bytes=max_bytes)
    if not body.strip():
        if required:
            raise ApiError(400, "a JSON body is required")
        return {}
    return await maybe_heavy(request, len(body), decode, body)


def int_param(request: Request, name: str) -> int:
    value = request.path_params[name]
    if isinstance(value, int):
        return value
    if not str(value).isdigit() or len(str(value)) > 18:
        raise ApiError(404, f"no {name.removesuffix('_id')} {value!r}")
    return int(value)
