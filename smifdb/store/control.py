"""Cancelling workflows and jobs.

Waiting and ready jobs end at once; running jobs are flagged (cancel_requested_at) and a NOTIFY
tells runners to terminate them and record them cancelled, fenced like any completion.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import psycopg

from smifdb.store import CANCEL_CHANNEL, notify
from smifdb.store.queue import settle_workflows


class NotFound(LookupError):
    """No such workflow or job."""


@dataclass
class CancelReport:
    workflow_status: str
    cancelled: int = 0  # waiting/ready jobs ended now
    terminating: int = 0  # running jobs whose runners were asked to stop them
    already_finished: bool = False
    ended: dict[int, str] = field(default_factory=dict)


_WORKFLOW_STATUS = "SELECT status::text, finished_at IS NOT NULL FROM workflows WHERE id = %s"
_JOB_BY_KEY = "SELECT id FROM jobs WHERE workflow_id = %s AND key = %s"
_WORKFLOW_JOBS = (
    "SELECT id FROM jobs WHERE workflow_id = %s AND status IN ('waiting', 'ready', 'running')"
)

# Lock the jobs first (ascending id), then the workflow: the order every writer uses.
_LOCK = """
WITH RECURSIVE targets(id) AS (
    SELECT unnest(%(roots)s::bigint[])
    UNION
    SELECT e.child_id FROM job_edges e JOIN targets t ON e.parent_id = t.id
    WHERE %(descendants)s
)
SELECT j.id FROM jobs j
WHERE j.id IN (SELECT id FROM targets) AND j.status IN ('waiting', 'ready', 'running')
ORDER BY j.id FOR NO KEY UPDATE
"""

_CANCEL_IDLE = """
WITH victims AS (
    SELECT id, status::text AS old FROM jobs
    WHERE id = ANY(%(ids)s) AND status IN ('waiting', 'ready')
), updated AS (
    UPDATE jobs j SET status = 'cancelled', finished_at = now(), not_before = NULL,
                      error = %(reason)s
    FROM victims v WHERE j.id = v.id
    RETURNING j.id, j.workflow_id, v.old
), logged AS (
    INSERT INTO events (workflow_id, job_id, from_status, to_status, actor, reason)
    SELECT workflow_id, id, old, 'cancelled', %(actor)s, %(reason)s FROM updated
)
SELECT count(*) FROM updated
"""

_FLAG_RUNNING = """
WITH flagged AS (
    UPDATE jobs SET cancel_requested_at = now()
    WHERE id = ANY(%(ids)s) AND status = 'running' AND cancel_requested_at IS NULL
    RETURNING id, workflow_id, attempts
), logged AS (
    INSERT INTO events (workflow_id, job_id, from_status, to_status, attempt, actor, reason)
    SELECT workflow_id, id, 'running', 'running', attempts, %(actor)s,
           'cancellation requested: ' || %(reason)s
    FROM flagged
)
SELECT count(*) FROM flagged
"""

_CANCEL_WORKFLOW = """
WITH updated AS (
    UPDATE workflows SET status = 'cancelled'
    WHERE id = %(id)s AND status IN ('pending', 'running')
    RETURNING id
), logged AS (
    INSERT INTO events (workflow_id, from_status, to_status, actor, reason)
    SELECT id, %(old)s, 'cancelled', %(actor)s, %(reason)s FROM updated
)
SELECT count(*) FROM updated
"""


def cancel(
    conn: psycopg.Connection,
    workflow_id: int,
    *,
    actor: str,
    job_key: str | None = None,
    reason: str = "cancelled by user",
) -> CancelReport:
    """Cancel a workflow, or one job and everything downstream of it, in one transaction."""
    with conn.transaction():
        row = conn.execute(_WORKFLOW_STATUS, [workflow_id]).fetchone()
        if row is None:
            raise NotFound(f"no workflow {workflow_id}")
        old_status, finished = row
        if job_key is None:
            roots = [r[0] for r in conn.execute(_WORKFLOW_JOBS, [workflow_id])]
            descendants = False
        else:
            job = conn.execute(_JOB_BY_KEY, [workflow_id, job_key]).fetchone()
            if job is None:
                raise NotFound(f"workflow {workflow_id} has no job {job_key!r}")
            roots, descendants = [job[0]], True
        if finished:
            return CancelReport(old_status, already_finished=True)
        ids = [
            r[0]
            for r in conn.execute(_LOCK, {"roots": roots, "descendants": descendants}).fetchall()
        ]
        args = {"ids": ids, "actor": actor, "reason": reason}
        report = CancelReport(old_status)
        report.cancelled = conn.execute(_CANCEL_IDLE, args).fetchone()[0]
        report.terminating = conn.execute(_FLAG_RUNNING, args).fetchone()[0]
        if job_key is None:
            conn.execute(
                _CANCEL_WORKFLOW,
                {"id": workflow_id, "old": old_status, "actor": actor, "reason": reason},
            )
        if report.cancelled:
            report.ended = settle_workflows(conn, actor, Counter({workflow_id: report.cancelled}))
        if report.terminating:
            notify(conn, CANCEL_CHANNEL, workflow_id)
        report.workflow_status = conn.execute(_WORKFLOW_STATUS, [workflow_id]).fetchone()[0]
    return report
