"""Keyset pages for the list endpoints under /api/v1: ``?limit=`` and an opaque ``?cursor=``.

A cursor names the last row of the page before (never an OFFSET, which reads and drops every
row before it), so each page is one index range however long the list. It is base64url of
``[list, key]``: a cursor of another list (or another workflow's jobs) is a 400, not a page of
the wrong rows. The next page's cursor travels in the body's top-level ``"next"`` (null on the
last page), beside smif's ``data`` and ``error``, and in a ``Link: <…>; rel="next"`` header.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from starlette.requests import Request

from smifdb.api.errors import ApiError
from smifdb.limits import MAX_KEY_LENGTH

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_ID = 2**63 - 1
MAX_TEXT_KEY = 200  # runner names are at most 200 characters
MAX_PATH_KEY = 4096  # a stored file's path, as a page's last one


def limit(request: Request) -> int:
    """``?limit=``: 1 to MAX_LIMIT rows, DEFAULT_LIMIT if absent; 400 otherwise."""
    text = request.query_params.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not (text.isascii() and text.isdigit() and len(text) <= 6 and 1 <= int(text) <= MAX_LIMIT):
        raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIMIT}, not {text[:40]!r}")
    return int(text)


def encode(kind: str, key: int | str | tuple[str, str]) -> str:
    raw = json.dumps([kind, key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursor(request: Request, kind: str, key_type: type[int] | type[str] | type[tuple] = int) -> Any:
    """The key a ``?cursor=`` of this list names, or None without one; 400 for any other.

    ``tuple``: a pair of strings, such as a job's key and a file's path."""
    text = request.query_params.get("cursor")
    if text is None:
        return None
    key = _decode(text, kind)
    if key_type is int:
        ok = type(key) is int and 0 < key <= MAX_ID
    elif key_type is tuple:
        ok = isinstance(key, list) and len(key) == 2 and all(isinstance(k, str) for k in key)
        ok = ok and 0 < len(key[0]) <= MAX_KEY_LENGTH and 0 < len(key[1]) <= MAX_PATH_KEY
        key = tuple(key) if ok else key
    else:
        ok = isinstance(key, str) and 0 < len(key) <= MAX_TEXT_KEY
    if not ok:
        raise _bad_cursor(text)
    return key


def _decode(text: str, kind: str) -> Any:
    if len(text) > 8192:
        raise _bad_cursor(text)
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        value = json.loads(raw)
    except (binascii.Error, ValueError):
        raise _bad_cursor(text) from None
    if not (isinstance(value, list) and len(value) == 2 and value[0] == kind):
        raise _bad_cursor(text)
    return value[1]


def _bad_cursor(text: str) -> ApiError:
    return ApiError(
        400, f"bad cursor {text[:40]!r}: pass back the 'next' of a page of this same list"
    )


def next_link(request: Request, next_cursor: str) -> str:
    """The next page's URL, relative (right behind any proxy), other parameters kept."""
    url = request.url.include_query_params(cursor=next_cursor)
    return f'<{url.path}?{url.query}>; rel="next"'
