"""The runner protocol, /api/runner/v1/: what a runner that reaches only the API says.

Each operation is a JSON POST answered by the same DirectChannel operation a runner on the
database's site calls (smifdb.transport), on one pooled connection: one short transaction,
nothing kept here between requests, so any API process serves any runner. Only tokens of
role ``runner`` get here (smifdb.api.security), and a runner's name is qualified by its
user's ("alice/host-123"): a token can record outcomes only for runners it registered.

``wait`` is the long poll: it answers when this process's one LISTEN hears of work (or a
cancel), making no query of its own, so idle runners cost the database nothing but their
heartbeats. Blobs stream in and out (GET/PUT blobs/<sha256>), checked against their hash.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import psycopg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from smifdb.api import downloads
from smifdb.api.errors import ApiError, read_json
from smifdb.api.pool import in_db
from smifdb.store import blobs, jobfiles
from smifdb.store import runners as runner_rows
from smifdb.store.queue import MAX_RUNNER_LOSSES, FinishReport, Outcome, Scope
from smifdb.transport import (
    PROTOCOL,
    entry_json,
    outcome_from,
    report_json,
    successes_from,
)
from smifdb.transport.direct import DirectChannel

PREFIX = f"/api/runner/{PROTOCOL}"
MAX_BODY = 64 * 2**20  # a batch of outcomes with their logs' tails (the client sends ≤ 16 MiB)
MAX_IDS = 100_000
MAX_WAIT = 60.0
BIGINT = 2**63 - 1
STATES = ("active", "draining", "stopped")

Body = dict[str, Any]


# -- arguments -------------------------------------------------------------------------------


def _int(body: Body, key: str, *, default: Any = ..., low: int = 0, high: int = BIGINT) -> Any:
    value = body.get(key, default)
    if value is ...:
        raise ApiError(400, f"{key!r} is required")
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{key!r} must be a whole number from {low} to {high}")
    return value


def _seconds(body: Body, key: str, default: float, high: float = 1e7) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= high:
        raise ApiError(400, f"{key!r} must be a number of seconds above 0, at most {high:g}")
    return float(value)


def _ints(body: Body, key: str) -> list[int]:
    values = body.get(key, [])
    if not isinstance(values, list) or len(values) > MAX_IDS:
        raise ApiError(400, f"{key!r} must be a list of at most {MAX_IDS} ids")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= BIGINT:
            raise ApiError(400, f"{key!r} must hold whole numbers from 0 to {BIGINT}")
    return values


def _bool(body: Body, key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"{key!r} must be true or false")
    return value


def _text(body: Body, key: str, limit: int = 255) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable():
        raise ApiError(400, f"{key!r} must be 1 to {limit} printable characters")
    return value


def _prefix(request: Request) -> str:
    return f"{request.scope['user'].name}/"


def _runner(request: Request, body: Body) -> str:
    """The runner's name, which must be one this token's user registered."""
    name = _text(body, "runner", 300)
    if not name.startswith(_prefix(request)):
        raise ApiError(403, f"runner {name!r} is not one of this token's runners")
    return name


def _holder(body: Body) -> tuple[str, int]:
    return _text(body, "host"), _int(body, "pid", high=2**31 - 1)


def _scope(body: Body) -> Scope:
    return Scope(_int(body, "workflow_id", default=None), _int(body, "model_run_id", default=None))


def _outcomes(body: Body, name: str) -> list[Outcome]:
    """``outcomes`` as objects, and (the ``batch`` form) ``done``: plain successes grouped."""
    items = body.get("outcomes", [])
    if not isinstance(items, list) or len(items) > MAX_IDS:
        raise ApiError(400, f"'outcomes' must be a list of at most {MAX_IDS}")
    try:
        outcomes = [outcome_from(item) for item in items]
        successes = successes_from(body.get("done", []), name, MAX_IDS - len(outcomes))
    except (ValueError, TypeError) as exc:
        raise ApiError(400, f"bad outcome: {exc}") from exc
    for outcome in outcomes:
        outcome.owner = name  # a runner records only its own attempts: the fence checks owner
        for v in (outcome.job_id, outcome.workflow_id, outcome.attempt, outcome.claim_id or 0):
            if not 0 <= v <= BIGINT:
                raise ApiError(400, "outcome ids must be whole numbers from 0 to 2^63-1")
        if outcome.exit_code is not None and not -(2**31) <= outcome.exit_code < 2**31:
            raise ApiError(400, "an outcome's exit_code must fit 32 bits")
    return successes + outcomes


# -- operations ------------------------------------------------------------------------------


def _chan(fn: Callable[..., Any]) -> Callable[[psycopg.Connection], Any]:
    return lambda conn: fn(DirectChannel(conn))


async def register(request: Request, body: Body) -> Any:
    given = _text(body, "runner", 200)
    name = given if given.startswith(_prefix(request)) else _prefix(request) + given
    runner_rows.check_name(name)
    host, pid = _holder(body)
    slots = _int(body, "slots", low=1, high=10_000)
    dead_after = _seconds(body, "dead_after", 30.0)
    max_losses = _int(body, "max_losses", default=MAX_RUNNER_LOSSES, low=1, high=1000)
    name, report = await in_db(
        request,
        _chan(
            lambda ch: ch.register(
                name, host=host, pid=pid, slots=slots, dead_after=dead_after, max_losses=max_losses
            )
        ),
    )
    return {"runner": name, "report": report_json(report)}


async def heartbeat(request: Request, body: Body) -> Any:
    name = _runner(request, body)
    host, pid = _holder(body)
    counts = body.get("counts", {})
    if not isinstance(counts, dict) or set(counts) - {"succeeded", "failed", "claimed"}:
        raise ApiError(400, "'counts' may hold succeeded, failed and claimed")
    counts = {k: _int(counts, k, default=0, high=2**31 - 1) for k in counts}
    draining, ids = _bool(body, "draining"), _ints(body, "jobs")
    lease = _seconds(body, "lease", 300.0)
    beat = await in_db(
        request,
        _chan(
            lambda ch: ch.beat(name, host, pid, counts, draining=draining, job_ids=ids, lease=lease)
        ),
    )
    return {"ours": beat.ours, "cancel": beat.cancel}


async def cycle(request: Request, body: Body) -> Any:
    return report_json(await _cycle(request, body))


async def batch(request: Request, body: Body) -> Any:
    return report_json(await _cycle(request, body), rows=True)


async def _cycle(request: Request, body: Body) -> FinishReport:
    name = _runner(request, body)
    outcomes = _outcomes(body, name)
    claim_n = _int(body, "claim", default=0, high=10_000)
    lease, scope = _seconds(body, "lease", 300.0), _scope(body)
    close, recheck = _ints(body, "close"), _ints(body, "recheck")
    defer = _bool(body, "defer_settle", True)
    try:
        report = await in_db(
            request,
            _chan(
                lambda ch: ch.cycle(
                    name,
                    outcomes,
                    claim_n=claim_n,
                    lease=lease,
                    scope=scope,
                    close=close,
                    recheck=recheck,
                    defer_settle=defer,
                )
            ),
        )
    except (psycopg.DataError, psycopg.errors.ProgramLimitExceeded) as exc:
        # The runner records such a batch one outcome at a time (smifdb.runner).
        raise ApiError(422, f"an outcome could not be stored: {exc.diag.message_primary}") from exc
    return report


async def reconnect(request: Request, body: Body) -> Any:
    name = _runner(request, body)
    host, pid = _holder(body)
    known = _ints(body, "known")
    report = await in_db(request, _chan(lambda ch: ch.reconnect(name, host, pid, known)))
    return None if report is None else report_json(report)


async def rescue(request: Request, body: Body) -> Any:
    name = _runner(request, body)
    dead_after = _seconds(body, "dead_after", 30.0)
    max_losses = _int(body, "max_losses", default=MAX_RUNNER_LOSSES, low=1, high=1000)
    lost, report = await in_db(
        request, _chan(lambda ch: ch.rescue(name, dead_after=dead_after, max_losses=max_losses))
    )
    return {"lost": lost, "report": report_json(report)}


async def state(request: Request, body: Body) -> Any:
    name = _runner(request, body)
    host, pid = _holder(body)
    new = body.get("state")
    if new not in STATES:
        raise ApiError(400, f"'state' must be one of {', '.join(STATES)}")
    await in_db(request, _chan(lambda ch: ch.set_state(name, host, pid, new)))
    return {}


async def finished(request: Request, body: Body) -> Any:
    scope = _scope(body)
    return {"status": await in_db(request, _chan(lambda ch: ch.finished(scope)))}


async def unfinished(request: Request, body: Body) -> Any:
    return {"unfinished": await in_db(request, _chan(lambda ch: ch.anything_unfinished()))}


async def next_retry(request: Request, body: Body) -> Any:
    return {"seconds": await in_db(request, _chan(lambda ch: ch.next_retry()))}


async def wait(request: Request, body: Body) -> Any:
    after = body.get("after")
    if after is not None and (not isinstance(after, str) or len(after) > 100):
        raise ApiError(400, "'after' must be the token of the last answer, or null")
    timeout = _seconds(body, "timeout", 25.0, MAX_WAIT)
    return await request.app.state.wakeup.wait(after, timeout)


async def job_inputs(request: Request, body: Body) -> Any:
    workflow_id = _int(body, "workflow_id")
    files = _bool(body, "files")
    inputs = body.get("inputs", [])
    if not isinstance(inputs, list) or not all(isinstance(k, str) for k in inputs):
        raise ApiError(400, "'inputs' must be a list of job keys")
    placed = await in_db(
        request,
        lambda conn: jobfiles.job_inputs(conn, workflow_id, files=files, inputs=inputs),
    )
    return [[under, entry_json(entry)] for under, entry in placed]


async def model_run_inputs(request: Request, body: Body) -> Any:
    run_id = _int(body, "model_run_id")
    project, results = await in_db(request, jobfiles.model_run_inputs, run_id)
    return {
        "project": [entry_json(e) for e in project],
        "results": [entry_json(e) for e in results],
    }


async def missing(request: Request, body: Body) -> Any:
    shas = body.get("sha256", [])
    if not isinstance(shas, list) or len(shas) > MAX_IDS:
        raise ApiError(400, f"'sha256' must be a list of at most {MAX_IDS} hashes")
    for sha in shas:
        if not isinstance(sha, str) or not blobs.is_sha256(sha):
            raise ApiError(400, "'sha256' must hold 64 lowercase hex characters each")
    return sorted(await in_db(request, blobs.missing, shas))


async def hello(request: Request, body: Body) -> Any:
    return {"protocol": PROTOCOL, "runner_prefix": _prefix(request)}


OPS: dict[str, tuple[Callable[[Request, Body], Awaitable[Any]], str]] = {
    "hello": (hello, "Check the token (no query): the protocol and the runners' name prefix"),
    "register": (register, "Start a runner (its name qualified by the token's user)"),
    "heartbeat": (heartbeat, "Heartbeat; renew leases; learn which jobs to cancel"),
    "cycle": (cycle, "Record a batch of outcomes and claim up to `claim` jobs"),
    "batch": (
        batch,
        "`cycle` in the compact form runners send: plain successes grouped by claim under"
        " `done`, claimed jobs as `claimed_rows` under `columns`",
    ),
    "reconnect": (reconnect, "After a lost answer: hand back jobs the runner does not know"),
    "rescue": (rescue, "Mark silent runners lost and take back their jobs"),
    "state": (state, "Set the runner's state (draining, stopped)"),
    "finished": (finished, "The final status of a workflow or model run, or null"),
    "unfinished": (unfinished, "Whether any workflow anywhere is unfinished"),
    "next_retry": (next_retry, "Seconds until the next retry becomes ready"),
    "wait": (wait, "Long poll: answers when work may be ready (no query while waiting)"),
    "job_inputs": (job_inputs, "The files a job's folder holds before it runs"),
    "model_run_inputs": (model_run_inputs, "A smif model run's snapshot and stored results"),
    "missing": (missing, "Which of these blobs the store lacks"),
}


def count(request: Request, op: str) -> None:
    """This process's own tally of runner requests by operation (shown in /metrics)."""
    request.app.state.runner_requests[op] += 1


def _endpoint(op: str, handler: Callable[[Request, Body], Awaitable[Any]]) -> Callable:
    async def endpoint(request: Request) -> Response:
        count(request, op)
        body = await read_json(request, max_bytes=MAX_BODY)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return JSONResponse({"data": await handler(request, body), "error": None})

    return endpoint


# -- blobs -----------------------------------------------------------------------------------


def _sha(request: Request) -> str:
    sha = request.path_params["sha256"]
    if not blobs.is_sha256(sha):
        raise ApiError(400, "a blob is named by 64 lowercase hex characters")
    return sha


async def blob_get(request: Request) -> Response:
    """Streamed, a pooled connection borrowed per batch of chunks (as downloads are)."""
    count(request, "blob_get")
    chunks = blobs.read_chunks_with(request.app.state.pool.connection, _sha(request))
    first = await anyio.to_thread.run_sync(next, chunks, None)

    async def body() -> Any:
        chunk = first
        while chunk is not None:
            yield chunk
            chunk = await anyio.to_thread.run_sync(next, chunks, None)

    return StreamingResponse(body(), media_type="application/octet-stream")


async def blob_put(request: Request) -> Response:
    """Spooled to a temporary file as it arrives (at most the store's per-file limit), its
    hash checked against the name, then stored in one transaction."""
    count(request, "blob_put")
    sha, limit = _sha(request), blobs.max_file_bytes()
    async with downloads.spooled_body(request, limit, "a blob") as body:
        if body.sha256 != sha:
            raise ApiError(400, f"the body's sha256 is {body.sha256}, not {sha}")
        await in_db(
            request, lambda conn: blobs.put_file(conn, body.path, max_bytes=limit, sha256=sha)
        )
    return Response(status_code=204)


ROUTES = [
    *(Route(f"{PREFIX}/{op}", _endpoint(op, fn), methods=["POST"]) for op, (fn, _) in OPS.items()),
    Route(f"{PREFIX}/blobs/{{sha256}}", blob_get, methods=["GET"]),
    Route(f"{PREFIX}/blobs/{{sha256}}", blob_put, methods=["PUT"]),
]
