"""A model run's results under /api/v1/model_runs/{name}/results: what smif wrote, and values.

The list names every output file of the newest run of that name, grouped by (model, output)
with the output's dimensions from the sector model's config. One file's values come as JSON
rows (the dimensions' coordinates, then the value; keyset-style cursor pages over row
positions, smifdb.api.paging) or as CSV, streamed. Everything is read through
smifdb.store.results, which reads smif's files with smif's own store.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

import psycopg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from smifdb.api import paging
from smifdb.api.errors import ApiError
from smifdb.api.pool import in_db
from smifdb.store import results

CSV_ROWS = 1000  # rows per streamed chunk


def _listing(conn: psycopg.Connection, name: str, project: str | None) -> list[dict]:
    run = results.model_run(conn, name, project)
    found = results.files(conn, run)
    specs = results.output_specs(conn, run, {f.model for f in found})
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    for f in found:
        spec = specs.get((f.model, f.output), {})
        entry = grouped.setdefault(
            (f.model, f.output),
            {
                "model": f.model,
                "output": f.output,
                "dims": spec.get("dims"),
                "unit": spec.get("unit"),
                "dtype": spec.get("dtype"),
                "model_run_id": run.id,
                "timesteps": [],
                "decisions": [],
                "results": [],
            },
        )
        entry["results"].append(
            {
                "timestep": f.timestep,
                "decision": f.decision,
                "path": f.entry.path,
                "size": f.entry.size,
                "sha256": f.entry.sha256,
            }
        )
    for entry in grouped.values():
        entry["results"].sort(key=lambda r: (r["timestep"], r["decision"]))
        entry["timesteps"] = sorted({r["timestep"] for r in entry["results"]})
        entry["decisions"] = sorted({r["decision"] for r in entry["results"]})
    return [grouped[k] for k in sorted(grouped)]


async def results_list(request: Request) -> JSONResponse:
    """Every output file of the newest run of this name, by (model, output)."""
    name = request.path_params["name"]
    data = await in_db(request, _listing, name, request.app.state.project_dir)
    return JSONResponse({"data": data, "error": {}})


def _int_query(request: Request, name: str) -> int | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return None
    if not (text.isascii() and text.lstrip("-").isdigit() and len(text) <= 12):
        raise ApiError(400, f"{name} must be an integer, not {text[:40]!r}")
    return int(text)


def _choose(
    found: list[results.ResultFile],
    name: str,
    model: str,
    output: str,
    timestep: int | None,
    decision: int | None,
) -> results.ResultFile:
    """The file asked for: ``timestep`` may be left out if there is one; ``decision`` defaults
    to the last decision iteration that has that timestep."""
    mine = [f for f in found if f.model == model and f.output == output]
    if not mine:
        known = sorted({f"{f.model}/{f.output}" for f in found})
        raise ApiError(
            404,
            f"model run {name!r} has no results of output {output[:200]!r} of model "
            f"{model[:200]!r}; it has {', '.join(known) or 'none'}",
        )
    timesteps = sorted({f.timestep for f in mine})
    if timestep is None:
        if len(timesteps) > 1:
            raise ApiError(400, f"give ?timestep=, one of {timesteps}")
        timestep = timesteps[0]
    at = [f for f in mine if f.timestep == timestep]
    if not at:
        raise ApiError(404, f"{model}/{output} has no results at timestep {timestep}: {timesteps}")
    if decision is None:
        return max(at, key=lambda f: f.decision)
    chosen = [f for f in at if f.decision == decision]
    if not chosen:
        decisions = sorted(f.decision for f in at)
        raise ApiError(
            404, f"{model}/{output} at timestep {timestep} has no decision {decision}: {decisions}"
        )
    return chosen[0]


def _values(
    conn: psycopg.Connection, request: Request, timestep: int | None, decision: int | None
) -> tuple[results.ResultFile, results.Values]:
    p = request.path_params
    run = results.model_run(conn, p["name"], request.app.state.project_dir)
    found = _choose(
        results.files(conn, run), p["name"], p["model"], p["output"], timestep, decision
    )
    return found, results.read_values(conn, run, found)


async def results_values(request: Request) -> Response:
    """One output's values at one timestep and decision: JSON pages, or CSV."""
    kind = request.query_params.get("format", "json")
    if kind not in ("json", "csv"):
        raise ApiError(400, f"format must be 'json' or 'csv', not {kind[:40]!r}")
    timestep, decision = _int_query(request, "timestep"), _int_query(request, "decision")
    limit = paging.limit(request) if kind == "json" else 0
    found, values = await in_db(request, _values, request, timestep, decision)
    if kind == "csv":
        filename = f"{found.model}_{found.output}_{found.timestep}_{found.decision}.csv"
        return StreamingResponse(
            _csv(values),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{_safe(filename)}"'},
        )
    page_kind = f"results {found.entry.sha256} {found.timestep} {found.decision}"
    start = paging.cursor(request, page_kind, int) or 0
    rows = values.rows[start : start + limit]
    end = start + len(rows)
    following = paging.encode(page_kind, end) if end < len(values.rows) else None
    dims = list(values.spec.get("dims") or [])
    body = {
        "data": {
            "model": found.model,
            "output": found.output,
            "timestep": found.timestep,
            "decision": found.decision,
            "dims": dims,
            "unit": values.spec.get("unit"),
            "dtype": values.spec.get("dtype"),
            "columns": values.columns,
            "total": len(values.rows),
            "offset": start,
            "rows": [dict(zip(values.columns, row, strict=True)) for row in rows],
        },
        "error": {},
        "next": following,
    }
    headers = {"Link": paging.next_link(request, following)} if following else None
    return JSONResponse(body, headers=headers)


def _csv(values: results.Values) -> Iterator[str]:
    """Header, then rows a chunk at a time; floats as repr (exact, as in the JSON)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(values.columns)
    for n, row in enumerate(values.rows, 1):
        writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row])
        if n % CSV_ROWS == 0:
            yield out.getvalue()
            out.seek(0)
            out.truncate()
    yield out.getvalue()


def _safe(filename: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in filename)[:200]


ROUTES = [
    Route("/api/v1/model_runs/{name}/results/", results_list),
    Route("/api/v1/model_runs/{name}/results/{model}/{output}", results_values),
]
