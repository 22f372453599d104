"""The DAFNI shim's rows: model versions, workflow versions, parameter sets and instances.

An instance is a smifdb workflow plus the row that links it to the version and parameter set
it ran; its status is read from the workflow and its jobs, never copied.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from smifdb import errors
from smifdb.spec import Dag
from smifdb.store.auth import User
from smifdb.store.blobs import FileEntry
from smifdb.store.submit import submit_dag


class NotFound(errors.NotFound):
    pass


class InUse(errors.Conflict):
    """The row is needed by something still running."""


def _owner(user: User) -> dict[str, Any]:
    return {"owner": user.name, "owner_id": user.id}


def _may_add_version(
    conn: psycopg.Connection, query: str, parent: uuid.UUID, user: User, what: str
):
    """A new version of a model or workflow only from whoever made its first (or an admin)."""
    row = conn.execute(query, [parent]).fetchone()
    if row is None:
        raise NotFound(f"no {what} {parent}")
    if row[0] != user.id and not user.is_admin:
        raise errors.Forbidden(
            f"only {row[1]} (its owner) or an admin may add a version of {what} {parent}"
        )


def _rows(conn: psycopg.Connection, query: str, args: Any = None) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, args).fetchall()


def _row(conn: psycopg.Connection, query: str, args: Any = None) -> dict | None:
    rows = _rows(conn, query, args)
    return rows[0] if rows else None


# -- model versions -------------------------------------------------------------------------

_ADD_MODEL = """
INSERT INTO dafni_models (model_id, definition, version_message, owner, owner_id)
VALUES (%(model_id)s, %(definition)s, %(message)s, %(owner)s, %(owner_id)s)
RETURNING version_id
"""
_MODEL_COLUMNS = "version_id, model_id, definition, version_message, owner, owner_id, created_at"
_MODELS = f"SELECT {_MODEL_COLUMNS} FROM dafni_models ORDER BY created_at DESC, version_id"
_MODEL = f"SELECT {_MODEL_COLUMNS} FROM dafni_models WHERE version_id = %s"
_MODELS_BY_ID = f"SELECT {_MODEL_COLUMNS} FROM dafni_models WHERE version_id = ANY(%s)"
_MODEL_VERSIONS = f"""
SELECT {_MODEL_COLUMNS} FROM dafni_models WHERE model_id = %s ORDER BY created_at DESC
"""
_MODEL_OWNER = """
SELECT owner_id, owner FROM dafni_models WHERE model_id = %s ORDER BY created_at LIMIT 1
"""
_DELETE_MODEL = "DELETE FROM dafni_models WHERE version_id = %s RETURNING version_id"


def add_model(
    conn: psycopg.Connection,
    definition: dict,
    *,
    owner: User,
    message: str,
    model_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """A new model version; with ``model_id``, a new version of that model (its owner's)."""
    if model_id is not None:
        _may_add_version(conn, _MODEL_OWNER, model_id, owner, "model")
    args = {
        "model_id": model_id or uuid.uuid4(),
        "definition": Jsonb(definition),
        "message": message,
        **_owner(owner),
    }
    return conn.execute(_ADD_MODEL, args).fetchone()[0]


def models(conn: psycopg.Connection) -> list[dict]:
    return _rows(conn, _MODELS)


def model(conn: psycopg.Connection, version_id: uuid.UUID) -> dict | None:
    return _row(conn, _MODEL, [version_id])


def models_by_id(conn: psycopg.Connection, version_ids: list[str]) -> dict[str, dict]:
    rows = _rows(conn, _MODELS_BY_ID, [[uuid.UUID(v) for v in version_ids]])
    return {str(r["version_id"]): r for r in rows}


def model_versions(conn: psycopg.Connection, model_id: uuid.UUID) -> list[dict]:
    return _rows(conn, _MODEL_VERSIONS, [model_id])


def delete_model(conn: psycopg.Connection, version_id: uuid.UUID) -> None:
    if conn.execute(_DELETE_MODEL, [version_id]).fetchone() is None:
        raise NotFound(f"no model version {version_id}")


# dafni-cli uploads a model as: ask for upload URLs, PUT definition, PUT image, ingest.
_START_UPLOAD = """
INSERT INTO dafni_model_uploads (owner, owner_id) VALUES (%(owner)s, %(owner_id)s) RETURNING id
"""
_PUT_DEFINITION = """
UPDATE dafni_model_uploads SET definition = %s WHERE id = %s AND owner_id = %s RETURNING id
"""
_PUT_IMAGE = """
UPDATE dafni_model_uploads SET image_bytes = %s WHERE id = %s AND owner_id = %s RETURNING id
"""
_TAKE_UPLOAD = """
DELETE FROM dafni_model_uploads WHERE id = %s AND owner_id = %s RETURNING definition
"""
# Abandoned uploads older than a day are swept whenever a new one starts.
_SWEEP_UPLOADS = "DELETE FROM dafni_model_uploads WHERE created_at < now() - interval '1 day'"


def start_model_upload(conn: psycopg.Connection, owner: User) -> uuid.UUID:
    with conn.transaction():
        conn.execute(_SWEEP_UPLOADS)
        return conn.execute(_START_UPLOAD, _owner(owner)).fetchone()[0]


def put_model_definition(
    conn: psycopg.Connection, upload_id: uuid.UUID, owner: User, definition: dict
) -> None:
    row = conn.execute(_PUT_DEFINITION, (Jsonb(definition), upload_id, owner.id)).fetchone()
    if row is None:
        raise NotFound(f"no upload {upload_id}")


def put_model_image(conn: psycopg.Connection, upload_id: uuid.UUID, owner: User, size: int) -> None:
    if conn.execute(_PUT_IMAGE, (size, upload_id, owner.id)).fetchone() is None:
        raise NotFound(f"no upload {upload_id}")


def ingest_model(
    conn: psycopg.Connection,
    upload_id: uuid.UUID,
    *,
    owner: User,
    message: str,
    model_id: uuid.UUID | None,
) -> uuid.UUID:
    """Turn a finished upload into a model version, in one transaction."""
    with conn.transaction():
        row = conn.execute(_TAKE_UPLOAD, (upload_id, owner.id)).fetchone()
        if row is None:
            raise NotFound(f"no upload {upload_id}")
        if row[0] is None:
            raise InUse(f"upload {upload_id} has no definition yet")
        return add_model(conn, row[0], owner=owner, message=message, model_id=model_id)


# -- workflow versions ----------------------------------------------------------------------

_ADD_WORKFLOW = """
INSERT INTO dafni_workflows (workflow_id, definition, version_message, owner, owner_id)
VALUES (%(workflow_id)s, %(definition)s, %(message)s, %(owner)s, %(owner_id)s)
RETURNING version_id
"""
_WORKFLOW_COLUMNS = (
    "version_id, workflow_id, definition, version_message, owner, owner_id, created_at"
)
_WORKFLOWS = f"SELECT {_WORKFLOW_COLUMNS} FROM dafni_workflows ORDER BY created_at DESC"
_WORKFLOW = f"SELECT {_WORKFLOW_COLUMNS} FROM dafni_workflows WHERE version_id = %s"
_WORKFLOW_VERSIONS = f"""
SELECT {_WORKFLOW_COLUMNS} FROM dafni_workflows WHERE workflow_id = %s ORDER BY created_at DESC
"""
_WORKFLOW_OWNER = """
SELECT owner_id, owner FROM dafni_workflows WHERE workflow_id = %s ORDER BY created_at LIMIT 1
"""
_LOCK_WORKFLOW = "SELECT 1 FROM dafni_workflows WHERE version_id = %s FOR UPDATE"
_LIVE_INSTANCES = """
SELECT count(*) FROM dafni_instances i JOIN workflows w ON w.id = i.workflow_id
WHERE i.workflow_version_id = %s AND w.finished_at IS NULL
"""
_DELETE_WORKFLOW = "DELETE FROM dafni_workflows WHERE version_id = %s"


def add_workflow(
    conn: psycopg.Connection,
    definition: dict,
    *,
    owner: User,
    message: str,
    workflow_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """A new workflow version; with ``workflow_id`` (DAFNI's parent), a new version of it."""
    if workflow_id is not None:
        _may_add_version(conn, _WORKFLOW_OWNER, workflow_id, owner, "workflow")
    args = {
        "workflow_id": workflow_id or uuid.uuid4(),
        "definition": Jsonb(definition),
        "message": message,
        **_owner(owner),
    }
    return conn.execute(_ADD_WORKFLOW, args).fetchone()[0]


def workflows(conn: psycopg.Connection) -> list[dict]:
    return _rows(conn, _WORKFLOWS)


def workflow(conn: psycopg.Connection, version_id: uuid.UUID) -> dict | None:
    return _row(conn, _WORKFLOW, [version_id])


def workflow_versions(conn: psycopg.Connection, workflow_id: uuid.UUID) -> list[dict]:
    return _rows(conn, _WORKFLOW_VERSIONS, [workflow_id])


def delete_workflow(conn: psycopg.Connection, version_id: uuid.UUID) -> None:
    """Delete a version with its parameter sets and instance records (not while one runs)."""
    with conn.transaction():
        if conn.execute(_LOCK_WORKFLOW, [version_id]).fetchone() is None:
            raise NotFound(f"no workflow version {version_id}")
        live = conn.execute(_LIVE_INSTANCES, [version_id]).fetchone()[0]
        if live:
            raise InUse(f"workflow version {version_id} has {live} instance(s) still running")
        conn.execute(_DELETE_WORKFLOW, [version_id])


# -- parameter sets -------------------------------------------------------------------------

_ADD_PARAMETER_SET = """
INSERT INTO dafni_parameter_sets (workflow_version_id, definition, owner, owner_id)
SELECT version_id, %(definition)s, %(owner)s, %(owner_id)s FROM dafni_workflows
WHERE version_id = %(workflow)s
RETURNING id
"""
_PARAMETER_SET_COLUMNS = "id, workflow_version_id, definition, owner, owner_id, created_at"
_PARAMETER_SETS = f"""
SELECT {_PARAMETER_SET_COLUMNS} FROM dafni_parameter_sets
WHERE workflow_version_id = %s ORDER BY created_at
"""
_PARAMETER_SET = f"SELECT {_PARAMETER_SET_COLUMNS} FROM dafni_parameter_sets WHERE id = %s"


def add_parameter_set(
    conn: psycopg.Connection, workflow_version_id: uuid.UUID, definition: dict, *, owner: User
) -> uuid.UUID:
    args = {"workflow": workflow_version_id, "definition": Jsonb(definition), **_owner(owner)}
    row = conn.execute(_ADD_PARAMETER_SET, args).fetchone()
    if row is None:  # the version was deleted since the caller validated against it
        raise NotFound(f"no workflow version {workflow_version_id}")
    return row[0]


def parameter_sets(conn: psycopg.Connection, workflow_version_id: uuid.UUID) -> list[dict]:
    return _rows(conn, _PARAMETER_SETS, [workflow_version_id])


def parameter_set(conn: psycopg.Connection, parameter_set_id: uuid.UUID) -> dict | None:
    return _row(conn, _PARAMETER_SET, [parameter_set_id])


# -- instances ------------------------------------------------------------------------------

_INSTANCE_COLUMNS = """
i.id, i.workflow_version_id, i.parameter_set_id, i.workflow_id, i.owner, i.owner_id,
i.submitted_at,
w.status::text AS status, w.started_at, w.finished_at,
EXISTS (SELECT 1 FROM jobs j WHERE j.workflow_id = i.workflow_id
        AND j.status = 'failed' AND (j.exit_code IS NULL OR j.exit_code < 0))
    AS infrastructure_failure
"""
_INSTANCES = f"""
SELECT {_INSTANCE_COLUMNS} FROM dafni_instances i JOIN workflows w ON w.id = i.workflow_id
WHERE i.workflow_version_id = %s ORDER BY i.submitted_at
"""
_INSTANCE = f"""
SELECT {_INSTANCE_COLUMNS} FROM dafni_instances i JOIN workflows w ON w.id = i.workflow_id
WHERE i.id = %s
"""
_INSTANCE_BY_KEY = "SELECT id FROM dafni_instances WHERE owner_id = %s AND idempotency_key = %s"
_INSTANCE_STEPS = """
SELECT key, status::text AS status, started_at, finished_at, result, exit_code, error
FROM jobs WHERE workflow_id = %s ORDER BY id
"""
_ADD_INSTANCE = """
INSERT INTO dafni_instances
    (id, workflow_version_id, parameter_set_id, workflow_id, owner, owner_id, idempotency_key)
VALUES (%(id)s, %(version)s, %(parameter_set)s, %(workflow_id)s, %(owner)s, %(owner_id)s,
        %(key)s)
"""


def instances(conn: psycopg.Connection, workflow_version_id: uuid.UUID) -> list[dict]:
    return _rows(conn, _INSTANCES, [workflow_version_id])


def instance(conn: psycopg.Connection, instance_id: uuid.UUID) -> dict | None:
    row = _row(conn, _INSTANCE, [instance_id])
    if row is not None:
        row["steps"] = _rows(conn, _INSTANCE_STEPS, [row["workflow_id"]])
    return row


def execute(
    conn: psycopg.Connection,
    *,
    workflow_version_id: uuid.UUID,
    parameter_set_id: uuid.UUID,
    owner: User,
    idempotency_key: str | None,
    build: Callable[[uuid.UUID], Dag],
    actor: str,
    files: Sequence[FileEntry] = (),
) -> tuple[uuid.UUID, bool]:
    """Submit an instance as one transaction: (instance id, whether it is new). ``files``:
    the workflow's files (its steps' dataslot files, blobs stored already).

    A request repeated with the same idempotency key returns the first instance, also when
    the two race: the loser's whole transaction rolls back on the unique key.
    """
    if idempotency_key is not None:
        row = conn.execute(_INSTANCE_BY_KEY, (owner.id, idempotency_key)).fetchone()
        if row is not None:
            return row[0], False
    instance_id = uuid.uuid4()
    dag = build(instance_id)
    try:
        with conn.transaction():
            workflow_id = submit_dag(conn, dag, actor=actor, submitted_by=owner.id, files=files)
            conn.execute(
                _ADD_INSTANCE,
                {
                    "id": instance_id,
                    "version": workflow_version_id,
                    "parameter_set": parameter_set_id,
                    "workflow_id": workflow_id,
                    **_owner(owner),
                    "key": idempotency_key,
                },
            )
    except psycopg.errors.UniqueViolation:
        row = conn.execute(_INSTANCE_BY_KEY, (owner.id, idempotency_key)).fetchone()
        if row is None:
            raise
        return row[0], False
    except psycopg.errors.ForeignKeyViolation as exc:  # deleted while we built the DAG
        raise NotFound("the workflow version or parameter set was deleted") from exc
    return instance_id, True
