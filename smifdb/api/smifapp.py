"""The smif app's HTTP API under /api/v1, as smif's own Flask app answers it, over smifdb.

Configuration (model runs, sos models, sector models, scenarios, dimensions) is read and
written through smif's own project store (smif.data_layer.Store), never a second reader of
smif's files, and answered in smif's shapes: ``{"data", "error"}`` envelopes, smif's error
dictionaries (smif.http_api.crud.parse_exceptions), Flask's JSON for dates, 201/200 with
``{"message": "failed"}`` where smif reports a refused write. Execution state is smifdb's: a
configured model run carries its newest smifdb run under the extra key ``smifdb``, and its
status is computed from that (never started: ``unstarted``).

Two things smif's app does not do: a name that is not a plain file name is refused (smif's
YAML store would write wherever a name with ``/`` or ``..`` pointed), and a configuration
that a live model run uses may not be changed or deleted (409).
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
import psycopg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from smifdb.api import v1
from smifdb.api.errors import ApiError, read_json
from smifdb.api.pool import in_db
from smifdb.api.v1 import SMIF_STATUS
from smifdb.smifrun import _store as smif_store
from smifdb.smifrun import is_project
from smifdb.store import modelruns

LIVE = ["pending", "running"]
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")


class Kind:
    """One kind of smif configuration and the smif Store methods that serve it."""

    def __init__(self, path: str, singular: str, plural: str, *, coords: bool) -> None:
        self.path, self.singular, self.plural, self.coords = path, singular, plural, coords

    def read_all(self, store: Any) -> Any:
        fn = getattr(store, f"read_{self.plural}")
        return fn(skip_coords=True) if self.coords else fn()

    def read_one(self, store: Any, name: str) -> Any:
        fn = getattr(store, f"read_{self.singular}")
        return fn(name, skip_coords=True) if self.coords else fn(name)

    def method(self, store: Any, verb: str) -> Callable[..., Any]:
        return getattr(store, f"{verb}_{self.singular}")


KINDS = {
    "model_runs": Kind("model_runs", "model_run", "model_runs", coords=False),
    "sos_models": Kind("sos_models", "sos_model", "sos_models", coords=False),
    "sector_models": Kind("sector_models", "model", "models", coords=True),
    "scenarios": Kind("scenarios", "scenario", "scenarios", coords=True),
    "dimensions": Kind("dimensions", "dimension", "dimensions", coords=True),
}
# smif parses a sent 'stamp' into a datetime for these (smif.http_api.crud.check_timestamp).
STAMPED = {"sector_models", "scenarios", "dimensions"}


# -- smif's shapes ----------------------------------------------------------------------------


def _flask_json(value: Any) -> Any:
    """What Flask's JSON provider makes of a value JSON lacks: dates as HTTP dates."""
    if isinstance(value, datetime.date):
        from werkzeug.http import http_date

        return http_date(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays in smif's data
        return value.tolist()
    if isinstance(value, set | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


class SmifJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=_flask_json, ensure_ascii=False).encode()


def envelope(data: Any, error: Any = None, status: int = 200, **extra: Any) -> SmifJSON:
    return SmifJSON({**extra, "data": data, "error": error or {}}, status)


def _smif_errors(exc: Exception) -> dict:
    from smif.http_api.crud import parse_exceptions

    return parse_exceptions(exc)


def _project(request: Request) -> str:
    project = request.app.state.project_dir
    if project is None:
        raise ApiError(400, "this API serves no smif project: start it with --project DIR")
    return project


def _store(project: str) -> Any:
    if not is_project(project):
        raise ApiError(404, f"{project} is not a smif project (no config/ folder)")
    return smif_store(Path(project), "local_csv")


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ApiError(
            400,
            f"{what} must be 1 to 200 letters, digits, '_', '.' or '-', not starting with "
            f"'.' or '-' (smif names its files after it): got {str(value)[:200]!r}",
        )
    return value


async def _in_store(request: Request, fn: Callable[[Any], Any]) -> Any:
    """``fn(store)`` in a worker thread: smif's store reads and writes files."""
    project = _project(request)
    return await anyio.to_thread.run_sync(lambda: fn(_store(project)))


# -- smif's version ---------------------------------------------------------------------------


async def smif_details(request: Request) -> SmifJSON:
    import smif

    if request.path_params.get("key") == "version":
        return envelope(smif.__version__)
    return envelope({"version": smif.__version__})


# -- reading ----------------------------------------------------------------------------------


def _kind(request: Request) -> Kind:
    return KINDS[request.url.path.split("/")[3]]


def _read(kind: Kind, name: str | None) -> Callable[[Any], tuple[Any, dict]]:
    """A list, or one item, and smif's errors: what smif's GET handlers put in the envelope."""

    def read(store: Any) -> tuple[Any, dict]:
        from smif.exception import SmifException

        try:
            return (kind.read_all(store) if name is None else kind.read_one(store, name)), {}
        except SmifException as exc:
            return ([] if name is None else {}), _smif_errors(exc)

    return read


async def config_get(request: Request) -> SmifJSON:
    kind, name = _kind(request), request.path_params.get("name")
    return envelope(*await _in_store(request, _read(kind, name)))


def _state(run: dict | None) -> dict | None:
    """A smifdb model run's execution state, for the configured run of its name."""
    if run is None:
        return None
    return {
        "id": run["id"],
        "status": run["status"],
        "smif_status": SMIF_STATUS[run["status"]],
        "bundles": run["bundles"],
        "jobs": run["jobs"],
        "jobs_finished": run["jobs_finished"],
        "error": run["error"],
        "submitted_at": run["submitted_at"].isoformat(),
        "finished_at": run["finished_at"].isoformat() if run["finished_at"] else None,
        "current_workflow": run["current_workflow"],
    }


def _newest_by_name(conn: psycopg.Connection, project: str, names: list[str]) -> dict:
    return {r["name"]: r for r in modelruns.newest_of(conn, project_dir=project, names=names)}


async def model_runs_get(request: Request) -> Response:
    """smif's answer, each configured run with its newest smifdb run merged in (``smifdb``);
    ``?status=`` computed for each configured run as smif's scheduler would report it. An API
    serving no smif project lists the model runs started here (smifdb.api.v1)."""
    name, project = request.path_params.get("name"), request.app.state.project_dir
    if project is None or not is_project(project):  # generic model runs only
        return await (v1.model_runs_list if name is None else v1.model_run_get)(request)
    status = request.query_params.get("status")
    if status is not None and status not in SMIF_STATUS.values():
        raise ApiError(400, f"unknown status {status!r}: one of {sorted(SMIF_STATUS.values())}")
    data, error = await _in_store(request, _read(KINDS["model_runs"], name))
    if name is not None:
        states = await in_db(request, _newest_by_name, project, [name])
        if error and name in states:  # started here, its config since removed
            return envelope({"name": name, "smifdb": _state(states[name])})
        if not error:
            data["smifdb"] = _state(states.get(name))
        return envelope(data, error)
    runs = [c for c in data if isinstance(c, dict) and isinstance(c.get("name"), str)]
    states = await in_db(request, _newest_by_name, project, [c["name"] for c in runs])
    for run in runs:
        run["smifdb"] = _state(states.get(run["name"]))
    if status is not None:
        data = [c for c in runs if SMIF_STATUS[(c["smifdb"] or {}).get("status")] == status]
    return envelope(data, error)


# -- writing ----------------------------------------------------------------------------------


def _in_use(conn: psycopg.Connection, project: str) -> list[str]:
    return [
        r["name"] for r in modelruns.newest(conn, project_dir=project, statuses=LIVE, limit=1000)
    ]


def _used_by(store: Any, runs: list[str]) -> dict[str, set[str]]:
    """What the live model runs ``runs`` use, by kind: their configs, sos models, sector
    models, scenarios and the dimensions of those."""
    used: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for run_name in runs:
        used["model_runs"].add(run_name)
        try:
            run = store.read_model_run(run_name)
            sos = store.read_sos_model(run["sos_model"])
        except Exception:
            continue
        used["sos_models"].add(sos["name"])
        used["scenarios"].update(run.get("scenarios") or {})
        used["scenarios"].update(sos.get("scenarios") or [])
        for model_name in sos.get("sector_models") or []:
            used["sector_models"].add(model_name)
            try:
                model = store.read_model(model_name, skip_coords=True)
            except Exception:
                continue
            for spec in (
                *(model.get("inputs") or []),
                *(model.get("outputs") or []),
                *(model.get("parameters") or []),
            ):
                used["dimensions"].update(spec.get("dims") or [])
    return used


async def _refuse_if_live(request: Request, kind: Kind, name: str) -> None:
    project = _project(request)
    runs = await in_db(request, _in_use, project)
    if not runs:
        return
    used = await _in_store(request, lambda store: _used_by(store, runs))
    if name in used[kind.path]:
        raise ApiError(
            409,
            f"{kind.singular.replace('_', ' ')} {name!r} is in use by a live model run "
            f"({', '.join(sorted(runs))}): change it when the run has ended, or cancel it",
        )


async def _write(request: Request, verb: str, name: str | None, status: int) -> Response:
    """POST (create) and PUT (update) through smif's store, answered as smif answers them."""
    kind = _kind(request)
    data = await read_json(request, max_bytes=request.app.state.max_body)
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a {kind.singular.replace('_', ' ')} object")
    _name(data.get("name"), "'name'")
    if name is not None:
        await _refuse_if_live(request, kind, name)
    from smif.exception import SmifException
    from smif.http_api.crud import check_timestamp

    def write(store: Any) -> SmifJSON:
        item = check_timestamp(dict(data)) if kind.path in STAMPED else data
        try:
            if name is None:
                kind.method(store, "write")(item)
            else:
                kind.method(store, "update")(name, item)
        except SmifException as exc:
            return envelope(data, _smif_errors(exc), status, message="failed")
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ApiError(400, f"smif refused the {kind.singular}: {exc!r}") from exc
        return SmifJSON({"message": "success"}, status)

    return await _in_store(request, write)


async def config_post(request: Request) -> Response:
    return await _write(request, "write", None, 201)


async def config_put(request: Request) -> Response:
    name = _name(request.path_params["name"], "the name")
    return await _write(request, "update", name, 200)


async def config_delete(request: Request) -> Response:
    kind, name = _kind(request), _name(request.path_params["name"], "the name")
    await _refuse_if_live(request, kind, name)
    from smif.exception import SmifDataNotFoundError

    def delete(store: Any) -> SmifJSON:
        try:
            kind.method(store, "delete")(name)
        except SmifDataNotFoundError as exc:  # smif's error handler: 404 with a message
            return SmifJSON({"message": str(exc)}, 404)
        return SmifJSON({})

    return await _in_store(request, delete)


def _config_routes() -> list[Route]:
    routes = [
        Route("/api/v1/smif/", smif_details),
        Route("/api/v1/smif/{key}", smif_details),
    ]
    for kind in KINDS:
        base = f"/api/v1/{kind}/"
        routes += [
            Route(f"{base}{{name}}", config_put, methods=["PUT"]),
            Route(f"{base}{{name}}", config_delete, methods=["DELETE"]),
            Route(base, config_post, methods=["POST"]),
        ]
        read = model_runs_get if kind == "model_runs" else config_get
        routes += [Route(base, read), Route(f"{base}{{name}}", read)]
    return routes


ROUTES = _config_routes()
