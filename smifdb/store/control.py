"""Cancelling workflows and jobs.

Waiting and ready jobs end at once. Running jobs are ended by their runners, told by a NOTIFY
(and their heartbeat) to terminate them and record them cancelled, fenced like any completion:
a running job is cancelled when its workflow is, or when it carries cancel_requested_at.

Locking: the ready jobs' queue rows are deleted first (a claim holding one makes its job
running, and the cancel then finds it running), then the waiting and ready jobs are locked in
id order. Then either the workflow is
cancelled (its row locked last; its running jobs are not locked at all), or, for one job
cancelled by key (with its descendants, which run if it had already finished) or a workflow
that has failed, the running jobs are flagged, locked in id order, and the workflow row is not
locked. A runner recording outcomes locks children before
its own running jobs and workflows last, so no cycle of waits can form.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import psycopg

from smifdb import errors
from smifdb.store import CANCEL_CHANNEL, notify, queue
from smifdb.store.auth import User, require_owner
from smifdb.store.queue import settle, settle_workflows


class NotFound(errors.NotFound):
    """No such workflow or job."""


@dataclass
class CancelReport:
    workflow_status: str
    cancelled: int = 0  # waiting/ready jobs ended now
    terminating: int = 0  # running jobs whose runners were asked to stop them
    already_finished: bool = False
    ended: dict[int, str] = field(default_factory=dict)


_WORKFLOW_STATUS = """
SELECT status::text, finished_at IS NOT NULL, submitted_by FROM workflows WHERE id = %s
"""
_JOB_BY_KEY = "SELECT id FROM jobs WHERE workflow_id = %s AND key = %s"
_WORKFLOW_JOBS = (
    "SELECT id FROM jobs WHERE workflow_id = %s AND status IN ('waiting', 'ready', 'running')"
)

# Out of the queue before their rows are locked: ready_jobs rows come first in every lock order.
# (Waits for a claim holding one, which never waits for this transaction.)
_DEQUEUE = """
DELETE FROM ready_jobs WHERE workflow_id = %(workflow)s AND job_id = ANY(%(ids)s::bigint[])
"""
# Lock the jobs first (ascending id), then the workflow: the order every writer uses.
_LOCK_IDLE = """
SELECT id FROM jobs WHERE id = ANY(%s) AND status IN ('waiting', 'ready')
ORDER BY id FOR NO KEY UPDATE
"""
_RUNNING = "SELECT count(*) FROM jobs WHERE id = ANY(%s) AND status = 'running'"

_CANCEL_IDLE = """
WITH updated AS (
    UPDATE jobs j SET status = 'cancelled', finished_at = now(), not_before = NULL,
                      error = %(reason)s
    FROM (SELECT id, status::text AS old FROM jobs WHERE id = ANY(%(ids)s)) v
    WHERE j.id = v.id
    RETURNING j.id, j.workflow_id, v.old
), logged AS (
    INSERT INTO events (workflow_id, job_id, from_status, to_status, actor, reason)
    SELECT workflow_id, id, old, 'cancelled', %(actor)s, %(reason)s FROM updated
)
SELECT count(*) FROM updated
"""

# Running jobs whose cancellation their workflow's status does not carry: one job cancelled by
# key, or every running job of a workflow that has failed (it stays failed, so its runners
# would otherwise let the attempts finish and retry them).
_FLAG_RUNNING = """
WITH locked AS (
    SELECT id FROM jobs
    WHERE id = ANY(%(ids)s) AND status = 'running' AND cancel_requested_at IS NULL
    ORDER BY id FOR NO KEY UPDATE
), flagged AS (
    UPDATE jobs j SET cancel_requested_at = now()
    FROM locked WHERE j.id = locked.id
    RETURNING j.id, j.workflow_id, j.attempts
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
    by: User | None = None,
) -> CancelReport:
    """Cancel a workflow, or one job and everything downstream of it, in one transaction.

    ``by``: the API user asking, who must have submitted the workflow unless an admin."""
    with conn.transaction():
        row = conn.execute(_WORKFLOW_STATUS, [workflow_id]).fetchone()
        if row is None:
            raise NotFound(f"no workflow {workflow_id}")
        old_status, finished, submitted_by = row
        require_owner(by, submitted_by, f"workflow {workflow_id}")
        if job_key is None:
            targets = [r[0] for r in conn.execute(_WORKFLOW_JOBS, [workflow_id])]
        else:
            job = conn.execute(_JOB_BY_KEY, [workflow_id, job_key]).fetchone()
            if job is None:
                raise NotFound(f"workflow {workflow_id} has no job {job_key!r}")
            below = conn.execute(queue.DESCENDANTS, [[job[0]]]).fetchall()
            targets = [job[0], *(r[0] for r in below)]
        if finished:
            return CancelReport(old_status, already_finished=True)
        targets = sorted(set(targets))
        conn.execute(_DEQUEUE, {"workflow": workflow_id, "ids": queue.array(targets)})
        idle = [r[0] for r in conn.execute(_LOCK_IDLE, [targets]).fetchall()]
        report = CancelReport(old_status)
        args = {"ids": idle, "actor": actor, "reason": reason}
        report.cancelled = conn.execute(_CANCEL_IDLE, args).fetchone()[0] if idle else 0
        carried = False  # does the workflow's cancelled status carry the request?
        if job_key is None:
            args = {"id": workflow_id, "old": old_status, "actor": actor, "reason": reason}
            carried = bool(conn.execute(_CANCEL_WORKFLOW, args).fetchone()[0])
            carried = carried or old_status == "cancelled"
        if carried:  # its runners see the status; nothing more to write
            report.terminating = conn.execute(_RUNNING, [targets]).fetchone()[0]
        else:  # the job named and its descendants (running if it had already finished), or a
            # failed workflow's jobs, whether it failed before this cancel or while it waited
            flag = {"ids": targets, "actor": actor, "reason": reason}
            report.terminating = conn.execute(_FLAG_RUNNING, flag).fetchone()[0]
        unsettled: set[int] = set()
        if report.cancelled:
            counted = Counter({workflow_id: report.cancelled})
            report.ended, unsettled = settle_workflows(conn, actor, counted)
        if report.terminating:
            notify(conn, CANCEL_CHANNEL, workflow_id)
    report.ended |= settle(conn, actor, unsettled)
    report.workflow_status = conn.execute(_WORKFLOW_STATUS, [workflow_id]).fetchone()[0]
    return report
