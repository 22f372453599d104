"""Submitting a validated DAG: one transaction, bulk-loaded with COPY."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

import psycopg
from psycopg.copy import QueuedLibpqWriter

from smifdb.spec import Checking, Dag, Job
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


def _copy(
    cur: psycopg.Cursor,
    statement: str,
    chunks: Iterable[str],
    meanwhile: Callable[[], object] | None = None,
) -> None:
    """COPY rows rendered here as text (psycopg's write_row adapts each value on its own,
    ~5 µs a row, which was most of a million-job submit's client time), written from a
    thread of psycopg's, so that rendering the next rows overlaps sending these; then
    ``meanwhile()``, while the last of them are sent and loaded."""
    with cur.copy(statement, writer=QueuedLibpqWriter(cur)) as copy:
        for chunk in chunks:
            copy.write(chunk)
        if meanwhile is not None:
            meanwhile()


class _Rows:
    """The COPY lines of a submission: each job's line as it is read, and beside it the lines
    of its edges, of its row in ready_jobs (a root) and of its submission event, kept (as
    chunks of joined lines) until the jobs' COPY is over."""

    def __init__(
        self, ids: Sequence[int], positions: Mapping[str, int], workflow_id: int, actor: str
    ) -> None:
        self.ids, self.positions = ids, positions
        self.wf, self.who = str(workflow_id), _text(actor)
        self.payloads: dict[int, str] = {}  # parse() shares one payload among alike jobs
        self.edges: list[str] = []
        self.ready: list[str] = []
        self.events: list[str] = []

    def _payload(self, job: Job) -> str:
        text = self.payloads.get(id(job.payload))
        if text is None:
            text = _text(json.dumps(job.payload, separators=(",", ":")))
            self.payloads[id(job.payload)] = text
        return text

    def jobs(self, jobs: Iterable[Job]) -> Iterator[str]:
        """The jobs' COPY text, a chunk at a time, as ``jobs`` are read."""
        ids, positions, wf, who = self.ids, self.positions, self.wf, self.who
        lines = _Chunks([])
        edges, ready, events = _Chunks(self.edges), _Chunks(self.ready), _Chunks(self.events)
        for i, job in zip(ids, jobs, strict=False):
            status = "waiting" if job.after else "ready"
            lines.add(
                f"{i}\t{wf}\t{_text(job.key)}\t{job.kind}\t{self._payload(job)}\t"
                f"{_text(job.model)}\t{_text(job.operation)}\t{_number(job.timestep)}\t"
                f"{_number(job.decision)}\t{status}\t"
                f"{job.priority}\t{len(job.after)}\t{job.max_attempts}\t"
                f"{_number(job.timeout)}\t{job.retry_backoff}\n"
            )
            for parent in job.after:
                edges.add(f"{ids[positions[parent]]}\t{i}\n")
            if not job.after:
                ready.add(f"{i}\t{wf}\t{job.priority}\n")
            events.add(f"{wf}\t{i}\t{status}\t{who}\tsubmitted\n")
            if lines.out:  # a chunk is full
                yield lines.out.pop()
        for chunks in (lines, edges, ready, events):
            chunks.close()
        yield from lines.out

    def rest(self) -> list[tuple[str, list[str]]]:
        return [(_COPY_EDGES, self.edges), (_COPY_READY, self.ready), (_COPY_EVENTS, self.events)]


class _Chunks:
    """Lines appended to ``out`` as strings of _CHUNK_ROWS lines: two million edges as 200
    strings, not two million."""

    def __init__(self, out: list[str]) -> None:
        self.out, self.lines = out, []

    def add(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) == _CHUNK_ROWS:
            self.close()

    def close(self) -> None:
        if self.lines:
            self.out.append("".join(self.lines))
            self.lines = []


def render_copies(
    dag: Dag, ids: Sequence[int], workflow_id: int, actor: str
) -> list[tuple[str, list[str]]]:
    """The four COPYs of a submission (jobs, edges, ready roots, submission events), each as
    its statement and its rows' text (for benchmarks/submit.py's bare COPY of the same rows).
    ``ids``: the jobs' ids, allocated up front so that edges need no jobs read back."""
    rows = _Rows(ids, {job.key: i for i, job in enumerate(dag.jobs)}, workflow_id, actor)
    return [(_COPY_JOBS, list(rows.jobs(dag.jobs))), *rows.rest()]


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
    row = {
        "name": dag.name,
        "model_run": model_run,
        "bundle": bundle,
        "model_run_id": model_run_id,
        "job_count": len(dag.jobs),
        "submitted_by": submitted_by,
    }
    positions = {job.key: i for i, job in enumerate(dag.jobs)}
    return _write(conn, row, dag.jobs, positions, actor=actor, files=files)


def submit_checking(
    conn: psycopg.Connection,
    checking: Checking,
    *,
    actor: str,
) -> tuple[int, Dag]:
    """Check a spec and write it at once: each job goes into the jobs' COPY as soon as it is
    checked, so that PostgreSQL loads the first jobs while later ones are checked (for a
    million jobs, most of the validation's time). If the spec turns out to be wrong the
    transaction is rolled back, nothing is written, and SpecError lists every problem, as
    parse would. A spec with ``files:`` is not written this way: its files are checked and
    stored first."""
    if checking.problems:  # at its top level (its name, say): no need to write anything
        checking.dag()  # SpecError, every problem listed
    row = {"name": checking.name, "job_count": len(checking.raw_jobs)}
    row |= dict.fromkeys(("model_run", "bundle", "model_run_id", "submitted_by"))
    workflow_id = _write(conn, row, checking, checking.index, actor=actor, check=checking.finish)
    return workflow_id, checking.finish()


def _write(
    conn: psycopg.Connection,
    row: dict[str, Any],
    jobs: Iterable[Job],
    positions: Mapping[str, int],
    *,
    actor: str,
    check: Callable[[], object] | None = None,
    files: Sequence[FileEntry] = (),
) -> int:
    """One transaction: the workflow (``row``: _INSERT_WORKFLOW's values), its jobs (job i's
    id is the i-th allocated, ``positions`` maps a key to its i), their edges, ready roots and
    submission events (rendered beside the jobs); and ``check()``, called once the jobs are
    read, which may refuse them all: the transaction is then rolled back."""
    with conn.transaction():
        workflow_id = conn.execute(_INSERT_WORKFLOW, row).fetchone()[0]
        ids = _allocate_job_ids(conn, row["job_count"])
        rows = _Rows(ids, positions, workflow_id, actor)
        with conn.cursor() as cur:
            _copy(cur, _COPY_JOBS, rows.jobs(jobs))
            (edges, edge_chunks), *rest = rows.rest()
            _copy(cur, edges, edge_chunks, meanwhile=check)  # the cycle check, as they load
            for statement, chunks in rest:
                _copy(cur, statement, chunks)
        blobs.add_workflow_files(conn, workflow_id, files)
        conn.execute(_INSERT_EVENT, (workflow_id, None, None, "pending", None, actor, "submitted"))
        if rows.ready:
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
