"""A local copy of DAFNI's workflow API (NIMS) and its Keycloak token endpoint.

Paths, status codes and record shapes follow what DAFNI's own client, dafni-cli, sends and
parses, so it works unchanged with its base URL pointed here. Every route but the token
endpoint needs ``Authorization: Bearer <token>``. Errors are ``{"error", "error_message"}``
(plus ``errors``: every validation problem), which dafni-cli prints.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import psycopg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from smifdb import dafni, errors, store
from smifdb.api import dafni_datasets, downloads, session
from smifdb.api.cpu import maybe_heavy
from smifdb.api.errors import ApiError, decode, read_body, read_json
from smifdb.api.pool import in_db
from smifdb.spec import parse
from smifdb.store import auth, datasets
from smifdb.store import dafni as rows

OVERALL_STATUS = {  # smifdb workflow status -> DAFNI instance status
    "pending": "Pending",
    "running": "Running",
    "succeeded": "Succeeded",
    "failed": "Failed",
    "cancelled": "Cancelled",
}
STEP_STATUS = {
    "waiting": "Pending",
    "ready": "Pending",
    "running": "Running",
    "succeeded": "Succeeded",
    "failed": "Failed",
    "upstream_failed": "Omitted",
    "cancelled": "Cancelled",
}
MAX_IMAGE = 20 * 2**30  # an image is counted and dropped, never stored: a generous cap


# -- plumbing -------------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status)


def _user(request: Request) -> auth.User:
    """Who is calling: the guard (smifdb.api.security) let only signed-in users this far."""
    return request.user


def _uuid(request: Request, name: str, what: str) -> uuid.UUID:
    value = request.path_params[name]
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ApiError(404, f"no {what} {value!r}") from None


async def _definition(request: Request, validate: Callable[[Any], Any] | None = None) -> Any:
    """A definition sent as the raw body of a file: JSON, or YAML for models; decoded, and
    checked by ``validate`` if given, off the event loop when big (smifdb.api.cpu)."""
    body = await read_body(request, max_bytes=request.app.state.max_body)
    if not body.strip():
        raise ApiError(400, "a definition is required in the request body")

    def load() -> Any:
        definition = decode(body, yaml_too=True)
        return validate(definition) if validate else definition

    return await maybe_heavy(request, len(body), load)


async def _json_body(request: Request, *, required: bool = True) -> Any:
    return await read_json(request, max_bytes=request.app.state.max_body, required=required)


async def _db(request: Request, fn: Callable[..., Any], *args: Any) -> Any:
    return await in_db(request, fn, *args)


def _ts(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def _auth(row: Mapping, user: auth.User, asset_id: Any) -> dict:
    mine = row["owner_id"] == user.id
    return {
        "view": True,
        "read": True,
        "update": mine or user.is_admin,
        "destroy": mine or user.is_admin,
        "reason": "Owner" if mine else "Local user",
        "name": "Owner" if mine else "Viewer",
        "asset_id": str(asset_id),
    }


def _metadata(definition: Mapping, owner: str) -> dict:
    given = definition.get("metadata") or {}
    return {
        "display_name": given.get("display_name", ""),
        "name": given.get("name", ""),
        "summary": given.get("summary", ""),
        "description": given.get("description") or given.get("summary", ""),
        "publisher": given.get("publisher") or owner,
        "contact_point_name": given.get("contact_point_name") or owner,
        "contact_point_email": given.get("contact_point_email") or "",
        "licence": given.get("licence") or "",
        "rights": given.get("rights") or "",
        **({"source_code": given["source_code"]} if given.get("source_code") else {}),
    }


def _versions(version_rows: list[dict], id_key: str) -> tuple[list[dict], Any]:
    """DAFNI's version_history (newest first) and the newest version's id."""
    history = [
        {
            "id": str(v[id_key]),
            "version_message": v["version_message"],
            "version_tags": ["latest"] if i == 0 else [],
            "publication_date": _ts(v["created_at"]),
        }
        for i, v in enumerate(version_rows)
    ]
    return history, version_rows[0][id_key] if version_rows else None


def _asset(row: Mapping, id_key: str, parent_key: str, kind: str, user: auth.User, history) -> dict:
    """The fields every DAFNI asset version shares (the client's parsers require them all)."""
    versions, latest = history
    metadata = _metadata(row["definition"], row["owner"])
    return {
        "id": str(row[id_key]),
        "kind": kind,
        "owner": row["owner"],
        "parent": str(row[parent_key]),
        "creation_date": _ts(row["created_at"]),
        "publication_date": _ts(row["created_at"]),
        "version_message": row["version_message"],
        "version_tags": ["latest"] if row[id_key] == latest else [],
        "version_history": versions,
        "auth": _auth(row, user, row[id_key]),
        "metadata": metadata,
        **{k: metadata[k] for k in ("display_name", "name", "summary")},
        **{k: metadata[k] for k in ("contact_point_name", "contact_point_email")},
        **{k: metadata[k] for k in ("licence", "rights")},
    }


def _grouped(all_rows: list[dict], parent_key: str) -> dict[Any, list[dict]]:
    groups: dict[Any, list[dict]] = {}
    for row in all_rows:  # newest first
        groups.setdefault(row[parent_key], []).append(row)
    return groups


# -- token endpoint (Keycloak-shaped) ---------------------------------------------------------


def _oauth_error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status)


async def token(request: Request) -> JSONResponse:
    form = await session.form(request)
    grant = form.get("grant_type")
    if grant == "password":
        if not form.get("username") or "password" not in form:
            return _oauth_error(400, "invalid_request", "username and password are required")
        try:
            user = await session.sign_in(request, form["username"], form["password"])
        except errors.TooManyRequests as exc:
            response = _oauth_error(429, "slow_down", exc.message)
            response.headers.update(exc.headers)
            return response
        except errors.Unauthorized:
            return _oauth_error(401, "invalid_grant", "Invalid user credentials")
        except errors.BadInput as exc:
            return _oauth_error(400, "invalid_request", exc.message)
        tokens = await _db(request, auth.issue_pair, user)
    elif grant == "refresh_token":
        if not form.get("refresh_token"):
            return _oauth_error(400, "invalid_request", "refresh_token is required")
        tokens = await _db(request, auth.refresh, form["refresh_token"])
        if tokens is None:
            return _oauth_error(400, "invalid_grant", "Token is not active")
    else:
        return _oauth_error(
            400, "unsupported_grant_type", "grant_type must be password or refresh_token"
        )
    return _json(
        {
            "access_token": tokens.access,
            "expires_in": tokens.access_seconds,
            "refresh_token": tokens.refresh,
            "refresh_expires_in": tokens.refresh_seconds,
            "token_type": "Bearer",
            "scope": "openid",
        }
    )


async def logout(request: Request) -> Response:
    """Keycloak's logout: ends the session of a refresh token (and only a refresh token)."""
    form = await session.form(request)
    if not form.get("refresh_token"):
        return _oauth_error(400, "invalid_request", "refresh_token is required")
    ended = await _db(
        request, lambda conn: auth.end_session(conn, form["refresh_token"], kind="refresh")
    )
    if not ended:
        return _oauth_error(400, "invalid_grant", "Token is not active")
    return Response(status_code=204)


# -- models ---------------------------------------------------------------------------------


def _model_record(row: dict, versions: list[dict], user: auth.User) -> dict:
    record = _asset(row, "version_id", "model_id", "M", user, _versions(versions, "version_id"))
    definition = row["definition"]
    spec = dict(definition["spec"])
    inputs = spec.get("inputs") or {}
    spec["inputs"] = {
        "parameters": [
            {
                "title": p["name"],
                "description": "",
                "required": False,
                **p,
            }
            for p in inputs.get("parameters", [])
        ],
        "dataslots": [
            {"path": "inputs/", "required": False, **d} for d in inputs.get("dataslots", [])
        ],
    }
    spec["outputs"] = {"datasets": (spec.get("outputs") or {}).get("datasets", [])}
    record["metadata"]["status"] = "L"
    return record | {
        "type": "model",
        "status": "L",
        "api_version": definition.get("api_version", "v1beta3"),
        "ingest_completed_date": record["creation_date"],
        "spec": spec,
    }


def _all_models(conn: psycopg.Connection, user: auth.User) -> list[dict]:
    all_rows = rows.models(conn)
    groups = _grouped(all_rows, "model_id")
    return [_model_record(r, groups[r["model_id"]], user) for r in all_rows]


def _one_model(conn: psycopg.Connection, version_id: uuid.UUID, user: auth.User) -> dict:
    row = rows.model(conn, version_id)
    if row is None:
        raise ApiError(404, f"no model version {version_id}")
    return _model_record(row, rows.model_versions(conn, row["model_id"]), user)


async def models_list(request: Request) -> JSONResponse:
    user = _user(request)
    return _json(await _db(request, _all_models, user))


async def model_get(request: Request) -> JSONResponse:
    user = _user(request)
    version_id = _uuid(request, "version_id", "model version")
    return _json(await _db(request, _one_model, version_id, user))


async def _delete(
    request: Request,
    what: str,
    find: Callable[[psycopg.Connection, uuid.UUID], dict | None],
    delete: Callable[[psycopg.Connection, uuid.UUID], None],
) -> Response:
    """Delete a version its owner names: 404 unknown, 403 not theirs, 409 still in use."""
    user = _user(request)
    version_id = _uuid(request, "version_id", what)

    def run(conn: psycopg.Connection) -> None:
        row = find(conn, version_id)
        if row is None:
            raise ApiError(404, f"no {what} {version_id}")
        if row["owner_id"] != user.id and not user.is_admin:
            raise ApiError(403, f"only {row['owner']} or an admin may delete {what} {version_id}")
        delete(conn, version_id)

    await _db(request, run)
    return Response(status_code=204)


async def model_delete(request: Request) -> Response:
    return await _delete(request, "model version", rows.model, rows.delete_model)


async def model_validate(request: Request) -> JSONResponse:
    _user(request)
    try:
        await _definition(request, dafni.validate_model)
    except dafni.DefinitionError as exc:
        return _json({"valid": False, "errors": exc.problems})
    return _json({"valid": True, "errors": []})


async def model_upload_start(request: Request) -> JSONResponse:
    user = _user(request)
    upload_id = await _db(request, rows.start_model_upload, user)
    base = downloads.public_base(request)
    urls = {part: f"{base}/models/upload/{upload_id}/{part}/" for part in ("definition", "image")}
    return _json({"id": str(upload_id), "urls": urls}, 201)


async def model_upload_definition(request: Request) -> Response:
    user = _user(request)
    upload_id = _uuid(request, "upload_id", "upload")
    definition = await _definition(request, dafni.validate_model)
    await _db(request, rows.put_model_definition, upload_id, user, definition)
    return Response(status_code=204)


async def model_upload_image(request: Request) -> Response:
    """The image is counted and dropped: a local runner runs the model's command instead."""
    user = _user(request)
    upload_id = _uuid(request, "upload_id", "upload")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_IMAGE:
            raise ApiError(413, f"image over {MAX_IMAGE} bytes")
    await _db(request, rows.put_model_image, upload_id, user, size)
    return Response(status_code=204)


async def model_ingest(request: Request) -> JSONResponse:
    user = _user(request)
    upload_id = _uuid(request, "upload_id", "upload")
    model_id = _uuid(request, "model_id", "model") if "model_id" in request.path_params else None
    body = await _json_body(request, required=False)
    message = body.get("version_message", "") if isinstance(body, dict) else None
    if problem := dafni.message_problem(message):
        raise ApiError(400, problem)

    version_id = await _db(
        request,
        lambda conn: rows.ingest_model(
            conn, upload_id, owner=user, message=message, model_id=model_id
        ),
    )
    return _json({"version_id": str(version_id), "id": str(version_id)}, 201)


# -- workflows ------------------------------------------------------------------------------


def _parameter_set_record(row: dict, steps: Mapping) -> dict:
    definition = row["definition"]
    metadata = definition["metadata"]
    return {
        "id": str(row["id"]),
        "owner": row["owner"],
        "creation_date": _ts(row["created_at"]),
        "publication_date": _ts(row["created_at"]),
        "kind": "P",
        "api_version": definition.get("api_version", "v1.0.0"),
        "metadata": {
            "description": metadata.get("description") or "",
            "display_name": metadata["display_name"],
            "name": metadata["name"],
            "publisher": metadata.get("publisher") or row["owner"],
            "workflow_version": str(row["workflow_version_id"]),
        },
        "spec": {
            step_id: {
                "kind": steps.get(step_id, {}).get("kind", "model"),
                "parameters": values.get("parameters", []),
                "dataslots": values.get("dataslots", []),
            }
            for step_id, values in definition.get("spec", {}).items()
        },
    }


def _overall(instance: Mapping) -> str:
    if instance["status"] == "failed" and instance["infrastructure_failure"]:
        return "Error"  # a step was killed (timeout, signal) or lost, rather than failing itself
    return OVERALL_STATUS[instance["status"]]


def _instance_summary(instance: dict, parameter_set: dict, workflow: dict) -> dict:
    return {
        "instance_id": str(instance["id"]),
        "submission_time": _ts(instance["submitted_at"]),
        "finished_time": _ts(instance["finished_at"]),
        "overall_status": _overall(instance),
        "parameter_set": {
            "id": str(parameter_set["id"]),
            "display_name": parameter_set["definition"]["metadata"]["display_name"],
        },
        "workflow_version": {
            "id": str(workflow["version_id"]),
            "version_message": workflow["version_message"],
        },
        "smifdb_workflow_id": instance["workflow_id"],
    }


def _workflow_record(
    conn: psycopg.Connection, row: dict, versions: list[dict], user: auth.User, *, full: bool
) -> dict:
    history = _versions(versions, "version_id")
    record = _asset(row, "version_id", "workflow_id", "W", user, history)
    record["api_version"] = row["definition"].get("api_version", "v1.0.0")
    record["spec"] = row["definition"]["spec"]
    if full:
        steps = row["definition"]["spec"]["steps"]
        sets = {p["id"]: p for p in rows.parameter_sets(conn, row["version_id"])}
        record["parameter_sets"] = [_parameter_set_record(p, steps) for p in sets.values()]
        record["instances"] = [
            _instance_summary(i, sets[i["parameter_set_id"]], row)
            for i in rows.instances(conn, row["version_id"])
        ]
    return record


def _all_workflows(conn: psycopg.Connection, user: auth.User) -> list[dict]:
    all_rows = rows.workflows(conn)
    groups = _grouped(all_rows, "workflow_id")
    return [_workflow_record(conn, r, groups[r["workflow_id"]], user, full=False) for r in all_rows]


def _workflow_row(conn: psycopg.Connection, version_id: uuid.UUID) -> dict:
    row = rows.workflow(conn, version_id)
    if row is None:
        raise ApiError(404, f"no workflow version {version_id}")
    return row


def _one_workflow(conn: psycopg.Connection, version_id: uuid.UUID, user: auth.User) -> dict:
    row = _workflow_row(conn, version_id)
    versions = rows.workflow_versions(conn, row["workflow_id"])
    return _workflow_record(conn, row, versions, user, full=True)


async def workflows_list(request: Request) -> JSONResponse:
    user = _user(request)
    return _json(await _db(request, _all_workflows, user))


async def workflow_get(request: Request) -> JSONResponse:
    user = _user(request)
    version_id = _uuid(request, "version_id", "workflow version")
    return _json(await _db(request, _one_workflow, version_id, user))


async def workflow_delete(request: Request) -> Response:
    return await _delete(request, "workflow version", rows.workflow, rows.delete_workflow)


async def workflow_upload(request: Request) -> JSONResponse:
    user = _user(request)
    parent = _uuid(request, "parent_id", "workflow") if "parent_id" in request.path_params else None
    body = await _json_body(request)
    if not isinstance(body, dict) or "definition" not in body:
        raise ApiError(400, 'the body must be {"version_message": ..., "definition": {...}}')
    message = body.get("version_message", "")
    if problem := dafni.message_problem(message):
        raise ApiError(400, problem)

    def upload(conn: psycopg.Connection) -> dict:
        def exists(version: str) -> bool:
            return rows.model(conn, uuid.UUID(version)) is not None

        definition = dafni.validate_workflow(body["definition"], exists)
        version_id = rows.add_workflow(
            conn, definition, owner=user, message=message, workflow_id=parent
        )
        return _one_workflow(conn, version_id, user)

    return _json(await _db(request, upload), 201)


def _checked_parameter_set(conn: psycopg.Connection, definition: Any) -> dict:
    """Validate against the workflow version it names and that version's models."""
    workflow = None
    metadata = definition.get("metadata") if isinstance(definition, Mapping) else None
    version = metadata.get("workflow_version") if isinstance(metadata, Mapping) else None
    if isinstance(version, str):
        try:
            workflow = rows.workflow(conn, uuid.UUID(version))
        except ValueError:
            workflow = None
    models: dict[str, dict] = {}
    if workflow is not None:
        steps = workflow["definition"]["spec"]["steps"]
        wanted = [s["model_version"] for s in steps.values() if s["kind"] == "model"]
        models = {k: m["definition"] for k, m in rows.models_by_id(conn, wanted).items()}
        if missing := sorted(set(wanted) - set(models)):
            raise ApiError(409, f"the workflow's model version(s) {', '.join(missing)} are gone")
    checked = dafni.validate_parameter_set(
        definition, workflow["definition"] if workflow else None, models
    )
    return checked | {"workflow_version_id": workflow["version_id"]}


async def parameter_set_validate(request: Request) -> JSONResponse:
    _user(request)
    definition = await _definition(request)
    await _db(request, _checked_parameter_set, definition)
    return _json({"valid": True})


async def parameter_set_upload(request: Request) -> JSONResponse:
    user = _user(request)
    definition = await _definition(request)

    def upload(conn: psycopg.Connection) -> dict:
        checked = _checked_parameter_set(conn, definition)
        version_id = checked.pop("workflow_version_id")
        parameter_set_id = rows.add_parameter_set(conn, version_id, checked, owner=user)
        steps = rows.workflow(conn, version_id)["definition"]["spec"]["steps"]
        return _parameter_set_record(rows.parameter_set(conn, parameter_set_id), steps)

    return _json(await _db(request, upload), 201)


# -- instances ------------------------------------------------------------------------------


def _instance_record(
    conn: psycopg.Connection, instance_id: uuid.UUID, user: auth.User, request: Request
) -> dict:
    instance = rows.instance(conn, instance_id)
    if instance is None:
        raise ApiError(404, f"no workflow instance {instance_id}")
    workflow = rows.workflow(conn, instance["workflow_version_id"])
    parameter_set = rows.parameter_set(conn, instance["parameter_set_id"])
    steps = workflow["definition"]["spec"]["steps"]
    jobs = {j["key"]: j for j in instance["steps"]}
    versions = rows.workflow_versions(conn, workflow["workflow_id"])
    version = _asset(
        workflow, "version_id", "workflow_id", "W", user, _versions(versions, "version_id")
    )
    produced = {
        key: {
            "dataset_id": job["result"]["dataset_id"],
            "metadata_id": job["result"]["metadata_id"],
            "version_id": job["result"]["version_id"],
            "kind": steps[key]["kind"],
            "files_url": f"{downloads.public_base(request)}/workflows/instances/{instance_id}/produced/{key}/",
        }
        for key, job in jobs.items()
        if job["status"] == "succeeded"
        and steps.get(key, {}).get("kind") in ("publisher", "visualisation")
        and isinstance(job["result"], dict)
    }
    return _instance_summary(instance, parameter_set, workflow) | {
        "auth": _auth(instance, user, instance["id"]),
        "step_status": {
            key: {
                "status": STEP_STATUS[jobs[key]["status"]],
                "started_at": _ts(jobs[key]["started_at"]),
                "finished_at": _ts(jobs[key]["finished_at"]),
                "error": jobs[key]["error"],
            }
            for key in steps
            if key in jobs
        },
        "produced_assets": produced,
        "parameter_set": _parameter_set_record(parameter_set, steps),
        "workflow_version": {
            k: version[k]
            for k in (
                "id",
                "kind",
                "owner",
                "parent",
                "creation_date",
                "publication_date",
                "version_message",
                "version_tags",
                "metadata",
            )
        }
        | {
            "api_version": workflow["definition"].get("api_version", "v1.0.0"),
            "spec": {"steps": steps},
        },
    }


async def instance_get(request: Request) -> JSONResponse:
    user = _user(request)
    instance_id = _uuid(request, "instance_id", "workflow instance")
    return _json(await _db(request, _instance_record, instance_id, user, request))


async def execute(request: Request) -> JSONResponse:
    """Run a workflow version with a parameter set: a new instance, i.e. a smifdb workflow.

    An ``Idempotency-Key`` header makes retries safe: the same key returns the same instance.
    """
    user = _user(request)
    version_id = _uuid(request, "version_id", "workflow version")
    parameter_set_id = _uuid(request, "parameter_set_id", "parameter set")
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= 200:
        raise ApiError(400, "an Idempotency-Key must be 1 to 200 characters")

    def run(conn: psycopg.Connection) -> tuple[dict, bool]:
        workflow = _workflow_row(conn, version_id)
        parameter_set = rows.parameter_set(conn, parameter_set_id)
        if parameter_set is None or parameter_set["workflow_version_id"] != version_id:
            raise ApiError(
                404, f"workflow version {version_id} has no parameter set {parameter_set_id}"
            )
        steps = workflow["definition"]["spec"]["steps"]
        wanted = [s["model_version"] for s in steps.values() if s["kind"] == "model"]
        models = {k: m["definition"] for k, m in rows.models_by_id(conn, wanted).items()}
        if missing := sorted(set(wanted) - set(models)):
            raise ApiError(409, f"model version(s) {', '.join(missing)} were deleted")

        # Each model step's dataslots: their datasets' files, as the instance's own files.
        slots = dafni.dataslots(workflow["definition"], parameter_set["definition"], models)
        wanted = [v for filled in slots.values() for _, versions in filled for v in versions]
        files = dafni.dataslot_files(slots, datasets.version_files(conn, wanted))

        def build(instance_id: uuid.UUID):
            spec = dafni.instance_dag(
                instance_id,
                workflow["definition"],
                parameter_set["definition"],
                models,
                dataslot_steps=frozenset(slots),
            )
            # A definition that validated but cannot run: a 400.
            return dafni.with_files(parse(spec), frozenset(slots))

        instance_id, created = rows.execute(
            conn,
            workflow_version_id=version_id,
            parameter_set_id=parameter_set_id,
            owner=user,
            idempotency_key=key,
            build=build,
            actor=store.actor_name(f"api:{user.name}"),
            files=files,
        )
        record = _instance_record(conn, instance_id, user, request)
        if not created and (
            record["workflow_version"]["id"] != str(version_id)
            or record["parameter_set"]["id"] != str(parameter_set_id)
        ):
            raise ApiError(409, f"Idempotency-Key {key!r} was used for another execution")
        return record, created

    record, created = await _db(request, run)
    return _json(record, 201 if created else 200)


def _instance_step(
    conn: psycopg.Connection, instance_id: uuid.UUID, step_id: str
) -> tuple[int, Mapping]:
    """(the instance's workflow id, the step's definition); 404 for an unknown one."""
    instance = rows.instance(conn, instance_id)
    if instance is None:
        raise ApiError(404, f"no workflow instance {instance_id}")
    steps = rows.workflow(conn, instance["workflow_version_id"])["definition"]["spec"]["steps"]
    if step_id not in steps:
        raise ApiError(404, f"workflow instance {instance_id} has no step {step_id[:200]!r}")
    return instance["workflow_id"], steps[step_id]


def _output_url(request: Request, instance_id: uuid.UUID) -> Callable[[str, str], str]:
    base = f"{downloads.public_base(request)}/workflows/instances/{instance_id}/steps"
    return lambda step, path: f"{base}/{quote(step, safe='')}/outputs/{quote(path)}"


async def step_outputs(request: Request) -> Response:
    """What a model step left in its ``outputs/`` folder, stored: a page of files."""
    instance_id = _uuid(request, "instance_id", "workflow instance")
    step_id = request.path_params["step_id"]
    workflow_id, _ = await _db(request, _instance_step, instance_id, step_id)
    return await downloads.outputs_page(
        request, workflow_id, [step_id], _output_url(request, instance_id), _files
    )


async def step_output(request: Request) -> Response:
    instance_id = _uuid(request, "instance_id", "workflow instance")
    step_id = request.path_params["step_id"]
    workflow_id, _ = await _db(request, _instance_step, instance_id, step_id)
    path = request.path_params["path"]
    return await downloads.output_file(request, workflow_id, step_id, path)


async def produced_files(request: Request) -> Response:
    """The files of a publisher or visualisation step's dataset: its input steps' outputs."""
    instance_id = _uuid(request, "instance_id", "workflow instance")
    step_id = request.path_params["step_id"]
    workflow_id, step = await _db(request, _instance_step, instance_id, step_id)
    if step["kind"] not in ("publisher", "visualisation"):
        raise ApiError(404, f"step {step_id!r} is a {step['kind']} step: it produces no asset")
    inputs = step.get("inputs", [])
    return await downloads.outputs_page(
        request, workflow_id, inputs, _output_url(request, instance_id), _files
    )


def _files(found: list[dict]) -> dict:
    return {"files": [{"step_id": row.pop("job"), **row} for row in found]}


def _routes(handlers: list[tuple[str, Callable, str]]) -> list[Route]:
    return [Route(path, handler, methods=[method]) for path, handler, method in handlers]


TOKEN_PATH = "/realms/{realm}/protocol/openid-connect/token/"

# Literal segments come before placeholders: /workflows/parameter-set/upload/ must not be
# taken for /workflows/{parent_id}/upload/.
ROUTES = _routes(
    [
        (TOKEN_PATH, token, "POST"),
        (TOKEN_PATH.rstrip("/"), token, "POST"),
        ("/realms/{realm}/protocol/openid-connect/logout", logout, "POST"),
        ("/models/", models_list, "GET"),
        ("/models/validate/", model_validate, "PUT"),
        ("/models/upload/", model_upload_start, "POST"),
        ("/models/upload/{upload_id}/definition/", model_upload_definition, "PUT"),
        ("/models/upload/{upload_id}/image/", model_upload_image, "PUT"),
        ("/models/upload/{upload_id}/ingest/", model_ingest, "POST"),
        ("/models/{model_id}/upload/{upload_id}/ingest/", model_ingest, "POST"),
        ("/models/{version_id}/", model_get, "GET"),
        ("/models/{version_id}/", model_delete, "DELETE"),
        ("/workflows/", workflows_list, "GET"),
        ("/workflows/upload/", workflow_upload, "POST"),
        ("/workflows/parameter-set/validate/", parameter_set_validate, "POST"),
        ("/workflows/parameter-set/upload/", parameter_set_upload, "POST"),
        ("/workflows/execute/{version_id}/{parameter_set_id}/", execute, "POST"),
        ("/workflows/instances/{instance_id}/", instance_get, "GET"),
        ("/workflows/instances/{instance_id}/steps/{step_id}/outputs/", step_outputs, "GET"),
        (
            "/workflows/instances/{instance_id}/steps/{step_id}/outputs/{path:path}",
            step_output,
            "GET",
        ),
        ("/workflows/instances/{instance_id}/produced/{step_id}/", produced_files, "GET"),
        ("/workflows/{version_id}/", workflow_get, "GET"),
        ("/workflows/{version_id}/", workflow_delete, "DELETE"),
        ("/workflows/{parent_id}/upload/", workflow_upload, "POST"),
    ]
)
ROUTES += dafni_datasets.ROUTES  # the data catalogue: NID, search and discovery, buckets
