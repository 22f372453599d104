"""The HTTP API: a Starlette app over the same data layer as the CLI (stateless; run many)."""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import anyio
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.middleware import Middleware

from smifdb import store
from smifdb.api import (
    cpu,
    dafni,
    dashboard,
    metrics,
    openapi,
    results,
    runners,
    session,
    smifapp,
    v1,
)
from smifdb.api.errors import HANDLERS
from smifdb.api.security import Guard, Settings
from smifdb.api.wakeup import Wakeup

MAX_BODY = 1_000_000  # bytes
# scrypt (~70 ms of CPU each) in at most half the cores: a flood of sign-ins leaves the others
# to every other route.
HASHING_THREADS = max(1, (os.cpu_count() or 2) // 2)
POOL_SIZE = 8  # connections per API process, however many clients and runners it serves


def create_app(
    dsn: str,
    *,
    project_dir: str | Path | None = None,
    max_body: int = MAX_BODY,
    pool_size: int = POOL_SIZE,
    dead_after: float = 30.0,
    allowed_hosts: Iterable[str] = (),
    bind_host: str | None = None,
    public_url: str | None = None,
    metrics_token: str | None = None,
    parse_threads: int = cpu.PARSE_THREADS,
) -> Starlette:
    """An app bound to one database (and optionally one smif project for the smif app API).

    ``allowed_hosts`` (besides
    loopback names and ``bind_host``) are the Host headers it answers; ``public_url`` is where
    clients reach it, for the URLs it hands out (docs/security.md). ``parse_threads`` bounds
    how many big bodies are decoded, validated and written at once (smifdb.api.cpu).
    """
    settings = Settings.make(
        allowed_hosts=allowed_hosts,
        bind_host=bind_host,
        public_url=public_url,
        metrics_token=metrics_token,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "application_name": "smifdb api"},
            open=False,
        )
        pool.open(wait=True, timeout=30)
        with pool.connection() as conn:
            store.check_schema(conn)
        app.state.pool = pool
        app.state.hash_limiter = anyio.CapacityLimiter(HASHING_THREADS)
        app.state.wakeup = Wakeup(dsn)  # listens once a runner waits
        try:
            yield
        finally:
            app.state.wakeup.close()
            pool.close()

    project = str(Path(project_dir).resolve()) if project_dir else None
    app = Starlette(
        routes=[
            *session.ROUTES,
            *results.ROUTES,
            *smifapp.ROUTES,  # before v1's: they answer model runs' GETs for a project
            *v1.ROUTES,
            *runners.ROUTES,
            *dafni.ROUTES,
            *openapi.ROUTES,
            *metrics.ROUTES,
            *dashboard.routes(dashboard.smif_bundle(project)),
        ],
        middleware=[Middleware(Guard, settings=settings)],
        exception_handlers=HANDLERS,
        lifespan=lifespan,
    )
    app.state.project_dir = project
    app.state.max_body = max_body
    app.state.security = settings
    app.state.dead_after = dead_after
    app.state.parse_limiter = cpu.limiter(parse_threads)
    app.state.runner_requests = collections.Counter()  # this process's, for /metrics
    return app
