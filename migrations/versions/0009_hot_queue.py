"""The hot queue: ready jobs in `ready_jobs`, leases in `claims`, finished counts in
`workflow_counts`; `jobs` loses every index on its status so that status changes are HOT.

Before, every claim and every completion was a non-HOT update of the wide `jobs` row: the four
partial indexes named `status` (claim order, per-workflow claim order, running leases, retries),
so each status change wrote a new tuple into the primary key, `jobs_workflow_key_key` and a
partial index. And every recording transaction updated its workflow's row (the unfinished-jobs
counter), so runners recording into one workflow queued for that row through each other's
commits. Now:

- `ready_jobs` holds one narrow row per ready job (job id, workflow, priority, not-before). A
  claim locks rows of it with SKIP LOCKED and deletes them; whoever makes a job ready inserts
  one. Its indexes are the two claim orders and the due retries.
- `claims` holds one row per claim batch and workflow: the runner, the claim time (the jobs'
  started_at), the lease expiry and the job ids. Rescue finds lost jobs through the open claims
  (a partial index), renewal extends a claim, not each job; a runner closes a claim once all of
  its jobs are recorded. The jobs' own `lease_expires_at` goes.
- `workflow_counts` holds each workflow's finished jobs as one row per recording session
  (shard = backend pid): sessions never wait for each other; the sum is the progress.
  `workflows.unfinished_jobs` goes; views compute it.
- `jobs` gets fillfactor 50, so that a claim and a completion find room on the row's own page.
- A claim is no longer an `events` row of its own: the event that ends an attempt carries when
  and by whom it was claimed (`claimed_at`, `claimed_by`), and `smifdb_job_history` shows the
  claim from there (or, while the attempt runs, from the job). Half the audit rows per job; the
  claims of attempts running at the upgrade move likewise.

The views that read what moved are replaced in place (same columns), and the new tables get the
grants of 0005's roles. The downgrade restores 0004's and 0008's definitions, the indexes, the
column values and the counter.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
READONLY, RUNNER, ADMIN = "smifdb_readonly", "smifdb_runner", "smifdb_admin"
RUNNER_GRANTS = {
    "ready_jobs": "SELECT, INSERT, UPDATE, DELETE",  # claim (lock, delete), make ready (insert)
    "claims": "SELECT, INSERT, UPDATE",  # claim, renew, close
    "workflow_counts": "SELECT, INSERT, UPDATE",  # count finished jobs
}
STORAGE = {
    # Insert and delete only: no room needed for updates; vacuum early, it churns.
    "ready_jobs": "autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 1000, "
    "autovacuum_vacuum_insert_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.05, "
    "autovacuum_vacuum_cost_delay = 0",
    # toast_tuple_target: a claim of a few hundred job ids (2 KB and more) stays inline and
    # uncompressed, not run through pglz at every claim.
    "claims": "fillfactor = 80, toast_tuple_target = 8160, autovacuum_vacuum_scale_factor = 0.02, "
    "autovacuum_vacuum_insert_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0",
    "workflow_counts": "fillfactor = 50, autovacuum_vacuum_scale_factor = 0.0, "
    "autovacuum_vacuum_threshold = 200, autovacuum_vacuum_cost_delay = 0",
}
JOBS_STORAGE_NEW, JOBS_STORAGE_OLD = "fillfactor = 50", "fillfactor = 70"

DEAD_AFTER = (
    "make_interval(secs => coalesce(nullif(current_setting('smifdb.dead_after', true), '')"
    "::float8, 30))"
)
# Running jobs, each with its claim: the open claims (claims_open_idx), their job ids, and the
# jobs still running under them (claimed by that runner at that time).
RUNNING = """
    SELECT j.id, j.workflow_id, c.owner, c.expires_at FROM claims c
    CROSS JOIN LATERAL unnest(c.job_ids) AS u(job_id)
    JOIN jobs j ON j.id = u.job_id
    WHERE c.closed_at IS NULL AND j.status = 'running' AND j.lease_owner = c.owner
      AND j.started_at = c.claimed_at"""
# Each workflow's finished jobs, summed over its sessions' rows.
FINISHED = (
    "(SELECT coalesce(sum(n.finished), 0)::int FROM workflow_counts n WHERE n.workflow_id = w.id)"
)

VIEWS = {
    # Every event of every job, the claim that began each attempt, and the workflows' own
    # events. A claim is recorded with the end of its attempt (claimed_at, claimed_by), so its
    # row carries that event's id and the claim's own time; the claim of an attempt still
    # running comes from the job and has no event id yet. Jobs drive the job branches, so that
    # WHERE job_id = … is a primary-key lookup and then a range of events_workflow_job_idx.
    "smifdb_job_history": """
SELECT e.id AS event_id, e.at, j.workflow_id, j.id AS job_id, j.key AS job_key, e.attempt,
       e.from_status, e.to_status, e.actor, e.reason
FROM jobs j
JOIN events e ON e.workflow_id = j.workflow_id AND e.job_id = j.id
UNION ALL
SELECT e.id, e.claimed_at, j.workflow_id, j.id, j.key, e.attempt,
       'ready', 'running', e.claimed_by, 'claimed'
FROM jobs j
JOIN events e ON e.workflow_id = j.workflow_id AND e.job_id = j.id
WHERE e.claimed_at IS NOT NULL
UNION ALL
SELECT NULL::bigint, j.started_at, j.workflow_id, j.id, j.key, j.attempts,
       'ready', 'running', j.lease_owner, 'claimed'
FROM jobs j
WHERE j.status = 'running'
UNION ALL
SELECT e.id, e.at, e.workflow_id, NULL::bigint, NULL::text, e.attempt,
       e.from_status, e.to_status, e.actor, e.reason
FROM events e
WHERE e.job_id IS NULL AND e.workflow_id IS NOT NULL
""",
    "smifdb_workflow_progress": f"""
SELECT w.id AS workflow_id,
       w.name,
       w.status::text AS status,
       w.model_run_id,
       w.bundle,
       w.job_count AS jobs_total,
       d.done AS jobs_done,
       c.waiting, c.ready, c.running, c.succeeded, c.failed, c.upstream_failed, c.cancelled,
       round(100.0 * d.done / w.job_count, 1)::float8 AS percent_done,
       w.submitted_at, w.started_at, w.finished_at,
       extract(epoch FROM coalesce(w.started_at, w.finished_at, now()) - w.submitted_at)::float8
           AS queued_seconds,
       extract(epoch FROM coalesce(w.finished_at, now()) - w.started_at)::float8
           AS elapsed_seconds,
       CASE WHEN w.finished_at IS NULL AND d.done > 0 THEN
           (extract(epoch FROM now() - w.started_at) * (w.job_count - d.done) / d.done)::float8
       END AS eta_seconds
FROM workflows w
CROSS JOIN LATERAL (SELECT {FINISHED} AS done) d
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
    "smifdb_model_run_progress": f"""
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
           coalesce(sum({FINISHED}), 0)::int AS jobs_done,
           max(w.bundle) AS current_bundle,
           (array_agg(w.id ORDER BY w.bundle DESC))[1] AS current_workflow_id
    FROM workflows w WHERE w.model_run_id = m.id
) b
""",
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
       r.last_heartbeat_at,
       r.jobs_claimed
FROM runners r
LEFT JOIN (
    SELECT owner AS lease_owner, count(*)::int AS busy FROM ({RUNNING}) running
    GROUP BY owner
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
    FROM ready_jobs
) q
CROSS JOIN (
    -- Claimable since: its latest move to ready (submission, parents done, retry, rescue),
    -- or the end of its retry backoff.
    SELECT extract(epoch FROM now() - min(greatest(coalesce(e.at, j.created_at), r.not_before)))
               ::float8 AS oldest_ready_seconds
    FROM ready_jobs r
    JOIN jobs j ON j.id = r.job_id
    LEFT JOIN LATERAL (
        SELECT e.at FROM events e
        WHERE e.workflow_id = j.workflow_id AND e.job_id = j.id AND e.to_status = 'ready'
        ORDER BY e.id DESC LIMIT 1
    ) e ON true
    WHERE r.not_before IS NULL OR r.not_before <= now()
) o
CROSS JOIN (
    SELECT count(*)::int AS running,
           count(*) FILTER (WHERE expires_at < now())::int AS expired_leases
    FROM ({RUNNING}) running
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
}

OLD_INDEXES = (
    ("jobs_claim_idx", ["priority DESC", "id"], "status = 'ready'"),
    ("jobs_claim_workflow_idx", ["workflow_id", "priority DESC", "id"], "status = 'ready'"),
    ("jobs_running_lease_idx", ["lease_expires_at"], "status = 'running'"),
    ("jobs_retry_idx", ["not_before"], "status = 'ready' AND not_before IS NOT NULL"),
)


def _earlier(module: str):
    """An earlier migration's module: the downgrade restores the views as they wrote them."""
    path = Path(__file__).with_name(f"{module}.py")
    spec = importlib.util.spec_from_file_location(f"smifdb_migration_{module}", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def _replace_view(name: str, query: str) -> None:
    """CREATE OR REPLACE keeps owner, grants and dependants; its options must be restated."""
    options = (
        op.get_bind()
        .exec_driver_sql(f"SELECT reloptions FROM pg_class WHERE oid = '{name}'::regclass")
        .scalar()
    )
    with_options = f" WITH ({', '.join(options)})" if options else ""
    op.execute(f"CREATE OR REPLACE VIEW {name}{with_options} AS {query}")


def _roles() -> set[str]:
    rows = op.get_bind().execute(
        sa.text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:r)"),
        {"r": [READONLY, RUNNER, ADMIN]},
    )
    return {r[0] for r in rows}


def _grant(tables: list[str]) -> None:
    """As 0005 did for the tables it knew: read, run, own."""
    roles = _roles()
    if READONLY in roles:
        op.execute(f"GRANT SELECT ON {', '.join(tables)} TO {READONLY}")
    if RUNNER in roles:
        for table in tables:
            op.execute(f"GRANT {RUNNER_GRANTS[table]} ON {table} TO {RUNNER}")
    if ADMIN in roles:
        op.execute(f"GRANT ALL ON {', '.join(tables)} TO {ADMIN}")
        # Owned as jobs is: by smifdb_admin if 0005 could give it smifdb's tables.
        for table in tables:
            op.execute(
                f"""
DO $owner$
BEGIN
    IF (SELECT relowner FROM pg_class WHERE oid = 'jobs'::regclass)
       = (SELECT oid FROM pg_roles WHERE rolname = '{ADMIN}') THEN
        ALTER TABLE {table} OWNER TO {ADMIN};
    END IF;
END
$owner$"""
            )


def upgrade() -> None:
    op.create_table(
        "ready_jobs",
        sa.Column("job_id", sa.BigInteger, nullable=False),
        sa.Column("workflow_id", sa.BigInteger, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("not_before", TS),
    )
    op.create_index("ready_jobs_claim_idx", "ready_jobs", [sa.text("priority DESC"), "job_id"])
    op.create_index(
        "ready_jobs_workflow_idx",
        "ready_jobs",
        ["workflow_id", sa.text("priority DESC"), "job_id"],
    )
    op.create_index(
        "ready_jobs_retry_idx",
        "ready_jobs",
        ["not_before"],
        postgresql_where=sa.text("not_before IS NOT NULL"),
    )
    op.create_table(
        "claims",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("workflow_id", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("claimed_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("closed_at", TS),
        sa.Column("job_ids", postgresql.ARRAY(sa.BigInteger), nullable=False),
    )
    op.create_index(
        "claims_open_idx",
        "claims",
        ["owner"],
        postgresql_where=sa.text("closed_at IS NULL"),
    )
    op.create_index("claims_workflow_idx", "claims", ["workflow_id"])
    op.create_table(
        "workflow_counts",
        sa.Column("workflow_id", sa.BigInteger, nullable=False),
        sa.Column("shard", sa.Integer, nullable=False),
        sa.Column("finished", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("workflow_id", "shard", name="workflow_counts_pkey"),
    )
    for table, options in STORAGE.items():
        op.execute(f"ALTER TABLE {table} SET ({options})")
    op.execute(f"ALTER TABLE jobs SET ({JOBS_STORAGE_NEW})")
    op.add_column("events", sa.Column("claimed_at", TS))
    op.add_column("events", sa.Column("claimed_by", sa.Text))
    # Attempts running now: their claim events (each job's newest; an earlier, released attempt
    # may share its number) move to the events that will end them (the view shows the claim
    # from the job meanwhile), or they would show twice.
    op.execute(
        """
DELETE FROM events e USING jobs j
WHERE j.status = 'running' AND e.workflow_id = j.workflow_id AND e.job_id = j.id
  AND e.id = (SELECT max(c.id) FROM events c
              WHERE c.workflow_id = j.workflow_id AND c.job_id = j.id
                AND c.from_status = 'ready' AND c.to_status = 'running')
"""
    )

    op.execute(
        "INSERT INTO ready_jobs (job_id, workflow_id, priority, not_before)"
        " SELECT id, workflow_id, priority, not_before FROM jobs WHERE status = 'ready'"
    )
    op.execute(
        """
INSERT INTO claims (workflow_id, owner, claimed_at, expires_at, job_ids)
SELECT workflow_id, lease_owner, started_at, coalesce(max(lease_expires_at), now()),
       array_agg(id ORDER BY id)
FROM jobs WHERE status = 'running'
GROUP BY workflow_id, lease_owner, started_at
"""
    )
    op.execute(
        "INSERT INTO workflow_counts (workflow_id, shard, finished)"
        " SELECT id, 0, job_count - unfinished_jobs FROM workflows"
        " WHERE job_count > unfinished_jobs"
    )
    for name, query in VIEWS.items():
        _replace_view(name, query)
    for name, _, _ in OLD_INDEXES:
        op.drop_index(name, table_name="jobs")
    op.drop_constraint("workflows_unfinished_jobs_range", "workflows", type_="check")
    op.drop_column("workflows", "unfinished_jobs")
    op.drop_column("jobs", "lease_expires_at")
    _grant(list(STORAGE))


def downgrade() -> None:
    op.add_column("jobs", sa.Column("lease_expires_at", TS))
    op.add_column("workflows", sa.Column("unfinished_jobs", sa.Integer))
    op.execute(
        """
UPDATE workflows w SET unfinished_jobs = w.job_count - coalesce(
    (SELECT sum(finished) FROM workflow_counts n WHERE n.workflow_id = w.id), 0)
"""
    )
    op.alter_column("workflows", "unfinished_jobs", nullable=False)
    op.create_check_constraint(
        "workflows_unfinished_jobs_range",
        "workflows",
        "unfinished_jobs >= 0 AND unfinished_jobs <= job_count",
    )
    op.execute(
        """
UPDATE jobs j SET lease_expires_at = c.expires_at
FROM claims c CROSS JOIN LATERAL unnest(c.job_ids) AS u(job_id)
WHERE c.closed_at IS NULL AND j.id = u.job_id AND j.status = 'running'
  AND j.lease_owner = c.owner AND j.started_at = c.claimed_at
"""
    )
    for name, columns, where in OLD_INDEXES:
        op.create_index(
            name, "jobs", [sa.text(c) for c in columns], postgresql_where=sa.text(where)
        )
    # Claims become events rows again (new ids, after every event now; `at` is the claim's).
    op.execute(
        """
INSERT INTO events (at, workflow_id, job_id, from_status, to_status, attempt, actor, reason)
SELECT at, workflow_id, job_id, 'ready', 'running', attempt, actor, 'claimed' FROM (
    SELECT e.claimed_at AS at, e.workflow_id, e.job_id, e.attempt, e.claimed_by AS actor
    FROM events e WHERE e.claimed_at IS NOT NULL
    UNION ALL
    SELECT j.started_at, j.workflow_id, j.id, j.attempts, j.lease_owner
    FROM jobs j WHERE j.status = 'running'
) claimed ORDER BY at
"""
    )
    views = _earlier("0004_views").VIEWS
    for name in VIEWS:
        query = _earlier("0008_runner_load_claims").NEW if name == "smifdb_runner_load" else None
        _replace_view(name, query or views[name])
    op.drop_column("events", "claimed_by")
    op.drop_column("events", "claimed_at")
    op.execute(f"ALTER TABLE jobs SET ({JOBS_STORAGE_OLD})")
    for table in reversed(list(STORAGE)):
        op.drop_table(table)
