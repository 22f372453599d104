"""The queue's hot path: claim ready jobs, record how they ended, rescue abandoned ones.

Every write of a job's end is fenced by (status = 'running', lease_owner, attempts, started_at):
a late or duplicate write — a runner that lost its lease, a retried completion after a dropped
COMMIT, a rescue racing a completion — matches no row and changes nothing. started_at is the
claiming transaction's now(), so it tells two claims apart even where the attempt number does
not: a released attempt is not counted, and the next claim reuses its number.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import psycopg

from smifdb.pgtext import clean_text
from smifdb.store import FINISHED_CHANNEL, READY_CHANNEL, notify

MAX_BACKOFF = 3600.0


class ClaimedJob(NamedTuple):
    """A job as claimed: the columns of the claim statement's result, in order."""

    id: int
    workflow_id: int
    key: str
    kind: str
    payload: dict[str, Any]
    attempt: int
    max_attempts: int
    timeout: float | None
    retry_backoff: float
    priority: int = 0
    claimed_at: datetime | None = None  # jobs.started_at as claimed: part of the fence
    workflow_pending: bool = False  # its workflow's first claim: start_workflows marks it running


@dataclass(slots=True)
class Outcome:
    """How one attempt ended, as its lease holder (or a rescuer on its behalf) reports it.

    status: 'succeeded', 'failed', 'cancelled', or 'released' (handed back unfinished, the
    attempt not counted). A failure with attempts left becomes a retry.
    """

    job_id: int
    workflow_id: int
    attempt: int
    owner: str
    status: str
    max_attempts: int = 1
    retry_backoff: float = 1.0
    result: Any = None
    exit_code: int | None = None
    error: str | None = None
    log_tail: str | None = None
    reason: str | None = None
    key: str | None = None  # the job's key, for log lines only
    claimed_at: datetime | None = None  # the claim this outcome ends (None: any claim)

    @property
    def retries(self) -> bool:
        return self.status == "failed" and self.attempt < self.max_attempts

    @property
    def final_failure(self) -> bool:
        return self.status == "failed" and self.attempt >= self.max_attempts

    def without_data(self, why: str) -> Outcome:
        """This outcome without the result and log PostgreSQL refused: a success fails."""
        status = "failed" if self.status == "succeeded" else self.status
        return replace(self, status=status, result=None, log_tail=None, error=why, reason=why)


@dataclass
class FinishReport:
    recorded: list[int] = field(default_factory=list)  # job ids whose outcome was written
    became_ready: int = 0
    claimed: list[ClaimedJob] = field(default_factory=list)
    finished_workflows: dict[int, str] = field(default_factory=dict)  # id -> final status
    taken: list[Outcome] = field(default_factory=list)  # rescue/release: the outcomes written


def backoff_delay(attempt: int, base: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter in [0.5, 1.5) of the nominal delay."""
    nominal = min(base * 2 ** max(attempt - 1, 0), MAX_BACKOFF)
    return nominal * (0.5 + (rng or random).random())


# -- claim ------------------------------------------------------------------------------

# Ready jobs in claim order (priority, then age) through a partial index, locked as they are
# read: SKIP LOCKED passes over rows another claim holds, and LIMIT stops the scan at n.
_PICK = """
    SELECT id, priority FROM jobs
    WHERE status = 'ready'
      AND (not_before IS NULL OR not_before <= now())
      {scope}
    ORDER BY priority DESC, id
    LIMIT %(n)s
    FOR NO KEY UPDATE SKIP LOCKED
"""
_CLAIM = """
WITH picked AS MATERIALIZED ({picked}
), claimed AS (
    UPDATE jobs j
    SET status = 'running', attempts = j.attempts + 1, lease_owner = %(owner)s,
        lease_expires_at = now() + make_interval(secs => %(lease)s),
        started_at = now(), not_before = NULL
    FROM picked
    WHERE j.id = picked.id
    RETURNING j.id, j.workflow_id, j.key, j.kind::text, j.payload, j.attempts,
              j.max_attempts, j.timeout_seconds, j.retry_backoff_seconds, j.priority,
              j.started_at
), logged AS (
    INSERT INTO events (workflow_id, job_id, from_status, to_status, attempt, actor, reason)
    SELECT workflow_id, id, 'ready', 'running', attempts, %(owner)s, 'claimed' FROM claimed
), pending AS (
    SELECT id FROM workflows
    WHERE id IN (SELECT workflow_id FROM claimed) AND status = 'pending'
)
SELECT c.*, c.workflow_id IN (SELECT id FROM pending) FROM claimed c ORDER BY priority DESC, id
"""
# A workflow's first claim marks it running: a statement of its own, run after any workflow
# rows the transaction must wait for are locked (finish settles them first). Locking them in
# the claim would hold rows another runner's settle waits for while this transaction waits
# for that runner's: a deadlock. It never waits itself: whoever holds a pending workflow's row
# is recording outcomes of its jobs and marks it running (_SETTLE_WORKFLOWS), or cancelling it.
_START_WORKFLOWS = """
WITH started AS (
    UPDATE workflows w SET status = 'running', started_at = now()
    WHERE w.id IN (
        SELECT id FROM workflows
        WHERE id = ANY(%(ids)s::bigint[]) AND status = 'pending'
        FOR NO KEY UPDATE SKIP LOCKED
    )
    RETURNING w.id
)
INSERT INTO events (workflow_id, from_status, to_status, actor, reason)
SELECT id, 'pending', 'running', %(owner)s, 'first job claimed' FROM started
"""
CLAIM_ANY = _CLAIM.format(picked=_PICK.format(scope=""))
CLAIM_WORKFLOW = _CLAIM.format(picked=_PICK.format(scope="AND workflow_id = %(workflow_id)s"))
# A model run's unfinished bundles, each read in claim order through jobs_claim_workflow_idx,
# merged, and the first n kept. (Rows locked past the n are released at commit.) One scan of
# the whole ready set, filtered by workflow, would read every other model run's jobs first.
CLAIM_MODEL_RUN = _CLAIM.format(
    picked="""
    SELECT c.id FROM workflows w
    CROSS JOIN LATERAL ({pick}) c
    WHERE w.model_run_id = %(model_run_id)s AND w.finished_at IS NULL
    ORDER BY c.priority DESC, c.id
    LIMIT %(n)s""".format(pick=_PICK.format(scope="AND workflow_id = w.id"))
)


# A queue's ready set changes faster than ANALYZE runs, so the planner's estimate of ready jobs
# is nearly always stale. Under-estimated (a big DAG just submitted, a wide fan-out just
# released), it picks a bitmap scan of every ready job plus a sort: 3-5x the cost of the claim
# at 40,000 ready jobs. Without bitmap scans it keeps the ordered partial-index scan, which
# stops after n rows. Local to the claiming transaction, whose other statements are all
# index lookups of known ids.
PLAN_CLAIM = "SET LOCAL enable_bitmapscan = off"


@dataclass(frozen=True)
class Scope:
    """Which jobs a runner may claim: all, one workflow's, or one model run's."""

    workflow_id: int | None = None
    model_run_id: int | None = None

    def statement(self) -> str:
        if self.workflow_id is not None:
            return CLAIM_WORKFLOW
        return CLAIM_ANY if self.model_run_id is None else CLAIM_MODEL_RUN


ANYWHERE = Scope()


def claim(
    conn: psycopg.Connection,
    owner: str,
    n: int,
    *,
    lease: float,
    scope: Scope = ANYWHERE,
) -> list[ClaimedJob]:
    """Claim up to ``n`` ready jobs in one short transaction."""
    if n <= 0:
        return []
    with conn.transaction():
        claimed = [ClaimedJob._make(row) for row in _claim_cursor(conn, owner, n, lease, scope)]
        start_workflows(conn, owner, claimed)
    return claimed


def start_workflows(conn: psycopg.Connection, owner: str, claimed: list[ClaimedJob]) -> None:
    """Within the claiming transaction, after every lock it waits for: see _START_WORKFLOWS."""
    pending = {job.workflow_id for job in claimed if job.workflow_pending}
    if pending:
        conn.execute(_START_WORKFLOWS, {"ids": array(sorted(pending)), "owner": owner})


def _claim_cursor(
    conn: psycopg.Connection, owner: str, n: int, lease: float, scope: Scope
) -> psycopg.Cursor:
    conn.execute(PLAN_CLAIM)
    params = {
        "n": n,
        "owner": owner,
        "lease": lease,
        "workflow_id": scope.workflow_id,
        "model_run_id": scope.model_run_id,
    }
    return conn.execute(scope.statement(), params)


# -- finish -----------------------------------------------------------------------------

# LATERAL + OFFSET 0 (a planner fence) keeps each step an index lookup per parent; a plain
# join lets the planner hash the whole edge table.
DESCENDANTS = """
WITH RECURSIVE doomed(id) AS (
    SELECT child_id FROM job_edges WHERE parent_id = ANY(%s::bigint[])
    UNION
    SELECT e.child_id FROM doomed d
    CROSS JOIN LATERAL (SELECT child_id FROM job_edges WHERE parent_id = d.id OFFSET 0) e
)
SELECT id FROM doomed
"""
# The children of jobs that succeeded and the doomed descendants of jobs that failed for good
# are locked here, in ascending id order, before anything else in the transaction. (A job's
# own row is then locked by the UPDATE that records it: only its lease holder, a rescuer
# acting for it, or a one-row cancel flag ever write a running job.) Index-driven.
_LOCK_JOBS = """
SELECT id FROM jobs
WHERE id = ANY(ARRAY(
    SELECT child_id FROM job_edges WHERE parent_id = ANY(%(succeeding)s::bigint[])
    UNION SELECT unnest(%(doomed)s::bigint[])
))
ORDER BY id FOR NO KEY UPDATE
"""

_RECORD_TEMPLATE = """
WITH o AS (
    SELECT * FROM jsonb_to_recordset(%(outcomes)s::jsonb) AS o(
        id bigint, attempt int, owner text, outcome text, result jsonb, exit_code int,
        error text, log_tail text, not_before timestamptz, reason text, claimed_at timestamptz)
), updated AS (
    UPDATE jobs j SET
        status = (CASE
            WHEN o.outcome NOT IN ('retry', 'released') THEN o.outcome
            WHEN {cancelled} THEN 'cancelled'
            ELSE 'ready'
        END)::job_status,
        attempts = j.attempts - (o.outcome = 'released')::int,
        not_before = o.not_before,
        lease_owner = NULL,
        lease_expires_at = NULL,
        finished_at = CASE
            WHEN o.outcome NOT IN ('retry', 'released') THEN now()
            WHEN {cancelled} THEN now()
        END,
        result = o.result,
        exit_code = o.exit_code,
        error = o.error,
        log_tail = o.log_tail
    FROM o
    -- status::text, not status: the planner must not use the running-jobs partial index here,
    -- whose dead entries (every job ever claimed since the last vacuum) it cannot count.
    WHERE j.id = o.id AND j.status::text = 'running' AND j.lease_owner = o.owner
      AND j.attempts = o.attempt AND (o.claimed_at IS NULL OR j.started_at = o.claimed_at)
    RETURNING j.id, j.workflow_id, j.status::text AS status, o.outcome, o.attempt, o.reason
), logged AS (
    INSERT INTO events (workflow_id, job_id, from_status, to_status, attempt, actor, reason)
    SELECT workflow_id, id, 'running', status, attempt, %(actor)s, reason FROM updated
)
{promote}SELECT workflow_id,
       array_agg(id) AS recorded,
       count(*) FILTER (WHERE status IN ('succeeded', 'failed', 'cancelled'))::int AS finished,
       array_agg(id) FILTER (WHERE status = 'failed') AS failed,
       {became_ready} AS became_ready
FROM updated GROUP BY workflow_id
"""
# Children of the jobs that succeeded count down; at zero they become ready. The children
# were locked by _LOCK_JOBS, and are never the rows `updated` touches.
_PROMOTE = """, done AS (
    SELECT e.child_id, count(*)::int AS n FROM job_edges e
    WHERE e.parent_id = ANY(ARRAY(SELECT id FROM updated WHERE status = 'succeeded'))
    GROUP BY e.child_id
), promoted AS (
    UPDATE jobs j SET
        unfinished_parents = j.unfinished_parents - done.n,
        status = (CASE WHEN j.status = 'waiting' AND j.unfinished_parents = done.n
                       THEN 'ready' ELSE j.status::text END)::job_status
    FROM done
    WHERE j.id = done.child_id
    RETURNING j.id, j.workflow_id, j.status::text AS status, j.unfinished_parents
), promoted_logged AS (
    INSERT INTO events (workflow_id, job_id, from_status, to_status, actor, reason)
    SELECT workflow_id, id, 'waiting', 'ready', %(actor)s, 'all parents succeeded'
    FROM promoted WHERE status = 'ready' AND unfinished_parents = 0
)
"""
# A job that would go back to the queue is cancelled instead if it, or its workflow, was.
_CANCELLED = """(j.cancel_requested_at IS NOT NULL OR EXISTS (
                SELECT 1 FROM workflows w WHERE w.id = j.workflow_id AND w.status = 'cancelled'))"""
_RECORD = _RECORD_TEMPLATE.format(promote="", became_ready="0", cancelled=_CANCELLED)
_RECORD_AND_PROMOTE = _RECORD_TEMPLATE.format(
    promote=_PROMOTE,
    cancelled=_CANCELLED,
    became_ready="(SELECT count(*) FROM promoted WHERE status = 'ready' AND unfinished_parents = 0)",
)


_FAIL_DESCENDANTS = """
WITH victims AS (
    SELECT j.id, j.status::text AS old FROM jobs j
    WHERE j.id = ANY(%(doomed)s::bigint[]) AND j.status IN ('waiting', 'ready')
), updated AS (
    UPDATE jobs j SET status = 'upstream_failed', finished_at = now(),
                      error = 'an upstream job failed'
    FROM victims v WHERE j.id = v.id
    RETURNING j.id, j.workflow_id, v.old
), logged AS (
    INSERT INTO events (workflow_id, job_id, from_status, to_status, actor, reason)
    SELECT workflow_id, id, old, 'upstream_failed', %(actor)s, 'an upstream job failed'
    FROM updated
)
SELECT workflow_id, count(*) FROM updated GROUP BY workflow_id
"""

_LOCK_WORKFLOWS = (
    "SELECT id FROM workflows WHERE id = ANY(%s::bigint[]) ORDER BY id FOR NO KEY UPDATE"
)

# Subtract newly finished jobs from each workflow; a final failure fails the workflow at once
# (other branches may still finish); the last job to finish decides the end status.
_SETTLE_WORKFLOWS = """
WITH d AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(finished)s::int[], %(failed)s::bool[])
        AS d(id, finished, failed)
), before AS (
    SELECT w.id, w.status AS old, w.unfinished_jobs - d.finished AS left_over, d.failed
    FROM workflows w JOIN d ON d.id = w.id
), updated AS (
    UPDATE workflows w SET
        unfinished_jobs = b.left_over,
        finished_at = CASE WHEN b.left_over = 0 THEN now() END,
        started_at = coalesce(w.started_at, now()),
        status = CASE
            WHEN w.status NOT IN ('pending', 'running') THEN w.status
            WHEN b.failed THEN 'failed'
            WHEN b.left_over > 0 THEN 'running'
            WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.workflow_id = w.id
                         AND j.status IN ('failed', 'upstream_failed')) THEN 'failed'
            WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.workflow_id = w.id
                         AND j.status = 'cancelled') THEN 'cancelled'
            ELSE 'succeeded'
        END::workflow_status
    FROM before b WHERE w.id = b.id
    RETURNING w.id, b.old::text AS old, w.status::text AS status,
              w.finished_at IS NOT NULL AS finished
), logged AS (
    INSERT INTO events (workflow_id, from_status, to_status, actor, reason)
    SELECT id, old, status, %(actor)s, 'job outcomes recorded' FROM updated WHERE old <> status
)
SELECT id, status, finished FROM updated
"""


def array(values: Iterable[int]) -> str:
    """An array literal for ``%s::bigint[]``: far cheaper to send than a dumped Python list."""
    return "{" + ",".join(map(str, values)) + "}"


def _outcomes_json(outcomes: list[Outcome], now: datetime) -> str:
    """The whole batch as one JSON parameter (jsonb_to_recordset), not ten arrays."""
    rows = []
    for o in outcomes:
        retry = o.retries
        kind = "retry" if retry else o.status
        rows.append(
            {
                "id": o.job_id,
                "attempt": o.attempt,
                "owner": o.owner,
                "outcome": kind,
                "result": o.result,
                "exit_code": o.exit_code,
                "error": clean_text(o.error),
                "log_tail": clean_text(o.log_tail),
                "not_before": (
                    (now + timedelta(seconds=backoff_delay(o.attempt, o.retry_backoff))).isoformat()
                    if retry
                    else None
                ),
                "reason": clean_text(o.reason) or kind,
                "claimed_at": o.claimed_at.isoformat() if o.claimed_at else None,
            }
        )
    return json.dumps(rows)


def finish(
    conn: psycopg.Connection,
    actor: str,
    outcomes: list[Outcome],
    *,
    claim_n: int = 0,
    lease: float = 300.0,
    scope: Scope = ANYWHERE,
) -> FinishReport:
    """Record a batch of attempt outcomes, and everything that follows, in one transaction.

    Follows: children of succeeded jobs count down their unfinished parents and become ready
    at zero; descendants of jobs that failed for good become upstream_failed; workflows count
    down their unfinished jobs and end when none are left.

    With ``claim_n``, the same transaction then claims up to that many ready jobs for
    ``actor`` (one commit per runner cycle instead of two). The claim never waits for a lock,
    and the workflow rows are locked last, so the hot workflow row is held only briefly; a
    claimed job's pending workflow is marked running after them (_START_WORKFLOWS).
    """
    report = FinishReport()
    if not outcomes:
        if claim_n:
            report.claimed = claim(conn, actor, claim_n, lease=lease, scope=scope)
        return report
    outcomes = sorted(outcomes, key=lambda o: o.job_id)
    succeeding = [o.job_id for o in outcomes if o.status == "succeeded"]
    failing = [o.job_id for o in outcomes if o.final_failure]
    # Pipelined: statements are sent together and run in order, so the whole cycle costs two
    # round trips; the lock statement still runs to completion before the record starts.
    with conn.pipeline(), conn.transaction():
        doomed = [r[0] for r in conn.execute(DESCENDANTS, [array(failing)])] if failing else []
        if succeeding or doomed:
            conn.execute(_LOCK_JOBS, {"succeeding": array(succeeding), "doomed": array(doomed)})
        params = {"outcomes": _outcomes_json(outcomes, datetime.now(UTC)), "actor": actor}
        record = conn.execute(_RECORD_AND_PROMOTE if succeeding else _RECORD, params)
        claiming = _claim_cursor(conn, actor, claim_n, lease, scope) if claim_n else None
        finished: Counter[int] = Counter()
        failed_workflows: set[int] = set()
        failed_for_good: list[int] = []
        # One row per workflow: the ids recorded, how many finished, which failed for good.
        for wf_id, recorded, n_finished, failed, became_ready in record.fetchall():
            report.recorded += recorded
            report.became_ready = became_ready
            if n_finished:
                finished[wf_id] += n_finished
            if failed:
                failed_for_good += failed
                failed_workflows.add(wf_id)
        if failed_for_good:
            # Descendants of outcomes that were fenced out stay as they are.
            doomed = [r[0] for r in conn.execute(DESCENDANTS, [array(failed_for_good)])]
            failing_args = {"doomed": array(doomed), "actor": actor}
            for wf_id, n in conn.execute(_FAIL_DESCENDANTS, failing_args):
                finished[wf_id] += n
        if claiming is not None:
            report.claimed = [ClaimedJob._make(row) for row in claiming.fetchall()]
        settling = None
        if finished or failed_workflows:
            settling = _settle_cursor(conn, actor, finished, failed_workflows)
        start_workflows(conn, actor, report.claimed)
        # Wake other runners only if work may be left after our own claim took its share.
        if report.became_ready and len(report.claimed) >= claim_n:
            notify(conn, READY_CHANNEL, outcomes[0].workflow_id)
    if settling is not None:
        report.finished_workflows = _ended(conn, settling)
    return report


def settle_workflows(
    conn: psycopg.Connection,
    actor: str,
    finished: Counter[int],
    failed: set[int] = frozenset(),  # type: ignore[assignment]
) -> dict[int, str]:
    """Within the caller's transaction: count finished jobs off their workflows.

    Returns the workflows that ended, with their final status, and notifies once if any did.
    """
    return _ended(conn, _settle_cursor(conn, actor, finished, failed))


def _settle_cursor(
    conn: psycopg.Connection, actor: str, finished: Counter[int], failed: set[int]
) -> psycopg.Cursor:
    workflow_ids = sorted(set(finished) | set(failed))
    # Required even for one row: _SETTLE_WORKFLOWS computes new counts in a CTE from its
    # snapshot, which is only current if the rows are locked before the statement starts.
    conn.execute(_LOCK_WORKFLOWS, [array(workflow_ids)])
    return conn.execute(
        _SETTLE_WORKFLOWS,
        {
            "ids": array(workflow_ids),
            "finished": array(finished.get(i, 0) for i in workflow_ids),
            "failed": "{" + ",".join("t" if i in failed else "f" for i in workflow_ids) + "}",
            "actor": actor,
        },
    )


def _ended(conn: psycopg.Connection, settling: psycopg.Cursor) -> dict[int, str]:
    ended = {wid: status for wid, status, is_finished in settling.fetchall() if is_finished}
    if ended:
        notify(conn, FINISHED_CHANNEL, ",".join(map(str, sorted(ended))))
    return ended


# -- leases -----------------------------------------------------------------------------

# SKIP LOCKED: never wait for a row (one being recorded right now needs no renewal), so the
# heartbeat can never deadlock with its own runner's recording transaction.
_RENEW = """
UPDATE jobs SET lease_expires_at = now() + make_interval(secs => %(lease)s)
WHERE id IN (
    SELECT id FROM jobs
    WHERE id = ANY(%(ids)s) AND status = 'running' AND lease_owner = %(owner)s
      AND lease_expires_at < now() + make_interval(secs => %(lease)s / 2)
    FOR NO KEY UPDATE SKIP LOCKED
)
"""

_CANCEL_REQUESTED = """
SELECT j.id FROM jobs j JOIN workflows w ON w.id = j.workflow_id
WHERE j.id = ANY(%(ids)s) AND j.status = 'running' AND j.lease_owner = %(owner)s
  AND (j.cancel_requested_at IS NOT NULL OR w.status = 'cancelled')
"""

_LOST_LEASES = """
SELECT j.id, j.workflow_id, j.key, j.attempts, j.max_attempts, j.lease_owner, j.started_at,
       CASE WHEN %(force)s THEN 'runner ' || j.lease_owner || ' restarted'
            WHEN j.lease_expires_at < now() THEN 'lease expired'
            WHEN r.id IS NULL THEN 'runner unknown'
            ELSE 'runner ' || r.state::text || ' (no heartbeat since '
                 || coalesce(to_char(r.last_heartbeat_at, 'YYYY-MM-DD HH24:MI:SS'), 'never')
                 || ')'
       END
FROM jobs j LEFT JOIN runners r ON r.name = j.lease_owner
WHERE j.status = 'running'
  AND (%(force)s
       OR j.lease_expires_at < now()
       OR r.id IS NULL
       OR r.state IN ('stopped', 'lost')
       OR r.last_heartbeat_at < now() - make_interval(secs => %(dead_after)s))
  AND (%(owner)s::text IS NULL OR j.lease_owner = %(owner)s)
ORDER BY j.id
LIMIT %(limit)s
FOR NO KEY UPDATE OF j SKIP LOCKED
"""

_MINE = """
SELECT id, workflow_id, key, attempts, max_attempts, lease_owner, started_at,
       'claimed but never started by this runner'
FROM jobs WHERE status = 'running' AND lease_owner = %(owner)s AND NOT (id = ANY(%(known)s))
ORDER BY id
"""


def renew_leases(conn: psycopg.Connection, owner: str, job_ids: list[int], lease: float) -> int:
    """Extend the leases of long-running jobs nearing expiry (short jobs need no write)."""
    if not job_ids:
        return 0
    cur = conn.execute(_RENEW, {"ids": job_ids, "owner": owner, "lease": lease})
    return cur.rowcount


def cancel_requested(conn: psycopg.Connection, owner: str, job_ids: list[int]) -> list[int]:
    if not job_ids:
        return []
    rows = conn.execute(_CANCEL_REQUESTED, {"ids": job_ids, "owner": owner}).fetchall()
    return [r[0] for r in rows]


def rescue(
    conn: psycopg.Connection,
    actor: str,
    *,
    dead_after: float,
    owner: str | None = None,
    force: bool = False,
    limit: int = 1000,
) -> FinishReport:
    """Take back jobs whose lease expired or whose runner stopped heartbeating.

    Each goes back to ready (the lost attempt counted; no backoff), or fails if it has no
    attempts left. Safe to run from any number of runners and managers at once.
    ``force`` takes back every running job of ``owner`` (a restarted runner of that name).
    """
    with conn.transaction():
        rows = conn.execute(
            _LOST_LEASES,
            {"dead_after": dead_after, "owner": owner, "force": force, "limit": limit},
        ).fetchall()
    return _finish_taken(conn, actor, _taken_back(rows, "failed"))


def _finish_taken(conn: psycopg.Connection, actor: str, outcomes: list[Outcome]) -> FinishReport:
    report = finish(conn, actor, outcomes)
    recorded = set(report.recorded)
    report.taken = [o for o in outcomes if o.job_id in recorded]
    return report


def _taken_back(rows: list[tuple], status: str) -> list[Outcome]:
    """Outcomes for jobs taken from their lease holder: rows of (id, workflow, key, attempts,
    max_attempts, owner, started_at, why). A failure counts the attempt and retries without
    backoff."""
    return [
        Outcome(
            job_id=job_id,
            workflow_id=workflow_id,
            attempt=attempts,
            owner=owner,
            status=status,
            max_attempts=max_attempts,
            retry_backoff=0.0,
            error=f"attempt {attempts} abandoned: {why}" if status == "failed" else None,
            reason=f"{'rescued' if status == 'failed' else 'released'}: {why}",
            key=key,
            claimed_at=claimed_at,
        )
        for job_id, workflow_id, key, attempts, max_attempts, owner, claimed_at, why in rows
    ]


def release_unknown(conn: psycopg.Connection, owner: str, known: list[int]) -> FinishReport:
    """Hand back jobs leased to ``owner`` that it is not running.

    After a lost connection a claim may have committed without the runner seeing its result;
    such jobs would otherwise stay 'running' under a live runner's name.
    """
    rows = conn.execute(_MINE, {"owner": owner, "known": known}).fetchall()
    return _finish_taken(conn, owner, _taken_back(rows, "released"))


_NEXT_DUE = """
SELECT extract(epoch FROM min(not_before) - now()) FROM jobs
WHERE status = 'ready' AND not_before IS NOT NULL AND not_before > now()
"""
_ANYTHING_LEFT = "SELECT EXISTS (SELECT 1 FROM workflows WHERE finished_at IS NULL)"


def seconds_until_next_retry(conn: psycopg.Connection) -> float | None:
    value = conn.execute(_NEXT_DUE).fetchone()[0]
    return float(value) if value is not None else None


def anything_unfinished(conn: psycopg.Connection) -> bool:
    """Is any job anywhere waiting, ready or running? (`--exit-when-idle`)"""
    return conn.execute(_ANYTHING_LEFT).fetchone()[0]
