"""The data layer: every SQL statement smifdb runs lives here.

Processes (CLI, runner, manager, API) call these functions with a psycopg connection in
autocommit mode; each function that writes more than one row opens exactly one transaction.
"""

from __future__ import annotations

import json
import os
import socket

import psycopg

from smifdb import migrate
from smifdb.spec import Dag

READY_CHANNEL = "smifdb_ready"


class SchemaError(RuntimeError):
    """The database is reachable but not migrated to this smifdb's schema."""


def actor_name(role: str) -> str:
    """Who made a change, for the audit log: role, host and process."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


# -- schema -----------------------------------------------------------------------------


def check_schema(conn: psycopg.Connection) -> None:
    """Fail with a clear message, not a missing-table error, on an unmigrated database."""
    version = None
    if conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()[0]:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        version = row[0] if row else None
    expected = migrate.head()
    if version != expected:
        raise SchemaError(
            f"database schema is at revision {version or 'none'} but this smifdb needs "
            f"{expected}: run `smifdb db upgrade`"
        )


# -- submission -------------------------------------------------------------------------

_INSERT_WORKFLOW = """
INSERT INTO workflows (name, model_run, bundle, job_count)
VALUES (%(name)s, %(model_run)s, %(bundle)s, %(job_count)s)
RETURNING id
"""
_ALLOCATE_JOB_IDS = """
SELECT nextval(pg_get_serial_sequence('jobs', 'id')) FROM generate_series(1, %s)
"""
_COPY_JOBS = """
COPY jobs (id, workflow_id, key, kind, payload, model, operation, timestep, decision,
           status, priority, unfinished_parents, max_attempts, timeout_seconds)
FROM STDIN
"""
_COPY_EDGES = "COPY job_edges (parent_id, child_id) FROM STDIN"
_COPY_EVENTS = "COPY events (workflow_id, job_id, to_status, actor, reason) FROM STDIN"
_INSERT_EVENT = """
INSERT INTO events (workflow_id, job_id, from_status, to_status, attempt, actor, reason)
VALUES (%s, %s, %s, %s, %s, %s, %s)
"""


def submit_dag(
    conn: psycopg.Connection,
    dag: Dag,
    *,
    actor: str,
    model_run: str | None = None,
    bundle: int | None = None,
) -> int:
    """Write a validated DAG as one transaction, bulk-loaded with COPY; return the workflow id."""
    parents: dict[str, int] = {}
    for _, child in dag.edges:
        parents[child] = parents.get(child, 0) + 1
    with conn.transaction():
        workflow_id = conn.execute(
            _INSERT_WORKFLOW,
            {
                "name": dag.name,
                "model_run": model_run,
                "bundle": bundle,
                "job_count": len(dag.jobs),
            },
        ).fetchone()[0]
        ids = [r[0] for r in conn.execute(_ALLOCATE_JOB_IDS, [len(dag.jobs)])]
        key_to_id = {job.key: ids[i] for i, job in enumerate(dag.jobs)}
        ready = 0
        with conn.cursor() as cur:
            with cur.copy(_COPY_JOBS) as copy:
                for job in dag.jobs:
                    waiting_on = parents.get(job.key, 0)
                    ready += waiting_on == 0
                    copy.write_row(
                        (
                            key_to_id[job.key],
                            workflow_id,
                            job.key,
                            job.kind,
                            json.dumps(job.payload),
                            job.model,
                            job.operation,
                            job.timestep,
                            job.decision,
                            "waiting" if waiting_on else "ready",
                            job.priority,
                            waiting_on,
                            job.max_attempts,
                            job.timeout,
                        )
                    )
            with cur.copy(_COPY_EDGES) as copy:
                for parent, child in dag.edges:
                    copy.write_row((key_to_id[parent], key_to_id[child]))
            with cur.copy(_COPY_EVENTS) as copy:
                for job in dag.jobs:
                    status = "waiting" if parents.get(job.key) else "ready"
                    copy.write_row((workflow_id, key_to_id[job.key], status, actor, "submitted"))
        conn.execute(_INSERT_EVENT, (workflow_id, None, None, "pending", None, actor, "submitted"))
        if ready:
            notify_ready(conn, workflow_id)
    return workflow_id


def notify_ready(conn: psycopg.Connection, workflow_id: int) -> None:
    """One NOTIFY per committing batch: NOTIFY takes a global lock at commit."""
    conn.execute("SELECT pg_notify(%s, %s)", (READY_CHANNEL, str(workflow_id)))


# -- reading ----------------------------------------------------------------------------

_WORKFLOW = """
SELECT w.id, w.name, w.status::text, w.model_run, w.bundle, w.job_count,
       w.submitted_at, w.started_at, w.finished_at
FROM workflows w WHERE w.id = %s
"""
_WORKFLOW_JOB_COUNTS = """
SELECT status::text, count(*) FROM jobs WHERE workflow_id = %s GROUP BY status
"""


def get_workflow(conn: psycopg.Connection, workflow_id: int) -> dict | None:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_WORKFLOW, [workflow_id]).fetchone()
    if row is None:
        return None
    counts = dict(conn.execute(_WORKFLOW_JOB_COUNTS, [workflow_id]).fetchall())
    return {**row, "jobs": counts}
