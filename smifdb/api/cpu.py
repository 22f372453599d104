"""CPU-heavy request work — decoding and validating big bodies — off the event loop, bounded.

A 1 MB DAG spec takes ~0.2 s of pure Python to decode and check. On the event loop, twenty of
them stall every other request for seconds. In unbounded worker threads they would still hold
the GIL twenty turns to the loop's one; so at most PARSE_THREADS run at once (an
anyio.CapacityLimiter per app) and the rest wait their turn, holding nothing. Small bodies,
the common case, are decoded in place: a thread hop costs more than they do.

Writing a big submission is as heavy (building its COPY rows, 0.1 s for 6000 jobs) and holds
a pooled connection throughout: it runs under the same limiter, so twenty at once take two of
the pool's connections, not all of them, and the loop still gets the GIL. They queue instead:
on a busy 2-core machine 20 x 1 MB took 11-20 s (10 s before), while a cheap route answered
at a median of 0.1-0.2 s and at worst 1-2 s (3 s and 6-14 s with parsing on the loop).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from starlette.requests import Request

T = TypeVar("T")
PARSE_THREADS = 2
INLINE_BYTES = 64 * 1024  # bodies up to this are decoded on the event loop


def limiter(threads: int = PARSE_THREADS) -> anyio.CapacityLimiter:
    return anyio.CapacityLimiter(threads)


async def heavy(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread, at most the app's parse limiter's threads at once."""
    call = functools.partial(fn, *args)
    return await anyio.to_thread.run_sync(call, limiter=request.app.state.parse_limiter)


async def maybe_heavy(request: Request, size: int, fn: Callable[..., T], *args: Any) -> T:
    """``heavy`` for a body over INLINE_BYTES, else ``fn(*args)`` here and now."""
    if size <= INLINE_BYTES:
        return fn(*args)
    return await heavy(request, fn, *args)
