"""JSON endpoints under /api/v1: the smif app's model-run API, and workflows, jobs, runners.

Responses use smif's Flask app envelope, ``{"data": ..., "error": {}}``; lists add the next
page's cursor as ``"next"`` (smifdb.api.paging). Every handler reads or writes through
``smifdb.store`` in a worker thread (psycopg is synchronous here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from smifdb import progress, store
from smifdb.api import cpu, downloads, paging
from smifdb.api.errors import ApiError, decode, read_body, read_json
from smifdb.api.pool import in_db
from smifdb.decisions import (
    DeciderUnavailable,
    DecisionError,
    ModelRunError,
    NotAProject,
    UnknownModelRun,
)
from smifdb.manager import submit_model_run
from smifdb.smifrun import INTERFACES
from smifdb.spec import Dag, parse
from smifdb.store import control, jobfiles, modelruns, read
from smifdb.store import runners as runner_rows
from smifdb.store.submit import submit_dag

T = TypeVar("T")
MAX_ID = 2**63 - 1
OUTPUT_JOBS = 50  # jobs whose log tails a model run's status output shows
# The smif app's words for a model run's state.
SMIF_STATUS = {
    None: "unstarted",
    "pending": "queing",
    "running": "running",
    "succeeded": "done",
    "failed": "failed",
    "cancelled": "stopped",
}


def actor(request: Request) -> str:
    """The audit log's name for a change made through the API: the user, host and process."""
    return store.actor_name(f"api:{request.user.name}")


def ok(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse({"data": _jsonable(data), "error": {}}, status)


async def paged(
    request: Request,
    kind: str,
    key: str,
    read_page: Callable[[psycopg.Connection, int, Any], list[dict]],
    key_type: type[int] | type[str] = int,
) -> JSONResponse:
    """One page of the list ``kind``: ``read_page(conn, n, cursor_key)`` reads ``limit + 1``
    rows, the extra one saying there is a next page (so the last page is never an empty one).
    The page is read and rendered to JSON in the worker thread: 1000 jobs are ~12 ms of it."""
    limit, after = paging.limit(request), paging.cursor(request, kind, key_type)

    def call(conn: psycopg.Connection) -> JSONResponse:
        rows = read_page(conn, limit + 1, after)
        shown = rows[:limit]
        following = paging.encode(kind, shown[-1][key]) if len(rows) > limit else None
        headers = {"Link": paging.next_link(request, following)} if following else None
        body = {"data": _jsonable(shown), "error": {}, "next": following}
        return JSONResponse(body, headers=headers)

    return await in_db(request, call)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def ident(request: Request, name: str) -> int:
    value = request.path_params[name]
    if not 0 < value <= MAX_ID:
        raise ApiError(404, f"no {name.removesuffix('_id')} {value}")
    return value


async def body_of(request: Request) -> Any:
    return await read_json(request, max_bytes=request.app.state.max_body)


# -- smif app: model runs -------------------------------------------------------------------


def _project(request: Request) -> str:
    project = request.app.state.project_dir
    if project is None:
        raise ApiError(400, "this API serves no smif project: start it with --project DIR")
    return project


def _with_smif_status(row: dict) -> dict:
    return {**row, "smif_status": SMIF_STATUS[row["status"]]}


async def model_runs_list(request: Request) -> JSONResponse:
    """The newest run of each name (of the project, if the API serves one), newest first."""
    status = request.query_params.get("status")
    if status is not None and status not in SMIF_STATUS.values():
        raise ApiError(400, f"unknown status {status!r}: one of {sorted(SMIF_STATUS.values())}")
    statuses = None if status is None else [k for k, v in SMIF_STATUS.items() if v == status and k]
    project = request.app.state.project_dir

    def rows(conn: psycopg.Connection, n: int, before: int | None) -> list[dict]:
        found = modelruns.newest(
            conn, project_dir=project, statuses=statuses, limit=n, before=before
        )
        return [_with_smif_status(r) for r in found]

    return await paged(request, "model_runs", "id", rows)


def _latest(conn: psycopg.Connection, name: str, project: str | None) -> dict | None:
    rows = modelruns.listing(conn, name=name, project_dir=project, limit=1)
    return _with_smif_status(rows[0]) if rows else None


def _newest(conn: psycopg.Connection, name: str, project: str | None) -> dict:
    run = _latest(conn, name, project)
    if run is None:
        raise ApiError(404, f"model run {name!r} has not been started here")
    run["bundles"] = modelruns.bundles(conn, run["id"])
    run["events"] = modelruns.events(conn, run["id"])
    return run


async def model_run_get(request: Request) -> JSONResponse:
    name = request.path_params["name"]
    return ok(await in_db(request, _newest, name, request.app.state.project_dir))


async def model_run_status(request: Request) -> JSONResponse:
    """smif's ``{status, output}`` (output: the run's progress and its last jobs' log tails,
    newest last), with smifdb's counts beside them."""
    name = request.path_params["name"]

    def status(conn: psycopg.Connection) -> dict:
        run = _latest(conn, name, request.app.state.project_dir)
        if run is None:
            return {"status": "unstarted", "output": ""}
        events = modelruns.events(conn, run["id"])
        jobs = modelruns.job_logs(conn, run["id"], OUTPUT_JOBS)
        return {
            "status": run["smif_status"],
            "output": progress.console(run, events, jobs),
            "id": run["id"],
            "bundles": run["bundles"],
            "jobs": run["jobs"],
            "jobs_finished": run["jobs_finished"],
            "error": run["error"],
        }

    return ok(await in_db(request, status))


def _start_args(body: Any) -> tuple[bool, str]:
    args = body.get("args", {}) if isinstance(body, dict) else None
    if not isinstance(args, dict):
        raise ApiError(400, "body must be {'args': {...}}")
    warm = args.get("warm_start", False)
    interface = args.get("output_format", "local_csv")
    if not isinstance(warm, bool):
        raise ApiError(400, "args.warm_start must be true or false")
    if not isinstance(interface, str) or not interface.isprintable() or len(interface) > 100:
        raise ApiError(400, "args.output_format must be a name such as 'local_csv'")
    return warm, interface


async def model_run_start(request: Request) -> JSONResponse:
    """Start a configured smif model run. One that cannot start (a bad project or option,
    a decision module that fails) is recorded failed with the reason, answered 201 as
    ``smif app`` does, so the app shows it; an unknown or running one is 404 or 409."""
    project = _project(request)
    name = request.path_params["name"]
    warm, interface = _start_args(await body_of(request))

    def start(conn: psycopg.Connection) -> dict:
        try:
            if interface not in INTERFACES:
                raise ModelRunError(
                    f"output_format {interface!r} is not one of {', '.join(INTERFACES)}"
                )
            model_run_id, workflow_id = submit_model_run(
                conn,
                project,
                name,
                actor=actor(request),
                warm=warm,
                interface=interface,
                submitted_by=request.user.id,
            )
        except (UnknownModelRun, NotAProject, DeciderUnavailable):
            raise  # nothing about this run: 404, 400
        except (ModelRunError, DecisionError) as exc:
            model_run_id = modelruns.refused(
                conn,
                name=name,
                project_dir=project,
                options={"interface": interface, "warm": warm},
                actor=actor(request),
                error=str(exc),
                submitted_by=request.user.id,
            )
            return {"id": model_run_id, "workflow_id": None, "status": "failed", "error": str(exc)}
        return {"id": model_run_id, "workflow_id": workflow_id, "status": "running"}

    return ok(await in_db(request, start), 201)  # other errors map by their class


async def model_run_kill(request: Request) -> JSONResponse:
    name = request.path_params["name"]

    def kill(conn: psycopg.Connection) -> dict:
        run = _newest(conn, name, request.app.state.project_dir)
        before, fragments = modelruns.cancel(conn, run["id"], actor=actor(request), by=request.user)
        if before.finished:
            raise ApiError(409, f"model run {name!r} already finished ({before.status})")
        return {"id": before.id, "status": "stopped", "bundles_cancelled": fragments}

    return ok(await in_db(request, kill))


# -- workflows, jobs, runners -----------------------------------------------------------------


async def workflows_list(request: Request) -> JSONResponse:
    status = request.query_params.get("status")

    def rows(conn: psycopg.Connection, n: int, before: int | None) -> list[dict]:
        return read.workflows(conn, status, n, before=before)

    return await paged(request, "workflows", "id", rows)


def _dag(body: bytes) -> Dag:
    """Decode and validate a submitted spec: CPU-bound (~0.2 s for 1 MB), so run in cpu.heavy."""
    if not body.strip():
        raise ApiError(400, "a JSON body is required")
    dag = parse(decode(body))  # a SpecError is a 400 listing every problem
    if dag.files:
        raise ApiError(
            400,
            "'files' cannot be submitted over the API yet: it has no route to upload them; "
            "submit this spec with `smifdb submit` (jobs' 'inputs' and 'outputs' are fine here)",
        )
    return dag


async def workflow_submit(request: Request) -> JSONResponse:
    """A big spec is decoded, validated and then written in the parse limiter's few threads
    (cpu.py): however many arrive at once, they hold that many of the pool's connections."""
    body = await read_body(request, max_bytes=request.app.state.max_body)
    dag = await cpu.maybe_heavy(request, len(body), _dag, body)

    def submit(conn: psycopg.Connection) -> int:
        return submit_dag(conn, dag, actor=actor(request), submitted_by=request.user.id)

    limiter = request.app.state.parse_limiter if len(body) > cpu.INLINE_BYTES else None
    return ok({"id": await in_db(request, submit, limiter=limiter)}, 201)


def _workflow(conn: psycopg.Connection, workflow_id: int) -> dict:
    workflow = read.get_workflow(conn, workflow_id)
    if workflow is None:
        raise ApiError(404, f"no workflow {workflow_id}")
    return workflow


async def workflow_get(request: Request) -> JSONResponse:
    return ok(await in_db(request, _workflow, ident(request, "workflow_id")))


async def workflow_jobs(request: Request) -> JSONResponse:
    """A page of the workflow's jobs in key order (a cursor is good for its own workflow only)."""
    workflow_id = ident(request, "workflow_id")

    def jobs(conn: psycopg.Connection, n: int, after: int | None) -> list[dict]:
        _workflow(conn, workflow_id)
        return read.jobs(conn, workflow_id, n, after=after)

    return await paged(request, f"workflow {workflow_id} jobs", "id", jobs)


def _workflow_job(conn: psycopg.Connection, workflow_id: int, key: str) -> None:
    _workflow(conn, workflow_id)
    if jobfiles.unknown_keys(conn, workflow_id, [key]):
        raise ApiError(404, f"workflow {workflow_id} has no job {key[:200]!r}")


async def job_outputs(request: Request) -> Response:
    """A page of a job's stored outputs, in path order, each with its download URL."""
    workflow_id, key = ident(request, "workflow_id"), request.path_params["key"]
    await in_db(request, _workflow_job, workflow_id, key)
    base = f"{downloads.public_base(request).rstrip('/')}/api/v1/workflows/{workflow_id}/jobs"

    def url(job: str, path: str) -> str:
        return f"{base}/{quote(job, safe='')}/outputs/{quote(path)}"

    return await downloads.outputs_page(
        request, workflow_id, [key], url, lambda rows: {"data": rows, "error": {}}
    )


async def job_output(request: Request) -> Response:
    """One stored output of a job, streamed as an attachment (ETag: its sha256)."""
    workflow_id, key = ident(request, "workflow_id"), request.path_params["key"]
    await in_db(request, _workflow_job, workflow_id, key)
    return await downloads.output_file(request, workflow_id, key, request.path_params["path"])


async def workflow_cancel(request: Request) -> JSONResponse:
    workflow_id = ident(request, "workflow_id")

    return ok(await in_db(request, _cancel, request, workflow_id))


def _cancel(
    conn: psycopg.Connection, request: Request, workflow_id: int, job_key: str | None = None
) -> dict:
    """Cancel a workflow, or one job of it and everything downstream: 404 unknown, 403 not
    theirs, 409 ended."""
    report = control.cancel(
        conn, workflow_id, job_key=job_key, actor=actor(request), by=request.user
    )
    if report.already_finished:
        raise ApiError(409, f"workflow {workflow_id} already finished")
    return {"cancelled": report.cancelled, "terminating": report.terminating}


async def job_get(request: Request) -> JSONResponse:
    job_id = ident(request, "job_id")
    job = await in_db(request, read.job, job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id}")
    return ok(job)


async def job_result(request: Request) -> JSONResponse:
    job_id = ident(request, "job_id")
    job = await in_db(request, read.job, job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id}")
    return ok({"status": job["status"], "result": job["result"]})


async def job_cancel(request: Request) -> JSONResponse:
    """Cancel one job and everything downstream of it (a running job is ended by its runner)."""
    job_id = ident(request, "job_id")

    def cancel(conn: psycopg.Connection) -> dict:
        job = read.job(conn, job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id}")
        if job["status"] not in ("waiting", "ready", "running"):
            raise ApiError(409, f"job {job_id} already finished ({job['status']})")
        return _cancel(conn, request, job["workflow_id"], job["key"])

    return ok(await in_db(request, cancel))


async def runners_list(request: Request) -> JSONResponse:
    dead_after = request.app.state.dead_after

    def rows(conn: psycopg.Connection, n: int, after: str | None) -> list[dict]:
        return runner_rows.status(conn, dead_after, limit=n, after=after)

    return await paged(request, "runners", "name", rows, str)


ROUTES = [
    Route("/api/v1/model_runs/{name}/status", model_run_status),
    Route("/api/v1/model_runs/{name}/start", model_run_start, methods=["POST"]),
    Route("/api/v1/model_runs/{name}/kill", model_run_kill, methods=["POST"]),
    Route("/api/v1/workflows/", workflows_list),
    Route("/api/v1/workflows/", workflow_submit, methods=["POST"]),
    Route("/api/v1/workflows/{workflow_id:int}", workflow_get),
    Route("/api/v1/workflows/{workflow_id:int}/jobs", workflow_jobs),
    Route("/api/v1/workflows/{workflow_id:int}/jobs/{key}/outputs", job_outputs),
    Route("/api/v1/workflows/{workflow_id:int}/jobs/{key}/outputs/{path:path}", job_output),
    Route("/api/v1/workflows/{workflow_id:int}/cancel", workflow_cancel, methods=["POST"]),
    Route("/api/v1/jobs/{job_id:int}", job_get),
    Route("/api/v1/jobs/{job_id:int}/result", job_result),
    Route("/api/v1/jobs/{job_id:int}/cancel", job_cancel, methods=["POST"]),
    Route("/api/v1/runners/", runners_list),
]
