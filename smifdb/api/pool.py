"""Database calls from async handlers: psycopg is synchronous here, so each runs in a thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

T = TypeVar("T")


async def in_db(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(conn, *args)`` on a pooled connection in a worker thread."""

    def call() -> T:
        with request.app.state.pool.connection() as conn:
            return fn(conn, *args)

    return await run_in_threadpool(call)
