"""Submitting a validated DAG: one transaction, bulk-loaded with COPY."""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path

import psycopg

from smifdb.spec import Dag
from smifdb.store import READY_CHANNEL, blobs, notify
from smifdb.store.blobs import FileEntry

_INSERT_WORKFLOW = """
INSERT INTO workflows (name, model_run, bundle, model_run_id, job_count, submitted_by)
VALUES (%(name)s, %(model_run)s, %(bundle)s, %(model_run_id)s, %(job_count)s, %(submitted_by)s)
RETURNING id
"""
_ALLOCATE_JOB_IDS = """
SELECT nextval(pg_get_serial_sequence('jobs', 'id')) FROM generate_series(1, %s)
"""
_COPY_JOBS = """
COPY jobs (id, workflow_id, key, kind, payload, model, operation, timestep, decision,
           status, priority, unfinished_parents, max_attempts, timeout_seconds,
           retry_backoff_seconds)
FROM STDIN
"""
_COPY_EDGES = "COPY job_edges (parent_id, child_id) FROM STDIN"
_COPY_READY = "COPY ready_jobs (job_id, workflow_id, priority) FROM STDIN"
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
    model_run_id: int | None = None,
    submitted_by: int | None = None,
    files: Sequence[FileEntry] = (),
) -> int:
    """Write a validated DAG as one transaction, bulk-loaded with COPY; return the workflow id.

    ``submitted_by`` is the API user's id (None from the CLI, which database roles govern).
    ``files``: the stored files of its spec's ``files:`` (put_files), named in the same
    transaction."""
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
                "model_run_id": model_run_id,
                "job_count": len(dag.jobs),
                "submitted_by": submitted_by,
            },
        ).fetchone()[0]
        ids = [r[0] for r in conn.execute(_ALLOCATE_JOB_IDS, [len(dag.jobs)])]
        key_to_id = {job.key: ids[i] for i, job in enumerate(dag.jobs)}
        statuses = ["waiting" if parents.get(job.key) else "ready" for job in dag.jobs]
        with conn.cursor() as cur:
            with cur.copy(_COPY_JOBS) as copy:
                for job, status in zip(dag.jobs, statuses, strict=True):
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
                            status,
                            job.priority,
                            parents.get(job.key, 0),
                            job.max_attempts,
                            job.timeout,
                            job.retry_backoff,
                        )
                    )
            with cur.copy(_COPY_EDGES) as copy:
                for parent, child in dag.edges:
                    copy.write_row((key_to_id[parent], key_to_id[child]))
            with cur.copy(_COPY_READY) as copy:
                for job, status in zip(dag.jobs, statuses, strict=True):
                    if status == "ready":
                        copy.write_row((key_to_id[job.key], workflow_id, job.priority))
            with cur.copy(_COPY_EVENTS) as copy:
                for job, status in zip(dag.jobs, statuses, strict=True):
                    copy.write_row((workflow_id, key_to_id[job.key], status, actor, "submitted"))
        blobs.add_workflow_files(conn, workflow_id, files)
        conn.execute(_INSERT_EVENT, (workflow_id, None, None, "pending", None, actor, "submitted"))
        if "ready" in statuses:
            notify(conn, READY_CHANNEL, workflow_id)
    return workflow_id


def put_files(
    conn: psycopg.Connection,
    sources: Sequence[tuple[Path, str]],
    *,
    max_bytes: int = blobs.DEFAULT_MAX_FILE_BYTES,
) -> list[FileEntry]:
    """Store the files of a spec's ``files:`` (smifdb.spec.source_files: (folder, path under
    it)), before the workflow is written: every size checked first (FileTooLarge lists those
    over ``max_bytes``), then each blob a transaction of its own, a file stored
    already only touched (prune's grace then covers it until submit_dag names it)."""
    too_large = [
        f"{root / rel} is {size:,} bytes"
        for root, rel in sources
        if (size := (root / rel).stat().st_size) > max_bytes
    ]
    if too_large:
        raise blobs.FileTooLarge(
            f"files over the limit of {max_bytes:,} bytes per file (raise it with "
            f"--max-file-bytes or {blobs.MAX_FILE_BYTES_ENV}): {'; '.join(too_large[:20])}"
        )
    entries: list[FileEntry] = []
    for root, group in groupby(sources, key=lambda s: s[0]):
        entries += blobs.put_tree(conn, root, [rel for _, rel in group], max_bytes=max_bytes)
    return entries
