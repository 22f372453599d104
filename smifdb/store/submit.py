"""Submitting a validated DAG: one transaction, bulk-loaded with COPY."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from itertools import groupby
from pathlib import Path

import psycopg
from psycopg.copy import QueuedLibpqWriter

from smifdb.spec import Dag, Job
from smifdb.store import READY_CHANNEL, blobs, notify
from smifdb.store.blobs import FileEntry

_INSERT_WORKFLOW = """
INSERT INTO workflows (name, model_run, bundle, model_run_id, job_count, submitted_by)
VALUES (%(name)s, %(model_run)s, %(bundle)s, %(model_run_id)s, %(job_count)s, %(submitted_by)s)
RETURNING id
"""
# Job ids, allocated up front. The sequence is named once: nextval of a constant runs at a
# third of a microsecond, of pg_get_serial_sequence(...) per row at 2.5 µs (a million jobs:
# 0.3 s against 2.7 s). Read back as a range when no other session's values fell among ours.
_JOB_SEQUENCE = "SELECT pg_get_serial_sequence('jobs', 'id')"
_ALLOCATE_JOB_IDS = """
SELECT min(id), max(id) FROM (
    SELECT nextval(%(sequence)s::regclass) AS id FROM generate_series(1, %(n)s)
) ids
"""
_ALLOCATE_JOB_ID_LIST = "SELECT nextval(%(sequence)s::regclass) FROM generate_series(1, %(n)s)"
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


# COPY's text format: these four characters are escaped, NULL is \N.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_CHUNK_ROWS = 10_000  # rows per write: large enough that a write costs nothing per row


def _text(value: str | None) -> str:
    return "\\N" if value is None else value.translate(_COPY_ESCAPES)


def _number(value: float | None) -> str:
    return "\\N" if value is None else str(value)


def _copy_lines(cur: psycopg.Cursor, statement: str, lines: Iterable[str]) -> None:
    """COPY rows rendered here as text lines: psycopg's write_row adapts each value on its
    own (~5 µs a row), which is most of a million-job submit's client time."""
    # Written from a thread of psycopg's, so that rendering the next rows overlaps sending.
    with cur.copy(statement, writer=QueuedLibpqWriter(cur)) as copy:
        chunk: list[str] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) == _CHUNK_ROWS:
                copy.write("".join(chunk))
                chunk.clear()
        if chunk:
            copy.write("".join(chunk))


def render_copies(
    dag: Dag, ids: Sequence[int], workflow_id: int, actor: str
) -> list[tuple[str, Iterator[str]]]:
    """The four COPYs of a submission (jobs, edges, ready roots, submission events), each as
    its statement and its rows' text lines, rendered as they are read. ``ids``: the jobs'
    ids, allocated up front so that edges need no jobs read back."""
    jobs = dag.jobs
    key_to_id = {job.key: ids[i] for i, job in enumerate(jobs)}
    payloads: dict[int, str] = {}  # parse() shares one payload among jobs that are alike

    def payload(job: Job) -> str:
        text = payloads.get(id(job.payload))
        if text is None:
            text = _text(json.dumps(job.payload, separators=(",", ":")))
            payloads[id(job.payload)] = text
        return text

    wf = str(workflow_id)
    who = _text(actor)
    return [
        (
            _COPY_JOBS,
            (
                f"{i}\t{wf}\t{_text(job.key)}\t{job.kind}\t{payload(job)}\t"
                f"{_text(job.model)}\t{_text(job.operation)}\t{_number(job.timestep)}\t"
                f"{_number(job.decision)}\t{'waiting' if job.after else 'ready'}\t"
                f"{job.priority}\t{len(job.after)}\t{job.max_attempts}\t"
                f"{_number(job.timeout)}\t{job.retry_backoff}\n"
                for i, job in zip(ids, jobs, strict=True)
            ),
        ),
        (
            _COPY_EDGES,
            (
                f"{key_to_id[parent]}\t{i}\n"
                for i, job in zip(ids, jobs, strict=True)
                for parent in job.after
            ),
        ),
        (
            _COPY_READY,
            (
                f"{i}\t{wf}\t{job.priority}\n"
                for i, job in zip(ids, jobs, strict=True)
                if not job.after
            ),
        ),
        (
            _COPY_EVENTS,
            (
                f"{wf}\t{i}\t{'waiting' if job.after else 'ready'}\t{who}\tsubmitted\n"
                for i, job in zip(ids, jobs, strict=True)
            ),
        ),
    ]


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
    jobs = dag.jobs
    with conn.transaction():
        workflow_id = conn.execute(
            _INSERT_WORKFLOW,
            {
                "name": dag.name,
                "model_run": model_run,
                "bundle": bundle,
                "model_run_id": model_run_id,
                "job_count": len(jobs),
                "submitted_by": submitted_by,
            },
        ).fetchone()[0]
        ids = _allocate_job_ids(conn, len(jobs))
        with conn.cursor() as cur:
            for statement, lines in render_copies(dag, ids, workflow_id, actor):
                _copy_lines(cur, statement, lines)
        blobs.add_workflow_files(conn, workflow_id, files)
        conn.execute(_INSERT_EVENT, (workflow_id, None, None, "pending", None, actor, "submitted"))
        if any(not job.after for job in jobs):
            notify(conn, READY_CHANNEL, workflow_id)
    return workflow_id


def _allocate_job_ids(conn: psycopg.Connection, n: int) -> Sequence[int]:
    sequence = conn.execute(_JOB_SEQUENCE).fetchone()[0]
    args = {"sequence": sequence, "n": n}
    first, last = conn.execute(_ALLOCATE_JOB_IDS, args).fetchone()
    if last - first + 1 == n:  # n values in a range of n: all ours
        return range(first, last + 1)
    with conn.cursor(binary=True) as cur:  # interleaved with another submission's: the list
        return [r[0] for r in cur.execute(_ALLOCATE_JOB_ID_LIST, args)]


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
