"""SQL views for status and audit questions: workflow and model-run progress, job history,
runner load, queue health, slowest jobs and failure reasons (docs/sql.md).

Every view reads through the tables' existing indexes when filtered the documented way
(by workflow_id, job_id or model_run_id); none adds an index to the hot path.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Seconds of silence after which an active runner counts as lost, as `runner status
# --dead-after` (default 30); a session may override it: SET smifdb.dead_after = 5.
DEAD_AFTER = (
    "make_interval(secs => coalesce(nullif(current_setting('smifdb.dead_after', true), '')"
    "::float8, 30))"
)

VIEWS = {
    # One row per workflow. The per-status counts come from a LATERAL aggregate over the
    # workflow's jobs (jobs_workflow_key_key), so WHERE workflow_id = … or ORDER BY
    # workflow_id DESC LIMIT n counts the jobs of those workflows only.
    "smifdb_workflow_progress": """
SELECT w.id AS workflow_id,
       w.name,
       w.status::text AS status,
       w.model_run_id,
       w.bundle,
       w.job_count AS jobs_total,
       w.job_count - w.unfinished_jobs AS jobs_done,
       c.waiting, c.ready, c.running, c.succeeded, c.failed, c.upstream_failed, c.cancelled,
       round(100.0 * (w.job_count - w.unfinished_jobs) / w.job_count, 1)::float8
           AS percent_done,
       w.submitted_at, w.started_at, w.finished_at,
       extract(epoch FROM coalesce(w.started_at, w.finished_at, now()) - w.submitted_at)::float8
           AS queued_seconds,
       extract(epoch FROM coalesce(w.finished_at, now()) - w.started_at)::float8
           AS elapsed_seconds,
       CASE WHEN w.finished_at IS NULL AND w.job_count > w.unfinished_jobs THEN
           (extract(epoch FROM now() - w.started_at) * w.unfinished_jobs
            / (w.job_count - w.unfinished_jobs))::float8
       END AS eta_seconds
FROM workflows w
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE j.status = 'waiting')::int AS waiting,
           count(*) FILTER (WHERE j.status = 'ready')::int AS ready,
           count(*) FILTER (WHERE j.status = 'running')::int AS running,
           count(*) FILTER (WHERE j.status = 'succeeded')::int AS succeeded,
           count(*) FILTER (WHERE j.status = 'failed')::int AS failed,
           count(*) FILTER (WHERE j.status = 'upstream_failed')::int AS upstream_failed,
           count(*) FILTER (WHERE j.status = 'cancelled')::int AS cancelled
    FROM jobs j WHERE j.workflow_id = w.id
) c
""",
    # One row per model run, summed over its bundles' workflow counters (no job is read).
    "smifdb_model_run_progress": """
SELECT m.id AS model_run_id,
       m.name,
       m.kind::text AS kind,
       m.status::text AS status,
       m.bundles,
       b.current_bundle,
       b.current_workflow_id,
       b.jobs_total,
       b.jobs_done,
       round(100.0 * b.jobs_done / nullif(b.jobs_total, 0), 1)::float8 AS percent_done,
       m.error,
       m.submitted_at,
       m.finished_at,
       extract(epoch FROM coalesce(m.finished_at, now()) - m.submitted_at)::float8
           AS elapsed_seconds
FROM model_runs m
CROSS JOIN LATERAL (
    SELECT coalesce(sum(w.job_count), 0)::int AS jobs_total,
           coalesce(sum(w.job_count - w.unfinished_jobs), 0)::int AS jobs_done,
           max(w.bundle) AS current_bundle,
           (array_agg(w.id ORDER BY w.bundle DESC))[1] AS current_workflow_id
    FROM workflows w WHERE w.model_run_id = m.id
) b
""",
    # Every event of every job, and the workflows' own events (job_id null). Jobs drive the
    # first branch so that WHERE job_id = … is a primary-key lookup followed by one range of
    # events_workflow_job_idx; events has no index on job_id alone.
    "smifdb_job_history": """
SELECT e.id AS event_id, e.at, j.workflow_id, j.id AS job_id, j.key AS job_key, e.attempt,
       e.from_status, e.to_status, e.actor, e.reason
FROM jobs j
JOIN events e ON e.workflow_id = j.workflow_id AND e.job_id = j.id
UNION ALL
SELECT e.id, e.at, e.workflow_id, NULL::bigint, NULL::text, e.attempt,
       e.from_status, e.to_status, e.actor, e.reason
FROM events e
WHERE e.job_id IS NULL AND e.workflow_id IS NOT NULL
""",
    # One row per runner. Busy slots from the running jobs (jobs_running_lease_idx); the last
    # hour's outcomes from the events after the newest event older than an hour, found by
    # walking events_pkey backwards: the cost is the last hour's events, not the table.
    "smifdb_runner_load": f"""
SELECT r.name AS runner,
       r.host,
       r.pid,
       r.slots,
       CASE WHEN r.state IN ('active', 'draining')
                 AND r.last_heartbeat_at < now() - {DEAD_AFTER}
            THEN 'lost' ELSE r.state::text END AS state,
       coalesce(b.busy, 0) AS busy,
       extract(epoch FROM now() - r.last_heartbeat_at)::float8 AS heartbeat_age_seconds,
       coalesce(h.succeeded, 0) AS succeeded_last_hour,
       coalesce(h.failed, 0) AS failed_last_hour,
       r.jobs_succeeded,
       r.jobs_failed,
       r.registered_at,
       r.last_heartbeat_at
FROM runners r
LEFT JOIN (
    SELECT lease_owner, count(*)::int AS busy FROM jobs
    WHERE status = 'running' GROUP BY lease_owner
) b ON b.lease_owner = r.name
LEFT JOIN (
    SELECT actor,
           count(*) FILTER (WHERE to_status = 'succeeded')::int AS succeeded,
           count(*) FILTER (
               WHERE to_status IN ('failed', 'ready')
                 AND coalesce(reason, '') NOT LIKE 'rescued:%'
                 AND coalesce(reason, '') NOT LIKE 'released:%')::int AS failed
    FROM events
    -- Both bounds, so that the planner estimates a narrow range of events_pkey (it cannot
    -- know the values): one bound alone is guessed at a third of the table and seq-scanned.
    WHERE id > (SELECT coalesce(max(id), 0) FROM events WHERE at < now() - interval '1 hour')
      AND id <= (SELECT max(id) FROM events)
      AND at >= now() - interval '1 hour'
      AND from_status = 'running' AND job_id IS NOT NULL
    GROUP BY actor
) h ON h.actor = r.name
""",
    # One row. Ready and running jobs through the partial indexes jobs_claim_idx and
    # jobs_running_lease_idx; waiting jobs through the unfinished workflows
    # (workflows_unfinished_idx), never a scan of finished history.
    "smifdb_queue_health": f"""
SELECT q.ready,
       q.claimable,
       q.retries_pending,
       q.next_retry_in_seconds,
       o.oldest_ready_seconds,
       l.running,
       l.expired_leases,
       wt.waiting,
       uw.unfinished_workflows,
       rn.live_runners,
       rn.live_slots
FROM (
    SELECT count(*)::int AS ready,
           count(*) FILTER (WHERE not_before IS NULL OR not_before <= now())::int AS claimable,
           count(*) FILTER (WHERE not_before > now())::int AS retries_pending,
           extract(epoch FROM min(not_before) FILTER (WHERE not_before > now()) - now())::float8
               AS next_retry_in_seconds
    FROM jobs WHERE status = 'ready'
) q
CROSS JOIN (
    -- Claimable since: its latest move to ready (submission, parents done, retry, rescue),
    -- or the end of its retry backoff.
    SELECT extract(epoch FROM now() - min(greatest(coalesce(e.at, j.created_at), j.not_before)))
               ::float8 AS oldest_ready_seconds
    FROM jobs j
    LEFT JOIN LATERAL (
        SELECT e.at FROM events e
        WHERE e.workflow_id = j.workflow_id AND e.job_id = j.id AND e.to_status = 'ready'
        ORDER BY e.id DESC LIMIT 1
    ) e ON true
    WHERE j.status = 'ready' AND (j.not_before IS NULL OR j.not_before <= now())
) o
CROSS JOIN (
    SELECT count(*)::int AS running,
           count(*) FILTER (WHERE lease_expires_at < now())::int AS expired_leases
    FROM jobs WHERE status = 'running'
) l
CROSS JOIN (
    SELECT count(*)::int AS waiting
    FROM workflows w JOIN jobs j ON j.workflow_id = w.id
    WHERE w.finished_at IS NULL AND j.status = 'waiting'
) wt
CROSS JOIN (
    SELECT count(*)::int AS unfinished_workflows FROM workflows WHERE finished_at IS NULL
) uw
CROSS JOIN (
    SELECT count(*)::int AS live_runners, coalesce(sum(slots), 0)::int AS live_slots
    FROM runners
    WHERE state IN ('active', 'draining') AND last_heartbeat_at >= now() - {DEAD_AFTER}
) rn
""",
    # Jobs that ran, longest (last) attempt first; running jobs count up to now.
    "smifdb_slowest_jobs": """
SELECT j.id AS job_id,
       j.workflow_id,
       j.key,
       j.status::text AS status,
       j.attempts,
       j.max_attempts,
       j.lease_owner AS runner,
       j.started_at,
       j.finished_at,
       extract(epoch FROM coalesce(j.finished_at, now()) - j.started_at)::float8
           AS duration_seconds,
       j.timeout_seconds,
       j.exit_code,
       j.error
FROM jobs j
WHERE j.started_at IS NOT NULL AND j.status IN ('running', 'succeeded', 'failed')
ORDER BY duration_seconds DESC, j.id
""",
    # Jobs that failed for good, grouped by error (per workflow: filter by workflow_id, or sum
    # over workflows; unfiltered, it reads the whole jobs table).
    "smifdb_failure_reasons": """
SELECT j.workflow_id,
       coalesce(j.error, '(none recorded)') AS error,
       count(*)::int AS jobs,
       sum(j.attempts)::int AS attempts,
       (array_agg(j.key ORDER BY j.id))[1:5] AS example_keys,
       min(j.finished_at) AS first_failed_at,
       max(j.finished_at) AS last_failed_at
FROM jobs j
WHERE j.status = 'failed'
GROUP BY j.workflow_id, j.error
ORDER BY j.workflow_id, count(*) DESC, error
""",
}


def upgrade() -> None:
    for name, query in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {query}")
        op.execute(f"COMMENT ON VIEW {name} IS 'smifdb: see docs/sql.md'")


def downgrade() -> None:
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
