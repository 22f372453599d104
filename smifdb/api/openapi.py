"""The OpenAPI 3.1 document served at /openapi.json.

Written out here rather than scraped from docstrings, so handlers keep short docstrings;
tests/test_fuzz.py checks that every route is documented and fuzzes each operation.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from smifdb import __version__, kinds
from smifdb.api.paging import DEFAULT_LIMIT, MAX_LIMIT
from smifdb.states import JOB_STATUSES, WORKFLOW_STATUSES

JSON = "application/json"
ID = {"type": "integer", "minimum": 1}
UUID = {"type": "string", "format": "uuid"}
ANY_OBJECT = {"type": "object"}


def _error(description: str) -> dict:
    return {
        "description": description,
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _op(
    summary: str,
    *,
    tag: str,
    params: list[dict] | None = None,
    body: dict | None = None,
    body_type: str = JSON,
    ok: tuple[int, str] = (200, "OK"),
    errors: tuple[int, ...] = (),
    auth: bool = True,
) -> dict:
    op: dict[str, Any] = {
        "summary": summary,
        "tags": [tag],
        "responses": {
            str(ok[0]): {"description": ok[1]},
            **{str(code): _error(REASONS[code]) for code in errors},
        },
    }
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {body_type: {"schema": body}}}
    if auth:  # every operation but signing in (smifdb.api.security.PUBLIC)
        op["security"] = [{"bearer": []}, {"session": []}]
        op["responses"]["401"] = _error(REASONS[401])
        op["responses"]["403"] = _error(REASONS[403])
        if body is not None and body_type == JSON:
            op["responses"]["415"] = _error(REASONS[415])
    return op


REASONS = {
    400: "bad input: the message and `errors` say what is wrong",
    401: "no credentials, or invalid or expired ones",
    403: "the user's role or ownership does not allow this (or a cross-origin cookie)",
    404: "no such thing",
    409: "conflicts with the current state",
    413: "request body too large",
    415: "the body must be sent as application/json",
    422: "PostgreSQL refused an outcome as data: record it apart",
    429: "too many failed sign-ins: wait Retry-After seconds",
}


def _path(name: str, schema: dict, description: str = "") -> dict:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }


def _query(name: str, schema: dict) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema}


# Every list under /api/v1 pages (smifdb.api.paging): the body's "next" and the Link header
# carry the cursor of the next page, null on the last.
PAGE = [
    {
        **_query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
        "description": f"rows per page (default {DEFAULT_LIMIT})",
    },
    {
        **_query("cursor", {"type": "string"}),
        "description": "the `next` of the page before (opaque)",
    },
]
NAME = _path("name", {"type": "string"}, "model run name")
WORKFLOW_ID = _path("workflow_id", ID)
JOB_ID = _path("job_id", ID)
VERSION_ID = _path("version_id", UUID)
SMIF_STATUSES = ["unstarted", "queing", "running", "done", "failed", "stopped"]

DAG_SPEC = {
    "type": "object",
    "required": ["jobs"],
    "properties": {
        "name": {"type": "string"},
        "jobs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["key"],
                "properties": {
                    "key": {"type": "string"},
                    **{f: v for kind in kinds.KINDS.values() for f, v in kind.spec_schema.items()},
                    "after": {"type": "array", "items": {"type": "string"}},
                    "priority": {"type": "integer"},
                    "max_attempts": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "timeout": {"type": "number", "exclusiveMinimum": 0},
                },
            },
        },
    },
}
DEFINITION = {
    "type": "object",
    "description": "a DAFNI definition: kind, api_version, metadata, spec",
    "required": ["metadata", "spec"],
    "properties": {"kind": {"type": "string"}, "metadata": ANY_OBJECT, "spec": ANY_OBJECT},
}
TOKEN_FORM = {
    "type": "object",
    "required": ["grant_type"],
    "properties": {
        "grant_type": {"enum": ["password", "refresh_token"]},
        "client_id": {"type": "string"},
        "username": {"type": "string"},
        "password": {"type": "string"},
        "refresh_token": {"type": "string"},
        "scope": {"type": "string"},
    },
}
FORM = "application/x-www-form-urlencoded"
TOKEN_PATH = "/realms/{realm}/protocol/openid-connect/token/"
REALM = _path("realm", {"type": "string"}, "any realm name (DAFNI's is Production)")

V1, DAFNI, AUTH = "smif app and workflows", "DAFNI workflow API", "tokens"

PATHS: dict[str, dict[str, dict]] = {
    "/api/v1/model_runs/": {
        "get": _op(
            "with a project: every configured model run, as smif lists them, each with its "
            "newest smifdb run under 'smifdb' (?status= computed for each); without one, the "
            "model runs started here, newest of each name first (a page)",
            tag=V1,
            params=[_query("status", {"enum": SMIF_STATUSES}), *PAGE],
            errors=(400,),
        )
    },
    "/api/v1/model_runs/{name}": {
        "get": _op(
            "a configured model run as smif answers it, with 'smifdb' (without a project: "
            "the run started here, with bundles and audit log)",
            tag=V1,
            params=[NAME],
            errors=(404,),
        )
    },
    "/api/v1/model_runs/{name}/status": {
        "get": _op(
            "smif's {status, output}: status in smif's words, output its progress and its "
            "last jobs' log tails, newest last",
            tag=V1,
            params=[NAME],
        )
    },
    "/api/v1/model_runs/{name}/start": {
        "post": _op(
            "start a model run of the served smif project",
            tag=V1,
            params=[NAME],
            body={
                "type": "object",
                "properties": {
                    "args": {
                        "type": "object",
                        "properties": {
                            "warm_start": {"type": "boolean"},
                            "verbosity": {},
                            "output_format": {"enum": ["local_csv", "local_binary"]},
                        },
                    }
                },
            },
            ok=(201, "started, or recorded failed with the reason (as smif app does)"),
            errors=(400, 404, 409, 413),
        )
    },
    "/api/v1/model_runs/{name}/kill": {
        "post": _op("cancel a model run", tag=V1, params=[NAME], errors=(404, 409))
    },
    "/api/v1/workflows/": {
        "get": _op(
            "workflows with progress, newest first (a page)",
            tag=V1,
            params=[_query("status", {"enum": list(WORKFLOW_STATUSES)}), *PAGE],
            errors=(400,),
        ),
        "post": _op(
            "submit a DAG", tag=V1, body=DAG_SPEC, ok=(201, "submitted"), errors=(400, 413)
        ),
    },
    "/api/v1/workflows/{workflow_id}": {
        "get": _op("a workflow", tag=V1, params=[WORKFLOW_ID], errors=(404,))
    },
    "/api/v1/workflows/{workflow_id}/jobs": {
        "get": _op(
            "a workflow's jobs with parents, in key order (a page)",
            tag=V1,
            params=[WORKFLOW_ID, *PAGE],
            errors=(400, 404),
        )
    },
    "/api/v1/workflows/{workflow_id}/jobs/{key}/outputs": {
        "get": _op(
            "a page of a job's stored outputs (job, path, size, sha256), each with its "
            "download URL, in path order",
            tag=V1,
            params=[WORKFLOW_ID, _path("key", {"type": "string"}, "the job's key"), *PAGE],
            errors=(400, 404),
        )
    },
    "/api/v1/workflows/{workflow_id}/jobs/{key}/outputs/{path}": {
        "get": _op(
            "one stored output of a job, streamed as an attachment (ETag: its sha256)",
            tag=V1,
            params=[
                WORKFLOW_ID,
                _path("key", {"type": "string"}, "the job's key"),
                _path("path", {"type": "string"}, "the file's path, as listed"),
            ],
            ok=(200, "the file's bytes (application/octet-stream)"),
            errors=(404,),
        )
    },
    "/api/v1/workflows/{workflow_id}/cancel": {
        "post": _op("cancel a workflow", tag=V1, params=[WORKFLOW_ID], errors=(404, 409))
    },
    "/api/v1/jobs/{job_id}": {
        "get": _op("a job with its events and log tail", tag=V1, params=[JOB_ID], errors=(404,))
    },
    "/api/v1/jobs/{job_id}/result": {
        "get": _op("a job's result", tag=V1, params=[JOB_ID], errors=(404,))
    },
    "/api/v1/jobs/{job_id}/cancel": {
        "post": _op("cancel a job and its descendants", tag=V1, params=[JOB_ID], errors=(404, 409))
    },
    "/api/v1/runners/": {
        "get": _op("runners and their load, by name (a page)", tag=V1, params=PAGE, errors=(400,))
    },
    TOKEN_PATH: {
        "post": {
            **_op(
                "get tokens (Keycloak-shaped)",
                tag=AUTH,
                params=[REALM],
                body=TOKEN_FORM,
                body_type=FORM,
                auth=False,
            ),
            "responses": {
                "200": {"description": "tokens"},
                "400": {"description": "bad grant"},
                "401": {"description": "bad credentials"},
                "429": {"description": REASONS[429]},
            },
        }
    },
    TOKEN_PATH.rstrip("/"): {
        "post": {
            **_op(
                "get tokens (no trailing slash)",
                tag=AUTH,
                params=[REALM],
                body=TOKEN_FORM,
                body_type=FORM,
                auth=False,
            ),
            "responses": {
                "200": {"description": "tokens"},
                "400": {"description": "bad grant"},
                "401": {"description": "bad credentials"},
                "429": {"description": REASONS[429]},
            },
        }
    },
    "/realms/{realm}/protocol/openid-connect/logout": {
        "post": {
            **_op(
                "revoke a session's tokens",
                tag=AUTH,
                params=[REALM],
                body={"type": "object", "properties": {"refresh_token": {"type": "string"}}},
                body_type=FORM,
                auth=False,
            ),
            "responses": {
                "204": {"description": "logged out"},
                "400": {"description": "no such session"},
            },
        }
    },
    "/models/": {"get": _op("model versions", tag=DAFNI, auth=True)},
    "/models/validate/": {
        "put": _op(
            "check a model definition (YAML or JSON)",
            tag=DAFNI,
            body=DEFINITION,
            auth=True,
            errors=(400, 413),
        )
    },
    "/models/upload/": {
        "post": _op(
            "start a model upload: URLs to PUT files to",
            tag=DAFNI,
            body=ANY_OBJECT,
            ok=(201, "upload started"),
            auth=True,
        )
    },
    "/models/upload/{upload_id}/definition/": {
        "put": _op(
            "the upload's definition",
            tag=DAFNI,
            params=[_path("upload_id", UUID)],
            body=DEFINITION,
            ok=(204, "stored"),
            auth=True,
            errors=(400, 404, 413),
        )
    },
    "/models/upload/{upload_id}/image/": {
        "put": _op(
            "the upload's image (counted, not kept)",
            tag=DAFNI,
            params=[_path("upload_id", UUID)],
            body={"type": "string", "format": "binary"},
            body_type="application/octet-stream",
            ok=(204, "received"),
            auth=True,
            errors=(404,),
        )
    },
    "/models/upload/{upload_id}/ingest/": {
        "post": _op(
            "turn an upload into a model version",
            tag=DAFNI,
            params=[_path("upload_id", UUID)],
            body={"type": "object", "properties": {"version_message": {"type": "string"}}},
            ok=(201, "ingested"),
            auth=True,
            errors=(400, 404, 409),
        )
    },
    "/models/{model_id}/upload/{upload_id}/ingest/": {
        "post": _op(
            "turn an upload into a new version of a model",
            tag=DAFNI,
            params=[_path("model_id", UUID), _path("upload_id", UUID)],
            body={"type": "object", "properties": {"version_message": {"type": "string"}}},
            ok=(201, "ingested"),
            auth=True,
            errors=(400, 404, 409),
        )
    },
    "/models/{version_id}/": {
        "get": _op("a model version", tag=DAFNI, params=[VERSION_ID], auth=True, errors=(404,)),
        "delete": _op(
            "delete a model version",
            tag=DAFNI,
            params=[VERSION_ID],
            ok=(204, "deleted"),
            auth=True,
            errors=(403, 404),
        ),
    },
    "/workflows/": {"get": _op("workflow versions", tag=DAFNI, auth=True)},
    "/workflows/upload/": {
        "post": _op(
            "upload a workflow",
            tag=DAFNI,
            body={
                "type": "object",
                "required": ["definition"],
                "properties": {"version_message": {"type": "string"}, "definition": DEFINITION},
            },
            ok=(201, "the new version"),
            auth=True,
            errors=(400, 413),
        )
    },
    "/workflows/{parent_id}/upload/": {
        "post": _op(
            "upload a new version of a workflow",
            tag=DAFNI,
            params=[_path("parent_id", UUID)],
            body={
                "type": "object",
                "required": ["definition"],
                "properties": {"version_message": {"type": "string"}, "definition": DEFINITION},
            },
            ok=(201, "the new version"),
            auth=True,
            errors=(400, 404, 413),
        )
    },
    "/workflows/parameter-set/validate/": {
        "post": _op(
            "check a parameter set", tag=DAFNI, body=DEFINITION, auth=True, errors=(400, 409, 413)
        )
    },
    "/workflows/parameter-set/upload/": {
        "post": _op(
            "upload a parameter set",
            tag=DAFNI,
            body=DEFINITION,
            ok=(201, "the parameter set"),
            auth=True,
            errors=(400, 404, 409, 413),
        )
    },
    "/workflows/execute/{version_id}/{parameter_set_id}/": {
        "post": {
            **_op(
                "run a workflow version with a parameter set: a new instance",
                tag=DAFNI,
                params=[
                    VERSION_ID,
                    _path("parameter_set_id", UUID),
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                    },
                ],
                ok=(201, "the new instance (200: the instance this Idempotency-Key made)"),
                auth=True,
                errors=(400, 404, 409),
            )
        }
    },
    "/workflows/instances/{instance_id}/": {
        "get": _op(
            "a workflow instance with step statuses",
            tag=DAFNI,
            params=[_path("instance_id", UUID)],
            auth=True,
            errors=(404,),
        )
    },
    "/workflows/instances/{instance_id}/steps/{step_id}/outputs/": {
        "get": _op(
            "a page of the files a model step left in outputs/, each with its download URL",
            tag=DAFNI,
            params=[_path("instance_id", UUID), _path("step_id", {"type": "string"}), *PAGE],
            auth=True,
            errors=(400, 404),
        )
    },
    "/workflows/instances/{instance_id}/steps/{step_id}/outputs/{path}": {
        "get": _op(
            "one output file of a model step, streamed as an attachment (ETag: its sha256)",
            tag=DAFNI,
            params=[
                _path("instance_id", UUID),
                _path("step_id", {"type": "string"}),
                _path("path", {"type": "string"}, "the file's path, as listed"),
            ],
            ok=(200, "the file's bytes (application/octet-stream)"),
            auth=True,
            errors=(404,),
        )
    },
    "/workflows/instances/{instance_id}/produced/{step_id}/": {
        "get": _op(
            "a page of the files of a publisher or visualisation step's asset: its input "
            "steps' outputs, each with its download URL",
            tag=DAFNI,
            params=[_path("instance_id", UUID), _path("step_id", {"type": "string"}), *PAGE],
            auth=True,
            errors=(400, 404),
        )
    },
    "/workflows/{version_id}/": {
        "get": _op(
            "a workflow version with parameter sets and instances",
            tag=DAFNI,
            params=[VERSION_ID],
            auth=True,
            errors=(404,),
        ),
        "delete": _op(
            "delete a workflow version",
            tag=DAFNI,
            params=[VERSION_ID],
            ok=(204, "deleted"),
            auth=True,
            errors=(403, 404, 409),
        ),
    },
    "/": {
        "get": {
            "summary": "the dashboard (a signed-out browser is sent to /login)",
            "tags": ["dashboard"],
            "security": [{"bearer": []}, {"session": []}],
            "responses": {
                "200": {"description": "HTML page"},
                "303": {"description": "to the login page"},
                "401": _error(REASONS[401]),
            },
        }
    },
    "/login": {
        "get": {
            "summary": "the login page",
            "tags": [AUTH],
            "parameters": [_query("next", {"type": "string"})],
            "responses": {"200": {"description": "HTML page"}},
        },
        "post": {
            "summary": "sign in: sets the session cookie (HttpOnly, SameSite=Strict)",
            "tags": [AUTH],
            "parameters": [_query("next", {"type": "string"})],
            "requestBody": {
                "required": True,
                "content": {
                    FORM: {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "password": {"type": "string"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "303": {"description": "signed in: back to `next`"},
                "401": {"description": "wrong name or password (the page again)"},
                "403": {"description": "a sign-in sent from another site"},
                "429": {"description": REASONS[429]},
            },
        },
    },
    "/logout": {
        "post": _op("end this browser session (server-side)", tag=AUTH, ok=(204, "signed out"))
    },
    "/api/auth/me": {"get": _op("who is signed in, and their role", tag=AUTH)},
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics read from the database (smifdb_up 0 when it is down)",
            "tags": ["meta"],
            "responses": {
                "200": {
                    "description": "Prometheus text format 0.0.4, or OpenMetrics if the "
                    "Accept header asks for it; see docs/api.md#metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "this document",
            "tags": ["meta"],
            "responses": {"200": {"description": "OpenAPI 3.1"}},
        }
    },
}


def _runner_paths() -> dict[str, dict[str, dict]]:
    """The runner protocol (smifdb.api.runners): tokens of role runner only."""
    from smifdb.api import runners

    tag = "runner protocol"
    paths: dict[str, dict[str, dict]] = {
        f"{runners.PREFIX}/{op}": {
            "post": _op(summary, tag=tag, body=ANY_OBJECT, errors=(400, 413, 409, 422))
        }
        for op, (_, summary) in runners.OPS.items()
    }
    sha = [_path("sha256", {"type": "string", "pattern": "^[0-9a-f]{64}$"})]
    paths[f"{runners.PREFIX}/blobs/{{sha256}}"] = {
        "get": _op("a blob's bytes, streamed", tag=tag, params=sha, errors=(400, 404)),
        "put": _op(
            "store a blob (its sha256 checked against the name)",
            tag=tag,
            params=sha,
            body={"type": "string", "format": "binary"},
            body_type="application/octet-stream",
            ok=(204, "stored"),
            errors=(400, 413),
        ),
    }
    return paths


PATHS.update(_runner_paths())


def _results_paths() -> dict[str, dict[str, dict]]:
    """A smif model run's results (smifdb.api.results): what smif wrote, and one file's values."""
    tag = "results"
    base = "/api/v1/model_runs/{name}/results"
    text = {"type": "string"}
    values = [
        NAME,
        _path("model", text, "sector model name"),
        _path("output", text, "output name"),
        {**_query("timestep", {"type": "integer"}), "description": "needed if several"},
        {**_query("decision", {"type": "integer", "minimum": 0}), "description": "default: last"},
        {**_query("format", {"type": "string", "enum": ["json", "csv"]}), "description": "json"},
        *PAGE,
    ]
    return {
        f"{base}/": {
            "get": _op(
                "every output file of the newest run of this name, by (model, output), with "
                "the output's dims, unit and dtype, and each file's timestep and decision",
                tag=tag,
                params=[NAME],
                errors=(404, 409),
            )
        },
        f"{base}/{{model}}/{{output}}": {
            "get": _op(
                "one output's values at one timestep and decision: rows of its dimensions' "
                "coordinates and the value, in pages (JSON), or all as CSV (?format=csv)",
                tag=tag,
                params=values,
                errors=(400, 404, 409),
            )
        },
    }


PATHS.update(_results_paths())


def _dataset_paths() -> dict[str, dict[str, dict]]:
    """DAFNI's data catalogue (smifdb.api.dafni_datasets): the NID, search and discovery and
    DSS paths dafni-cli's dataset commands call."""
    tag = "DAFNI datasets"
    metadata = {
        "type": "object",
        "required": ["metadata"],
        "properties": {"metadata": ANY_OBJECT},
    }
    bucket = {"type": "string", "description": "a temporary bucket: temp-<uuid>"}
    committed = (201, "{datasetId, versionId, metadataId}")
    dataset, version = _path("dataset_id", UUID), _path("version_id", UUID)
    file_path = _path("path", {"type": "string"}, "the file's name in the dataset")

    def commit(summary: str, source: str, params: list[dict]) -> dict:
        body = {
            "type": "object",
            "required": ["metadata", source],
            "properties": {
                "metadata": ANY_OBJECT,
                source: bucket if source == "bucketId" else {"type": "string", "format": "uri"},
            },
        }
        return {
            "post": _op(
                summary,
                tag=tag,
                params=params,
                body=body,
                ok=committed,
                errors=(400, 404, 409, 413),
            )
        }

    return {
        "/catalogue/": {
            "post": _op(
                "search the catalogue: each dataset's newest version (search_text, "
                "date_range {begin, end, data_with_no_date}, offset {start, size})",
                tag=tag,
                body={
                    "type": "object",
                    "properties": {
                        "search_text": {"type": "string"},
                        "date_range": ANY_OBJECT,
                        "offset": ANY_OBJECT,
                        "sort_by": {"type": "string", "enum": ["recent"]},
                    },
                },
                errors=(400, 413),
            )
        },
        "/nid/validate/": {
            "post": _op(
                "check dataset metadata: 400 lists every problem",
                tag=tag,
                body=metadata,
                errors=(400, 413),
            )
        },
        "/nid/upload/": {
            "post": _op("a new temporary bucket", tag=tag, ok=(201, "its id, temp-<uuid>")),
            "patch": _op(
                "an upload URL for each file name (PUT the file's bytes to it)",
                tag=tag,
                body={
                    "type": "object",
                    "required": ["bucketId", "datafiles"],
                    "properties": {
                        "bucketId": bucket,
                        "datafiles": {"type": "array", "items": {"type": "string"}},
                    },
                },
                errors=(400, 404, 413),
            ),
        },
        "/nid/upload/{bucket_id}/{path}": {
            "put": _op(
                "store one file of a temporary bucket (a second PUT replaces it)",
                tag=tag,
                params=[_path("bucket_id", UUID), file_path],
                body={"type": "string", "format": "binary"},
                body_type="application/octet-stream",
                ok=(204, "stored"),
                errors=(400, 404, 413),
            )
        },
        "/assets/{bucket_id}": {
            "delete": _op(
                "delete a temporary bucket and its files",
                tag=tag,
                params=[_path("bucket_id", UUID)],
                ok=(204, "deleted"),
                errors=(404,),
            )
        },
        "/nid/dataset/": commit("commit a bucket as a new dataset", "bucketId", []),
        "/nid/dataset/{dataset_id}": {
            **commit("commit a bucket as a new version of a dataset", "bucketId", [dataset]),
            "delete": _op(
                "delete a dataset: every version, its metadata and files",
                tag=tag,
                params=[dataset],
                ok=(204, "deleted"),
                errors=(404,),
            ),
        },
        "/nid/dataset-reference/": commit("a new dataset pointing at a URL", "reference", []),
        "/nid/dataset-reference/{dataset_id}": commit(
            "a new version of a dataset, pointing at a URL", "reference", [dataset]
        ),
        "/nid/metadata/{version_id}": {
            "get": _op(
                "a dataset version: its newest metadata, files (with download URLs) and the "
                "dataset's version history",
                tag=tag,
                params=[version],
                errors=(404,),
            )
        },
        "/nid/metadata/{metadata_id}": {
            "delete": _op(
                "delete a metadata version (never a version's only one: 409)",
                tag=tag,
                params=[_path("metadata_id", UUID)],
                ok=(204, "deleted"),
                errors=(404, 409),
            )
        },
        "/nid/metadata/{dataset_id}/{version_id}": {
            "post": _op(
                "a new metadata version of a dataset version",
                tag=tag,
                params=[dataset, version],
                body=metadata,
                ok=committed,
                errors=(400, 404, 413),
            )
        },
        "/nid/version/{version_id}/": {
            "delete": _op(
                "delete a dataset version (its dataset too, if it was the last)",
                tag=tag,
                params=[version],
                ok=(204, "deleted"),
                errors=(404,),
            )
        },
        "/nid/download/{version_id}/{path}": {
            "get": _op(
                "one file of a dataset version, streamed as an attachment (ETag: its sha256)",
                tag=tag,
                params=[version, file_path],
                errors=(404,),
            )
        },
    }


PATHS.update(_dataset_paths())


def _smif_app_paths() -> dict[str, dict[str, dict]]:
    """The smif app's configuration API (smifdb.api.smifapp): smif's own answers and shapes,
    through smif's store; writes answer 201/200 with message "failed" where smif does."""
    item = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    config_name = _path("name", {"type": "string"}, "the configuration's name")
    paths: dict[str, dict[str, dict]] = {
        "/api/v1/smif/": {"get": _op("smif's version", tag=SMIF)},
        "/api/v1/smif/{key}": {
            "get": _op(
                "smif's version ('version': the bare string)",
                tag=SMIF,
                params=[_path("key", {"type": "string"})],
            )
        },
        "/dashboard/": {"get": _page_get("the dashboard")},
        "/dashboard": {"get": _page_get("to /dashboard/", ok=(308, "to /dashboard/"))},
        "/favicon.ico": {"get": _page_get("the icon")},
    }
    for kind in ("model_runs", "sos_models", "sector_models", "scenarios", "dimensions"):
        words = kind.replace("_", " ")
        base = f"/api/v1/{kind}/"
        paths.setdefault(base, {})["post"] = _op(
            f"create one of the project's {words} (smif's store)",
            tag=SMIF,
            body=item,
            ok=(201, "written, or smif's refusal with message 'failed'"),
            errors=(400, 413),
        )
        one = paths.setdefault(f"{base}{{name}}", {})
        one["put"] = _op(
            f"update one of the project's {words}",
            tag=SMIF,
            params=[config_name],
            body=item,
            ok=(200, "written, or smif's refusal with message 'failed'"),
            errors=(400, 409, 413),
        )
        one["delete"] = _op(
            f"delete one of the project's {words}",
            tag=SMIF,
            params=[config_name],
            errors=(400, 404, 409),
        )
        if kind != "model_runs":  # model runs' GETs are documented with smifdb's state
            paths[base]["get"] = _op(f"the project's {words}, as smif answers", tag=SMIF)
            one["get"] = _op(
                f"one of the project's {words} (smif's error in the envelope if none)",
                tag=SMIF,
                params=[config_name],
            )
    return paths


def _page_get(summary: str, ok: tuple[int, str] = (200, "HTML page")) -> dict:
    return {
        "summary": summary,
        "tags": ["dashboard"],
        "security": [{"bearer": []}, {"session": []}],
        "responses": {
            str(ok[0]): {"description": ok[1]},
            "303": {"description": "to the login page"},
            "401": _error(REASONS[401]),
        },
    }


SMIF = "smif app"
for _path_name, _ops in _smif_app_paths().items():
    PATHS.setdefault(_path_name, {}).update(_ops)


def document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "smifdb",
            "version": __version__,
            "description": "smifdb's HTTP API: the smif app's model runs, workflows and jobs, "
            "and a local copy of DAFNI's workflow API. See docs/api.md.",
        },
        "paths": PATHS,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "smifdb_session"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "description": "under /api/: {data: null, error: {code, message}}; "
                    "elsewhere: {error, error_message, errors?}",
                }
            },
        },
        "x-job-statuses": list(JOB_STATUSES),
    }


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(document())


ROUTES = [Route("/openapi.json", openapi)]
