"""The queue's hot path: claim ready jobs, record how they ended, rescue abandoned ones.

Every write of a job's end is fenced by (status = 'running', lease_owner, attempts, started_at):
a late or duplicate write — a runner that lost its lease, a retried completion after a dropped
COMMIT, a rescue racing a completion — matches no row and changes nothing. started_at is the
claiming transaction's now(), so it tells two claims apart even where the attempt number does
not: a released attempt is not counted, and the next claim reuses its number.

Where things live (migration 0009): a ready job has a row in ``ready_jobs`` (the claim orders);
a claimed job's lease is its ``claims`` row (one per claim batch and workflow, open until its
jobs are recorded); a workflow's finished jobs are summed over its ``workflow_counts`` rows (one
per recording session). No index of ``jobs`` names a column these paths change, so claiming and
recording are HOT updates, and runners recording into one workflow never queue for its row.

Lock order, which every writer follows: ready_jobs rows (the claim waits for none: SKIP
LOCKED), then jobs rows in ascending id, then workflow rows in ascending id. (A session's
workflow_counts rows are its own: nobody else ever waits for them.) A claim's own job rows are
never waited for: whoever else takes a ready job out of the queue deletes its ready_jobs row
first (cancel) or holds its row from before it was ready (promotion), so a claim never finds a
job it picked locked.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import psycopg

from smifdb.pgtext import clean_text
from smifdb.store import (
    FINISHED_CHANNEL,
    FINISHED_JOBS,
    READY_CHANNEL,
    UNDER_OPEN_CLAIMS,
    notify,
)

MAX_BACKOFF = 3600.0
MAX_RUNNER_LOSSES = 3  # attempts in a row ending with their runner lost before a job fails


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
    claim_id: int | None = None  # its claims row: the lease, closed once all its jobs are recorded


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
    claim_id: int | None = None  # the claims row it belongs to (runner bookkeeping only)
    # A success's files, already in the blob store: [{path, sha256, size, mode}]. Written with
    # the record, so only the attempt the fence lets through leaves outputs.
    outputs: list[dict[str, Any]] | None = None

    @property
    def retries(self) -> bool:
        return self.status == "failed" and self.attempt < self.max_attempts

    @property
    def final_failure(self) -> bool:
        return self.status == "failed" and self.attempt >= self.max_attempts

    def without_data(self, why: str) -> Outcome:
        """This outcome without the result and log PostgreSQL refused: a success fails."""
        status = "failed" if self.status == "succeeded" else self.status
        return replace(
            self, status=status, result=None, log_tail=None, error=why, reason=why, outputs=None
        )


@dataclass
class FinishReport:
    recorded: list[int] = field(default_factory=list)  # job ids whose outcome was written
    became_ready: int = 0
    claimed: list[ClaimedJob] = field(default_factory=list)
    finished_workflows: dict[int, str] = field(default_factory=dict)  # id -> final status
    taken: list[Outcome] = field(default_factory=list)  # rescue/release: the outcomes written
    # Workflows whose finished count this transaction raised but which it did not see complete:
    # another session may have finished their last jobs meanwhile, unseen. A check after the
    # commit (settle, or the next finish's recheck) sees both.
    unsettled: set[int] = field(default_factory=set)


def backoff_delay(attempt: int, base: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter in [0.5, 1.5) of the nominal delay."""
    nominal = min(base * 2 ** max(attempt - 1, 0), MAX_BACKOFF)
    return nominal * (0.5 + (rng or random).random())


# -- claim ------------------------------------------------------------------------------

# Ready jobs in claim order (priority, then age) through a ready_jobs index, locked as they are
# read: SKIP LOCKED passes over rows another claim holds, and LIMIT stops the scan at n. FOR
# UPDATE, not NO KEY UPDATE: the rows are deleted, and no foreign key points at them.
_PICK = """
    SELECT ctid, job_id, priority FROM ready_jobs
    WHERE (not_before IS NULL OR not_before <= now())
      {scope}
    ORDER BY priority DESC, job_id
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
"""
# The picked rows leave the queue (by ctid: no index is read or written) and their jobs become
# running (a HOT update: no index names what changes). A picked row whose job is no longer ready
# (none should be) is deleted and not claimed. One claims row per workflow holds the lease.
# No events row: the event that ends the attempt records the claim (claimed_at, claimed_by).
_CLAIM = """
WITH picked AS MATERIALIZED ({picked}
), dequeued AS (
    DELETE FROM ready_jobs r WHERE r.ctid = ANY(ARRAY(SELECT ctid FROM picked))
    RETURNING r.job_id
), claimed AS (
    UPDATE jobs j
    SET status = 'running', attempts = j.attempts + 1, lease_owner = %(owner)s,
        started_at = now(), not_before = NULL
    FROM dequeued d
    WHERE j.id = d.job_id AND j.status = 'ready'
    RETURNING j.id, j.workflow_id, j.key, j.kind::text AS kind, j.payload, j.attempts,
              j.max_attempts, j.timeout_seconds, j.retry_backoff_seconds, j.priority,
              j.started_at
), leased AS (
    INSERT INTO claims (workflow_id, owner, claimed_at, expires_at, job_ids)
    SELECT workflow_id, %(owner)s, now(), now() + make_interval(secs => %(lease)s),
           array_agg(id ORDER BY id)
    FROM claimed GROUP BY workflow_id
    RETURNING id, workflow_id
), pending AS (
    SELECT id FROM workflows
    WHERE id IN (SELECT workflow_id FROM claimed) AND status = 'pending'
)
SELECT c.id, c.workflow_id, c.key, c.kind, c.payload::text, c.attempts, c.max_attempts,
       c.timeout_seconds, c.retry_backoff_seconds, c.priority, c.started_at,
       c.workflow_id IN (SELECT id FROM pending), l.id
FROM claimed c JOIN leased l ON l.workflow_id = c.workflow_id
ORDER BY c.priority DESC, c.id
"""
# A workflow's first claim marks it running: a statement of its own, run after any workflow
# rows the transaction must wait for are locked (finish settles them first). Locking them in
# the claim would hold rows another runner's settle waits for while this transaction waits
# for that runner's: a deadlock. It never waits itself: whoever holds a pending workflow's row
# is recording outcomes of its jobs and settling it, or cancelling it.
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
# A model run's unfinished bundles, each read in claim order through ready_jobs_workflow_idx,
# merged, and the first n kept. (Rows locked past the n are released at commit.) One scan of
# the whole ready set, filtered by workflow, would read every other model run's jobs first.
CLAIM_MODEL_RUN = _CLAIM.format(
    picked="""
    SELECT c.ctid, c.job_id FROM workflows w
    CROSS JOIN LATERAL ({pick}) c
    WHERE w.model_run_id = %(model_run_id)s AND w.finished_at IS NULL
    ORDER BY c.priority DESC, c.job_id
    LIMIT %(n)s""".format(pick=_PICK.format(scope="AND workflow_id = w.id"))
)


# A queue's ready set changes faster than ANALYZE runs, so the planner's estimate of ready jobs
# is nearly always stale. Under-estimated (a big DAG just submitted, a wide fan-out just
# released), it picks a bitmap scan of every ready job plus a sort: 3-5x the cost of the claim
# at 40,000 ready jobs. Without bitmap scans it keeps the ordered index scan, which stops after
# n rows. Local to the claiming transaction, whose other statements are all index lookups of
# known ids.
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
        claimed = _claimed(_claim_cursor(conn, owner, n, lease, scope).fetchall())
        start_workflows(conn, owner, claimed)
    return claimed


_SCAN = json.JSONDecoder().scan_once  # the C scanner behind json.loads, without its wrappers


def _json(text: str) -> Any:
    """jsonb as PostgreSQL writes it (no surrounding space), parsed at C speed: a fifth of
    json.loads on bytes for a small payload, which a claim of 256 jobs parses 256 times."""
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        end = -1
    return value if end == len(text) else json.loads(text)


def _claimed(rows: list[tuple]) -> list[ClaimedJob]:
    """Rows of the claim statement (the payload as text) as claimed jobs."""
    return [ClaimedJob(r[0], r[1], r[2], r[3], _json(r[4]), *r[5:]) for r in rows]


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

# Claims whose jobs are all recorded (or were taken from their holder): closed, so that rescue
# and renewal no longer read them. SKIP LOCKED: one a rescuer holds is closed by the sweep.
_CLOSE_CLAIMS = """
UPDATE claims SET closed_at = now()
WHERE id IN (SELECT id FROM claims WHERE id = ANY(%s::bigint[]) AND closed_at IS NULL
             FOR NO KEY UPDATE SKIP LOCKED)
"""

_RECORD_TEMPLATE = """
WITH o AS MATERIALIZED (
    SELECT u.id, u.attempt, g.owner, g.outcome, g.result, g.exit_code, g.error, g.log_tail,
           g.not_before, g.reason, g.claimed_at, g.outputs
    FROM jsonb_to_recordset(%(outcomes)s::jsonb) AS g(
        ids bigint[], attempts int[], owner text, outcome text, result jsonb, exit_code int,
        error text, log_tail text, not_before timestamptz, reason text, claimed_at timestamptz,
        outputs jsonb)
    CROSS JOIN LATERAL unnest(g.ids, g.attempts) AS u(id, attempt)
), updated AS (
    UPDATE jobs j SET
        status = (CASE
            WHEN o.outcome NOT IN ('retry', 'released') THEN o.outcome
            WHEN {cancelled} THEN 'cancelled'
            ELSE 'ready'
        END)::job_status,
        attempts = j.attempts - (o.outcome = 'released')::int,
        not_before = o.not_before,
        finished_at = CASE
            WHEN o.outcome NOT IN ('retry', 'released') THEN now()
            WHEN {cancelled} THEN now()
        END,
        result = o.result,
        exit_code = o.exit_code,
        error = o.error,
        log_tail = o.log_tail
    FROM o
    -- The ids again, as a constant array: the jobs are then found through jobs_pkey whatever
    -- the planner guesses of the unnested JSON (it guessed a hash join over a seq scan).
    WHERE j.id = ANY(%(ids)s::bigint[]) AND j.id = o.id AND j.status = 'running'
      AND j.lease_owner = o.owner
      AND j.attempts = o.attempt AND (o.claimed_at IS NULL OR j.started_at = o.claimed_at)
    RETURNING j.id, j.workflow_id, j.status::text AS status, j.priority, j.not_before, o.outcome,
              o.attempt, o.reason, o.owner, j.started_at
), logged AS (
    INSERT INTO events (workflow_id, job_id, from_status, to_status, attempt, actor, reason,
                        claimed_at, claimed_by)
    SELECT workflow_id, id, 'running', status, attempt, %(actor)s, reason, started_at, owner
    FROM updated
), requeued AS (
    INSERT INTO ready_jobs (job_id, workflow_id, priority, not_before)
    SELECT id, workflow_id, priority, not_before FROM updated WHERE status = 'ready'
)
{outputs}{promote}SELECT workflow_id,
       array_agg(id) AS recorded,
       count(*) FILTER (WHERE status IN ('succeeded', 'failed', 'cancelled'))::int AS finished,
       array_agg(id) FILTER (WHERE status = 'failed') AS failed,
       {became_ready} AS became_ready
FROM updated GROUP BY workflow_id
"""
# Children of the jobs that succeeded count down; at zero they become ready and join the queue.
# The children were locked by _LOCK_JOBS, and are never the rows `updated` touches.
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
    RETURNING j.id, j.workflow_id, j.priority, j.status::text AS status, j.unfinished_parents
), promoted_queued AS (
    INSERT INTO ready_jobs (job_id, workflow_id, priority)
    SELECT id, workflow_id, priority FROM promoted
    WHERE status = 'ready' AND unfinished_parents = 0
), promoted_logged AS (
    INSERT INTO events (workflow_id, job_id, from_status, to_status, actor, reason)
    SELECT workflow_id, id, 'waiting', 'ready', %(actor)s, 'all parents succeeded'
    FROM promoted WHERE status = 'ready' AND unfinished_parents = 0
)
"""
# A job that would go back to the queue is cancelled instead if it, or its workflow, was.
_CANCELLED = """(j.cancel_requested_at IS NOT NULL OR EXISTS (
                SELECT 1 FROM workflows w WHERE w.id = j.workflow_id AND w.status = 'cancelled'))"""
# The files of the attempts recorded as succeeded (the blobs are stored already): a fenced-out
# attempt's outputs are never written, and a success is not recorded without its outputs.
_OUTPUTS = """, outputs_stored AS (
    INSERT INTO job_outputs (job_id, attempt, path, sha256, size, mode)
    SELECT u.id, u.attempt, f.path, decode(f.sha256, 'hex'), f.size, f.mode
    FROM updated u JOIN o ON o.id = u.id
    CROSS JOIN LATERAL jsonb_to_recordset(o.outputs) AS f(path text, sha256 text, size bigint,
                                                          mode int)
    WHERE u.status = 'succeeded' AND o.outputs IS NOT NULL
)
"""


@functools.cache
def _record(promote: bool, outputs: bool) -> str:
    became_ready = (
        "(SELECT count(*) FROM promoted WHERE status = 'ready' AND unfinished_parents = 0)"
    )
    return _RECORD_TEMPLATE.format(
        outputs=_OUTPUTS if outputs else "",
        promote=_PROMOTE if promote else "",
        cancelled=_CANCELLED,
        became_ready=became_ready if promote else "0",
    )


# Descendants of a job that failed for good wait for it, so none is ready and none has a
# ready_jobs row (were one stale, the claim that reads it finds its job not ready and drops it).
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

# Finished jobs are counted in this session's own row of each workflow (shard: the backend's
# pid, unique among live sessions): no other session ever waits for it. The same statement
# answers which of the workflows (counted now, or named to check again) are complete, as far as
# it sees: its own new counts (RETURNING) plus every other row as of its snapshot.
_COUNT_AND_CHECK = """
WITH counted AS (
    INSERT INTO workflow_counts AS n (workflow_id, shard, finished)
    SELECT id, pg_backend_pid(), k
    FROM unnest(%(ids)s::bigint[], %(finished)s::int[]) AS d(id, k)
    ON CONFLICT (workflow_id, shard) DO UPDATE SET finished = n.finished + EXCLUDED.finished
    RETURNING workflow_id, finished
)
SELECT w.id FROM workflows w LEFT JOIN counted c ON c.workflow_id = w.id
WHERE w.id = ANY(%(check)s::bigint[]) AND w.finished_at IS NULL
  AND w.job_count <= coalesce(c.finished, 0) + (
      SELECT coalesce(sum(n.finished), 0) FROM workflow_counts n
      WHERE n.workflow_id = w.id AND (c.workflow_id IS NULL OR n.shard <> pg_backend_pid()))
ORDER BY w.id
"""
_LOCK_WORKFLOWS = (
    "SELECT id FROM workflows WHERE id = ANY(%s::bigint[]) ORDER BY id FOR NO KEY UPDATE"
)
# A final failure fails its workflow at once (other branches may still finish).
_FAIL_WORKFLOWS = """
WITH updated AS (
    UPDATE workflows w SET status = 'failed', started_at = coalesce(w.started_at, now())
    FROM (SELECT id, status::text AS old FROM workflows WHERE id = ANY(%(ids)s::bigint[])) o
    WHERE w.id = o.id AND w.status IN ('pending', 'running')
    RETURNING w.id, o.old
)
INSERT INTO events (workflow_id, from_status, to_status, actor, reason)
SELECT id, old, 'failed', %(actor)s, 'job outcomes recorded' FROM updated
"""
# Every job of workflow `w` finished, as far as the statement sees.
_ALL_COUNTED = f"w.job_count <= {FINISHED_JOBS}"
# Which unfinished workflows have every job finished: those named (by primary key), or any
# (through workflows_unfinished_idx: the sweep after a session died between its commit and its
# check). Two statements, so that each keeps its index in a prepared, generic plan.
_COMPLETE = """
SELECT w.id FROM workflows w
WHERE {named} w.finished_at IS NULL AND {all_counted}
ORDER BY w.id
"""
_COMPLETE_NAMED = _COMPLETE.format(named="w.id = ANY(%s::bigint[]) AND", all_counted=_ALL_COUNTED)
_COMPLETE_ANYWHERE = _COMPLETE.format(named="", all_counted=_ALL_COUNTED)
# The end of a complete workflow, its row locked first: failed if any job failed, cancelled if
# any was cancelled, else succeeded (a failed or cancelled workflow keeps its status).
_FINALIZE = f"""
WITH updated AS (
    UPDATE workflows w SET
        finished_at = now(),
        started_at = coalesce(w.started_at, now()),
        status = CASE
            WHEN w.status NOT IN ('pending', 'running') THEN w.status
            WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.workflow_id = w.id
                         AND j.status IN ('failed', 'upstream_failed')) THEN 'failed'
            WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.workflow_id = w.id
                         AND j.status = 'cancelled') THEN 'cancelled'
            ELSE 'succeeded'
        END::workflow_status
    FROM (SELECT id, status::text AS old FROM workflows WHERE id = ANY(%(ids)s::bigint[])) o
    WHERE w.id = o.id AND w.finished_at IS NULL AND {_ALL_COUNTED}
    RETURNING w.id, o.old, w.status::text AS status
), logged AS (
    INSERT INTO events (workflow_id, from_status, to_status, actor, reason)
    SELECT id, old, status, %(actor)s, 'job outcomes recorded' FROM updated WHERE old <> status
)
SELECT id, status FROM updated
"""


def array(values: Iterable[int]) -> str:
    """An array literal for ``%s::bigint[]``: far cheaper to send than a dumped Python list."""
    return "{" + ",".join(map(str, values)) + "}"


def _outcomes_json(outcomes: list[Outcome], now: datetime) -> str:
    """The whole batch as one JSON parameter (jsonb_to_recordset), not ten arrays.

    Outcomes that differ only in job and attempt travel as one group with lists of both (the
    plain successes of one claim: same owner, claim time and reason, nothing else to store);
    the rest as groups of one. Keys whose value would be null are left out (the record reads
    them as null). A batch of 256 plain successes is one small object, not 256 to write and
    for PostgreSQL to parse.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    stamps: dict[datetime, str] = {}
    for o in outcomes:
        retry = o.retries
        kind = "retry" if retry else o.status
        reason = clean_text(o.reason) or kind
        plain = (
            not retry
            and o.result is None
            and o.exit_code is None
            and o.error is None
            and o.log_tail is None
            and not o.outputs
        )
        if plain and (group := groups.get((o.owner, kind, reason, o.claimed_at))):
            group["ids"].append(o.job_id)
            group["attempts"].append(o.attempt)
            continue
        row: dict[str, Any] = {
            "ids": [o.job_id],
            "attempts": [o.attempt],
            "owner": o.owner,
            "outcome": kind,
            "reason": reason,
        }
        if o.claimed_at is not None:
            if (stamp := stamps.get(o.claimed_at)) is None:
                stamp = stamps[o.claimed_at] = o.claimed_at.isoformat()
            row["claimed_at"] = stamp
        if plain:
            groups[(o.owner, kind, reason, o.claimed_at)] = row
        else:
            if o.result is not None:
                row["result"] = o.result
            if o.exit_code is not None:
                row["exit_code"] = o.exit_code
            if o.error is not None:
                row["error"] = clean_text(o.error)
            if o.log_tail is not None:
                row["log_tail"] = clean_text(o.log_tail)
            if o.outputs:
                row["outputs"] = o.outputs
            if retry:
                delay = timedelta(seconds=backoff_delay(o.attempt, o.retry_backoff))
                row["not_before"] = (now + delay).isoformat()
        rows.append(row)
    return json.dumps(rows)


def finish(
    conn: psycopg.Connection,
    actor: str,
    outcomes: list[Outcome],
    *,
    claim_n: int = 0,
    lease: float = 300.0,
    scope: Scope = ANYWHERE,
    close: Iterable[int] = (),
    recheck: Iterable[int] = (),
    defer_settle: bool = False,
) -> FinishReport:
    """Record a batch of attempt outcomes, and everything that follows, in one transaction.

    Follows: children of succeeded jobs count down their unfinished parents and become ready
    at zero; descendants of jobs that failed for good become upstream_failed; workflows count
    their finished jobs and end when all are.

    With ``claim_n``, the same transaction then claims up to that many ready jobs for
    ``actor`` (one commit per runner cycle instead of two). ``close`` names claims whose jobs
    the caller has all seen recorded.

    Workflows this transaction counted but did not see complete are checked again after the
    commit (``settle``: a short transaction of its own), unless ``defer_settle``: then they are
    left in FinishReport.unsettled for the caller to pass as the next call's ``recheck`` (a
    runner's next cycle checks them at no extra round trip) or to ``settle``.
    """
    report = FinishReport()
    close, recheck = sorted(close), set(recheck)
    if not outcomes and not close and not recheck:
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
        record = None
        if outcomes:
            params = {
                "outcomes": _outcomes_json(outcomes, datetime.now(UTC)),
                "ids": array(o.job_id for o in outcomes),
                "actor": actor,
            }
            with_outputs = any(o.outputs for o in outcomes)
            record = conn.execute(_record(bool(succeeding), with_outputs), params)
        if close:
            conn.execute(_CLOSE_CLAIMS, [array(close)])
        claiming = _claim_cursor(conn, actor, claim_n, lease, scope) if claim_n else None
        finished: Counter[int] = Counter()
        failed_workflows: set[int] = set()
        failed_for_good: list[int] = []
        # One row per workflow: the ids recorded, how many finished, which failed for good.
        for wf_id, recorded, n_finished, failed, became_ready in record or []:
            report.recorded += recorded
            report.became_ready = became_ready  # the same total on every row
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
            report.claimed = _claimed(claiming.fetchall())
        ended, report.unsettled = _settle(conn, actor, finished, failed_workflows, recheck)
        start_workflows(conn, actor, report.claimed)
        # Wake other runners only if work may be left after our own claim took its share.
        if report.became_ready and len(report.claimed) >= claim_n:
            notify(conn, READY_CHANNEL, outcomes[0].workflow_id)
    report.finished_workflows = ended
    if report.unsettled and not defer_settle:
        report.finished_workflows |= settle(conn, actor, report.unsettled)
        report.unsettled = set()
    return report


def _settle(
    conn: psycopg.Connection,
    actor: str,
    finished: Counter[int],
    failed: set[int],
    recheck: set[int] = frozenset(),  # type: ignore[assignment]
) -> tuple[dict[int, str], set[int]]:
    """Within the caller's transaction, last (workflow rows are locked after all else): count
    finished jobs, fail workflows with a final failure, and end those now seen complete.

    Returns the workflows that ended (id -> status; one NOTIFY if any) and those whose count
    grew but that are not seen complete: the caller checks them again after the commit.
    """
    if failed:
        conn.execute(_LOCK_WORKFLOWS, [array(sorted(failed))])
        conn.execute(_FAIL_WORKFLOWS, {"ids": array(sorted(failed)), "actor": actor})
    touched = set(finished) | recheck
    if not touched:
        return {}, set()
    ids = sorted(finished)
    params = {
        "ids": array(ids),
        "finished": array(finished[i] for i in ids),
        "check": array(sorted(touched)),
    }
    complete = [r[0] for r in conn.execute(_COUNT_AND_CHECK, params).fetchall()]
    ended = _finalize(conn, actor, complete) if complete else {}
    return ended, set(finished) - set(complete)


def _finalize(conn: psycopg.Connection, actor: str, workflow_ids: list[int]) -> dict[int, str]:
    ids = array(sorted(workflow_ids))
    conn.execute(_LOCK_WORKFLOWS, [ids])
    ended = dict(conn.execute(_FINALIZE, {"ids": ids, "actor": actor}).fetchall())
    if ended:
        notify(conn, FINISHED_CHANNEL, ",".join(map(str, sorted(ended))))
    return ended


def settle_workflows(
    conn: psycopg.Connection,
    actor: str,
    finished: Counter[int],
    failed: set[int] = frozenset(),  # type: ignore[assignment]
) -> tuple[dict[int, str], set[int]]:
    """Within the caller's transaction: count finished jobs off their workflows (see _settle).

    The caller passes the second value to ``settle`` once its transaction has committed.
    """
    return _settle(conn, actor, finished, failed)


def settle(conn: psycopg.Connection, actor: str, workflow_ids: Iterable[int]) -> dict[int, str]:
    """After a commit that counted finished jobs: end those workflows now complete.

    Two sessions finishing a workflow's last jobs at once may each not see the other's count;
    whichever checks after both commits sees it complete. Its own short transaction.
    """
    ids = sorted(set(workflow_ids))
    return _end_complete(conn, actor, _COMPLETE_NAMED, [array(ids)]) if ids else {}


def settle_stragglers(conn: psycopg.Connection, actor: str) -> dict[int, str]:
    """End every complete workflow left unfinished by a session that died before its check."""
    return _end_complete(conn, actor, _COMPLETE_ANYWHERE, None)


def _end_complete(
    conn: psycopg.Connection, actor: str, query: str, params: list | None
) -> dict[int, str]:
    """End the complete workflows ``query`` finds, in a transaction of its own."""
    with conn.transaction():
        complete = [r[0] for r in conn.execute(query, params).fetchall()]
        return _finalize(conn, actor, complete) if complete else {}


# -- leases -----------------------------------------------------------------------------

# A claim's lease is renewed, for the claims holding an attempt its runner is still running,
# once half of it has passed (short jobs' claims never are). SKIP LOCKED: never wait for a row
# (one being closed or rescued right now needs no renewal).
_RENEW = """
UPDATE claims SET expires_at = now() + make_interval(secs => %(lease)s)
WHERE id IN (
    SELECT id FROM claims
    WHERE owner = %(owner)s AND closed_at IS NULL AND job_ids && %(ids)s::bigint[]
      AND expires_at < now() + make_interval(secs => %(lease)s / 2)
    FOR NO KEY UPDATE SKIP LOCKED
)
"""

_CANCEL_REQUESTED = """
SELECT j.id FROM jobs j JOIN workflows w ON w.id = j.workflow_id
WHERE j.id = ANY(%(ids)s) AND j.status = 'running' AND j.lease_owner = %(owner)s
  AND (j.cancel_requested_at IS NOT NULL OR w.status = 'cancelled')
"""

# The last column: the error of the job's previous attempt (a running job keeps it until its
# attempt ends), which tells how many attempts in a row before this one lost their runner.
_LOST_LEASES = f"""
SELECT j.id, j.workflow_id, j.key, j.attempts, j.max_attempts, c.owner, c.claimed_at,
       CASE WHEN %(force)s THEN 'runner ' || c.owner || ' restarted'
            WHEN c.expires_at < now() THEN 'lease expired'
            WHEN r.id IS NULL THEN 'runner unknown'
            ELSE 'runner ' || r.state::text || ' (no heartbeat since '
                 || coalesce(to_char(r.last_heartbeat_at, 'YYYY-MM-DD HH24:MI:SS'), 'never')
                 || ')'
       END,
       j.error
{UNDER_OPEN_CLAIMS}
LEFT JOIN runners r ON r.name = c.owner
WHERE c.closed_at IS NULL
  AND (%(force)s
       OR c.expires_at < now()
       OR r.id IS NULL
       OR r.state IN ('stopped', 'lost')
       OR r.last_heartbeat_at < now() - make_interval(secs => %(dead_after)s))
  AND (%(owner)s::text IS NULL OR c.owner = %(owner)s)
ORDER BY j.id
LIMIT %(limit)s
FOR NO KEY UPDATE OF j SKIP LOCKED
"""

_MINE = f"""
SELECT j.id, j.workflow_id, j.key, j.attempts, j.max_attempts, c.owner, c.claimed_at,
       'claimed but never started by this runner'
{UNDER_OPEN_CLAIMS}
WHERE c.closed_at IS NULL AND c.owner = %(owner)s AND NOT (j.id = ANY(%(known)s))
ORDER BY j.id
"""

# Open claims with no job running under them: recorded by a runner that died before closing
# them, or rescued. One statement; a claim someone holds is left for the next sweep.
_CLOSE_EMPTY_CLAIMS = """
UPDATE claims SET closed_at = now()
WHERE id IN (
    SELECT c.id FROM claims c
    WHERE c.closed_at IS NULL AND NOT EXISTS (
        SELECT 1 FROM unnest(c.job_ids) AS u(job_id) JOIN jobs j ON j.id = u.job_id
        WHERE j.status = 'running' AND j.lease_owner = c.owner AND j.started_at = c.claimed_at)
    FOR NO KEY UPDATE SKIP LOCKED
)
"""


def renew_leases(conn: psycopg.Connection, owner: str, job_ids: list[int], lease: float) -> int:
    """Extend the leases of claims holding long-running jobs (short jobs' claims need no write)."""
    if not job_ids:
        return 0
    cur = conn.execute(_RENEW, {"ids": array(job_ids), "owner": owner, "lease": lease})
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
    max_losses: int = MAX_RUNNER_LOSSES,
) -> FinishReport:
    """Take back jobs whose lease expired or whose runner stopped heartbeating.

    Each goes back to ready (the lost attempt counted; no backoff), or fails if it has no
    attempts left, or if this is the ``max_losses``-th attempt in a row to end with its runner
    lost: a job that kills whichever runner runs it (a poison pill) would otherwise take down
    every runner in turn. Safe to run from any number of runners and managers at once.
    ``force`` takes back every running job of ``owner`` (a restarted runner of that name).
    Then sweeps: closes claims with nothing left running under them, and ends workflows a
    dead session finished but did not check.
    """
    params = {"dead_after": dead_after, "owner": owner, "force": force, "limit": limit}
    with conn.transaction():
        rows = conn.execute(_LOST_LEASES, params).fetchall()
    outcomes = _taken_back([row[:-1] for row in rows], "failed")
    for outcome, row in zip(outcomes, rows, strict=True):
        _count_runner_losses(outcome, row[-1], max_losses)
    report = _finish_taken(conn, actor, outcomes)
    conn.execute(_CLOSE_EMPTY_CLAIMS)
    report.finished_workflows |= settle_stragglers(conn, actor)
    return report


def _finish_taken(conn: psycopg.Connection, actor: str, outcomes: list[Outcome]) -> FinishReport:
    report = finish(conn, actor, outcomes)
    recorded = set(report.recorded)
    report.taken = [o for o in outcomes if o.job_id in recorded]
    return report


# A rescued attempt's error, and how many attempts in a row it makes that lost their runner
# (no count: one). Only the rescue writes errors that start so: a job's own errors are an exit
# status, a signal, an exception's type, or the runner's words for what it refused.
_LOST_RUNNERS = re.compile(
    r"attempt \d+ abandoned: .*?(?: \(runner lost (\d+) times in a row\))?\Z"
)


def _count_runner_losses(outcome: Outcome, previous_error: str | None, max_losses: int) -> None:
    """Note in a rescued attempt's error how many attempts in a row lost their runner, and fail
    the job for good at ``max_losses`` of them (the previous attempt's error tells the count)."""
    before = _LOST_RUNNERS.match(previous_error or "")
    losses = 1 + (int(before.group(1) or 1) if before else 0)
    if losses >= max_losses and not outcome.final_failure:
        outcome.max_attempts = outcome.attempt
        outcome.error = (
            f"{outcome.error}; its runner was lost {losses} times in a row running it, so it is "
            f"failed rather than handed to another runner (--max-runner-losses {max_losses})"
        )
        outcome.reason = f"failed: runner lost {losses} times in a row"
    elif losses > 1:
        outcome.error = f"{outcome.error} (runner lost {losses} times in a row)"


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
SELECT extract(epoch FROM min(not_before) - now()) FROM ready_jobs
WHERE not_before IS NOT NULL AND not_before > now()
"""
_ANYTHING_LEFT = "SELECT EXISTS (SELECT 1 FROM workflows WHERE finished_at IS NULL)"


def seconds_until_next_retry(conn: psycopg.Connection) -> float | None:
    value = conn.execute(_NEXT_DUE).fetchone()[0]
    return float(value) if value is not None else None


def anything_unfinished(conn: psycopg.Connection) -> bool:
    """Is any job anywhere waiting, ready or running? (`--exit-when-idle`)"""
    return conn.execute(_ANYTHING_LEFT).fetchone()[0]
