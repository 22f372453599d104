"""Reads for the CLI and API: workflows, their progress, their jobs."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg.rows import dict_row

from smifdb.states import JOB_STATUSES
from smifdb.store import FINISHED_JOBS


@dataclass(frozen=True)
class Progress:
    workflow_id: int
    name: str
    status: str
    job_count: int
    finished: bool
    counts: dict[str, int]
    elapsed: float  # seconds since submission (or total, once finished)

    @property
    def done(self) -> int:
        return self.job_count - sum(self.counts.get(s, 0) for s in ("waiting", "ready", "running"))


# The API user who submitted workflow `w`, by name (NULL: the CLI, or a user since removed).
SUBMITTER = "(SELECT u.name FROM api_users u WHERE u.id = w.submitted_by) AS submitted_by"
_WORKFLOW = f"""
SELECT w.id, w.name, w.status::text AS status, w.model_run, w.bundle, w.job_count,
       w.job_count - {FINISHED_JOBS} AS unfinished_jobs, w.submitted_at, w.started_at,
       w.finished_at, {SUBMITTER}
FROM workflows w WHERE w.id = %s
"""
_JOB_COUNTS = "SELECT status::text, count(*)::int FROM jobs WHERE workflow_id = %s GROUP BY 1"
_PROGRESS = """
SELECT w.id, w.name, w.status::text, w.job_count, w.finished_at IS NOT NULL,
       extract(epoch FROM coalesce(w.finished_at, now()) - w.submitted_at)::float
FROM workflows w WHERE w.id = %s
"""
_WORK = """
SELECT coalesce(sum(extract(epoch FROM finished_at - started_at)), 0)::float,
       extract(epoch FROM max(finished_at) - min(started_at))::float
FROM jobs WHERE workflow_id = %s AND started_at IS NOT NULL AND finished_at IS NOT NULL
"""
_FINISHED_STATUS = "SELECT status::text FROM workflows WHERE id = %s AND finished_at IS NOT NULL"
_MODEL_RUN_FINISHED = (
    "SELECT status::text FROM model_runs WHERE id = %s AND finished_at IS NOT NULL"
)
_PROBLEM_JOBS = """
SELECT key, status::text AS status, attempts, exit_code, error, log_tail, lease_owner
FROM jobs WHERE workflow_id = %s AND status IN ('failed', 'cancelled')
ORDER BY finished_at NULLS LAST, id LIMIT %s
"""


def get_workflow(conn: psycopg.Connection, workflow_id: int) -> dict | None:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_WORKFLOW, [workflow_id]).fetchone()
    if row is None:
        return None
    return {**row, "jobs": dict(conn.execute(_JOB_COUNTS, [workflow_id]).fetchall())}


def progress(conn: psycopg.Connection, workflow_id: int) -> Progress | None:
    row = conn.execute(_PROGRESS, [workflow_id]).fetchone()
    if row is None:
        return None
    counts = {s: 0 for s in JOB_STATUSES}
    counts.update(dict(conn.execute(_JOB_COUNTS, [workflow_id]).fetchall()))
    return Progress(row[0], row[1], row[2], row[3], row[4], counts, row[5])


def problem_jobs(conn: psycopg.Connection, workflow_id: int, limit: int = 10) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_PROBLEM_JOBS, [workflow_id, limit]).fetchall()


def finished_status(conn: psycopg.Connection, workflow_id: int) -> str | None:
    """The workflow's final status once every job has finished, else None."""
    row = conn.execute(_FINISHED_STATUS, [workflow_id]).fetchone()
    return row[0] if row else None


def work_and_makespan(conn: psycopg.Connection, workflow_id: int) -> tuple[float, float | None]:
    """Seconds of job time (last attempts) and first start to last finish: the parallelism."""
    work, makespan = conn.execute(_WORK, [workflow_id]).fetchone()
    return work, makespan


def model_run_finished_status(conn: psycopg.Connection, model_run_id: int) -> str | None:
    """The model run's final status once it has ended, else None."""
    row = conn.execute(_MODEL_RUN_FINISHED, [model_run_id]).fetchone()
    return row[0] if row else None


_WORKFLOWS = f"""
SELECT w.id, w.name, w.status::text AS status, w.model_run_id, w.bundle, w.job_count,
       {FINISHED_JOBS} AS jobs_finished, w.submitted_at, w.started_at,
       w.finished_at, {SUBMITTER}
FROM workflows w
WHERE (%(status)s::text IS NULL OR w.status::text = %(status)s)
  AND w.id < coalesce(%(before)s::bigint, 9223372036854775807)
ORDER BY w.id DESC
LIMIT %(limit)s
"""
# One page in key order: a range of jobs_workflow_key_key (no index of jobs has the id after the
# workflow, and none is added: every submit would write it). The cursor is the last job's id,
# whose key the range starts after (a key can be long; an id fits in any URL). The first page
# starts after '' (keys are never empty). Keyset bounds are written as one always-present
# comparison, never "param IS NULL OR …": a prepared statement's generic plan (psycopg
# prepares a query after five runs) keeps such an OR as a filter, and reads every row before
# the cursor again on each page.
_JOBS = """
SELECT j.id, j.key, j.kind::text AS kind, j.status::text AS status, j.attempts, j.max_attempts,
       j.lease_owner AS runner, j.model, j.operation, j.timestep, j.decision, j.exit_code,
       j.error, j.started_at, j.finished_at,
       coalesce((SELECT array_agg(e.parent_id ORDER BY e.parent_id) FROM job_edges e
                 WHERE e.child_id = j.id), '{}') AS parents
FROM jobs j
WHERE j.workflow_id = %(workflow)s
  AND j.key > coalesce(
      (SELECT a.key FROM jobs a WHERE a.id = %(after)s AND a.workflow_id = %(workflow)s), '')
ORDER BY j.key
LIMIT %(limit)s
"""
_JOB = """
SELECT j.id, j.workflow_id, j.key, j.kind::text AS kind, j.payload, j.status::text AS status,
       j.priority, j.attempts, j.max_attempts, j.not_before, j.timeout_seconds,
       j.lease_owner AS runner,
       (SELECT c.expires_at FROM claims c  -- its open claim (claims_open_idx by owner)
        WHERE j.status = 'running' AND c.closed_at IS NULL AND c.owner = j.lease_owner
          AND c.claimed_at = j.started_at AND j.id = ANY(c.job_ids)
        ORDER BY c.id DESC LIMIT 1) AS lease_expires_at, j.model, j.operation, j.timestep,
       j.decision, j.exit_code, j.error, j.result, j.log_tail, j.created_at, j.started_at,
       j.finished_at
FROM jobs j WHERE j.id = %s
"""
# Through the audit view, which shows each attempt's claim beside its events.
_JOB_EVENTS = """
SELECT at, from_status, to_status, attempt, actor, reason FROM smifdb_job_history
WHERE job_id = %s ORDER BY event_id NULLS LAST, at
"""


def workflows(
    conn: psycopg.Connection,
    status: str | None = None,
    limit: int = 100,
    *,
    before: int | None = None,
) -> list[dict]:
    """Newest first, from before the workflow ``before`` (the primary key, backwards)."""
    params = {"status": status, "limit": limit, "before": before}
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_WORKFLOWS, params).fetchall()


def jobs(
    conn: psycopg.Connection, workflow_id: int, limit: int, *, after: int | None = None
) -> list[dict]:
    """Up to ``limit`` jobs of a workflow with their parents' ids (enough to draw the DAG), in
    key order from after the job ``after``: each page one index range, however big the workflow."""
    params = {"workflow": workflow_id, "limit": limit, "after": after}
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(_JOBS, params).fetchall()


def job(conn: psycopg.Connection, job_id: int) -> dict | None:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(_JOB, [job_id]).fetchone()
        if row is not None:
            row["events"] = cur.execute(_JOB_EVENTS, [job_id]).fetchall()
    return row
