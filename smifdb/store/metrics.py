"""Reads for Prometheus metrics (/metrics): one consistent snapshot, cheap on big tables.

Nothing here reads ``events`` whole, and ``jobs`` only when most of its rows (or pages) belong
to workflows that did not succeed. Costs grow with what is live, recent or failed, not with
history that succeeded (docs/performance.md has the figures):

- job counts come from the workflow counters where they can: every job of a succeeded
  workflow succeeded (settle_workflows says 'succeeded' only then), so only jobs of workflows
  that did not succeed are counted row by row;
- rates and durations come from the newest events only (a backward scan of the primary key,
  at most ``TAIL`` rows), so they describe a recent window, not all time; claims from the
  newest claims rows (one per claim batch, at most ``TAIL``) in the same window;
- the oldest ready job's age costs one events probe per ready job;
- claim and completion counters are the runners' own totals (runners.jobs_claimed,
  jobs_succeeded, jobs_failed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from smifdb.states import JOB_STATUSES, WORKFLOW_STATUSES
from smifdb.store.runners import status as runner_status

WINDOW = 300.0  # seconds of events behind the rates and the duration histogram
TAIL = 20_000  # most events read for them; past this the window shrinks (busy queues)
# Upper bounds (seconds) of the duration histogram's buckets: sub-second no-ops to day-long runs.
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 21600, 86400)
RECENT_RUNNER = 3600.0  # per-runner series for stopped and lost runners seen this recently

# Consistent counts across statements, and a scrape that can never hold up writers for long.
BEGIN = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
STATEMENT_TIMEOUT = "SET LOCAL statement_timeout = '5s'"

WORKFLOWS = """
SELECT status::text, count(*)::bigint, coalesce(sum(job_count), 0)::bigint
FROM workflows GROUP BY 1
"""
# Jobs of workflows that did not succeed, by status: the live ones and the failed and cancelled
# history. A plain join lets the planner choose: an index lookup per workflow while they are
# few, one scan of `jobs` when they are not (a lookup per job scattered over the heap costs
# more than the scan). Grouping by the enum, not its text, is a third faster.
JOBS_NOT_IN_SUCCEEDED = """
SELECT j.status::text, count(*)::bigint
FROM workflows w JOIN jobs j ON j.workflow_id = w.id
WHERE w.status <> 'succeeded'
GROUP BY j.status
"""
# The queue-health view owns the definition: a due ready job is ready since its latest move to
# ready, or since its retry backoff ran out. One index probe per ready job.
OLDEST_READY = "SELECT oldest_ready_seconds FROM smifdb_queue_health"
# Events of the last WINDOW seconds, read newest first along the primary key (ids follow
# time: `at` is the inserting statement's clock). The scan stops at the first event older
# than the window, and reads at most TAIL events: past that the rates cover the span those
# TAIL events do (`covered`), however busy the queue. Final attempts that ended in the window
# are bucketed by duration: width_bucket over the negated bounds (ascending) counts a
# duration equal to a bound into that bound's bucket, as Prometheus's `le` does.
RECENT_EVENTS = """
WITH newest AS MATERIALIZED (
    SELECT id, at FROM events ORDER BY id DESC LIMIT %(tail)s
), edge AS MATERIALIZED (
    SELECT (SELECT id FROM newest WHERE at <= now() - make_interval(secs => %(window)s)
            LIMIT 1) AS id
), bounds AS MATERIALIZED (
    SELECT coalesce(e.id, (SELECT min(id) - 1 FROM newest)) AS after,
           CASE WHEN e.id IS NOT NULL OR (SELECT count(*) FROM newest) < %(tail)s
                THEN %(window)s
                ELSE greatest(extract(epoch FROM now() - (SELECT min(at) FROM newest)), 0.001)
           END::float AS covered
    FROM edge e
), recent AS MATERIALIZED (
    SELECT job_id, from_status, to_status FROM events
    WHERE id > (SELECT after FROM bounds) AND job_id IS NOT NULL
      AND at > now() - make_interval(secs => %(window)s)
    ORDER BY id DESC LIMIT %(tail)s
), durations AS (
    SELECT j.status::text AS status,
           greatest(extract(epoch FROM j.finished_at - j.started_at)::float, 0) AS seconds
    FROM recent r JOIN jobs j ON j.id = r.job_id
    WHERE r.from_status = 'running' AND r.to_status IN ('succeeded', 'failed')
      AND j.status::text = r.to_status AND j.started_at IS NOT NULL
)
SELECT
    (SELECT covered FROM bounds),
    (SELECT coalesce(sum(cardinality(c.job_ids)), 0)::bigint FROM (
        SELECT job_ids, claimed_at FROM claims ORDER BY id DESC LIMIT %(tail)s) c
     WHERE c.claimed_at > now() - make_interval(secs => (SELECT covered FROM bounds))),
    (SELECT coalesce(jsonb_object_agg(to_status, n), '{}') FROM (
        SELECT to_status, count(*) AS n FROM recent
        WHERE from_status = 'running' AND to_status <> 'running' GROUP BY 1) o),
    (SELECT coalesce(jsonb_agg(jsonb_build_array(status, bucket, n, seconds)), '[]') FROM (
        SELECT status, %(n)s - width_bucket(-seconds, %(negated)s::float8[]) AS bucket,
               count(*) AS n, sum(seconds) AS seconds
        FROM durations GROUP BY 1, 2) h)
"""


@dataclass
class Runner:
    name: str
    state: str
    slots: int
    busy: int
    heartbeat_age: float | None
    jobs_succeeded: int
    jobs_failed: int
    jobs_claimed: int
    recent: bool


@dataclass
class Durations:
    """A histogram of one status: counts per bucket (index i: at most DURATION_BUCKETS[i]
    seconds and more than the bound before it; the last index is over every bound)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0


@dataclass
class Snapshot:
    jobs: dict[str, int]
    workflows: dict[str, int]
    oldest_ready_age: float | None  # None: nothing ready and due
    runners: list[Runner]
    window: float  # seconds the rates and durations cover
    claims: int  # in the window
    attempts_ended: dict[str, int]  # in the window, by the job's status after the attempt
    durations: dict[str, Durations]  # 'succeeded' and 'failed'


def snapshot(
    conn: psycopg.Connection,
    *,
    dead_after: float,
    window: float = WINDOW,
    tail: int = TAIL,
) -> Snapshot:
    """Everything /metrics reports, read in one read-only repeatable-read transaction."""
    with conn.transaction():
        conn.execute(BEGIN)
        conn.execute(STATEMENT_TIMEOUT)
        workflows = {s: 0 for s in WORKFLOW_STATUSES}
        jobs = {s: 0 for s in JOB_STATUSES}
        for status, n, job_count in conn.execute(WORKFLOWS):
            workflows[status] = n
            if status == "succeeded":
                jobs["succeeded"] += job_count
        for status, n in conn.execute(JOBS_NOT_IN_SUCCEEDED):
            jobs[status] += n
        oldest = conn.execute(OLDEST_READY).fetchone()[0]
        # The states `smifdb runner status` reports (silent for dead_after: lost).
        runners = [
            Runner(
                r["name"],
                r["state"],
                r["slots"],
                r["busy"],
                r["heartbeat_age"],
                r["jobs_succeeded"],
                r["jobs_failed"],
                r["jobs_claimed"],
                r["state"] not in ("stopped", "lost")
                or (r["heartbeat_age"] is not None and r["heartbeat_age"] < RECENT_RUNNER),
            )
            for r in runner_status(conn, dead_after)
        ]
        negated = [-float(b) for b in reversed(DURATION_BUCKETS)]
        params = {"tail": tail, "window": window, "negated": negated, "n": len(negated)}
        covered, claims, ended, histogram = conn.execute(RECENT_EVENTS, params).fetchone()
    durations = {"succeeded": Durations(), "failed": Durations()}
    for status, bucket, n, seconds in histogram:
        durations[status].counts[bucket] += n
        durations[status].total += seconds
    return Snapshot(
        jobs=jobs,
        workflows=workflows,
        oldest_ready_age=float(oldest) if oldest is not None else None,
        runners=runners,
        window=covered,
        claims=claims,
        attempts_ended=ended,
        durations=durations,
    )
