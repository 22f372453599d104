"""Database calls from async handlers: psycopg is synchronous here, so each runs in a thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from starlette.requests import Request

T = TypeVar("T")


async def in_db(
    request: Request,
    fn: Callable[..., T],
    *args: Any,
    limiter: anyio.CapacityLimiter | None = None,
) -> T:
    """Run ``fn(conn, *args)`` on a pooled connection in a worker thread (one of ``limiter``'s
    if given, else of the default pool's)."""

    def call() -> T:
        with request.app.state.pool.connection() as conn:
            return fn(conn, *args)

    return await anyio.to_thread.run_sync(call, limiter=limiter)
