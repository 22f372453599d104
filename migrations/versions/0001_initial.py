"""Initial schema: workflows, jobs, job_edges, runners, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)

JOB_STATUS = postgresql.ENUM(
    "waiting",
    "ready",
    "running",
    "succeeded",
    "failed",
    "upstream_failed",
    "cancelled",
    name="job_status",
    create_type=False,
)
WORKFLOW_STATUS = postgresql.ENUM(
    "pending",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    name="workflow_status",
    create_type=False,
)
JOB_KIND = postgresql.ENUM("command", "python", name="job_kind", create_type=False)
RUNNER_STATE = postgresql.ENUM(
    "registered", "active", "draining", "stopped", "lost", name="runner_state", create_type=False
)
ENUMS = (JOB_STATUS, WORKFLOW_STATUS, JOB_KIND, RUNNER_STATE)

# A queue's tables churn: vacuum them long before the default 20% of dead rows, and leave
# room on each page so status updates stay HOT (no index writes).
QUEUE_STORAGE = {
    "jobs": "fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01, "
    "autovacuum_vacuum_threshold = 1000, autovacuum_analyze_scale_factor = 0.02, "
    "autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_insert_scale_factor = 0.05",
    "workflows": "fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02, "
    "autovacuum_vacuum_threshold = 200, autovacuum_vacuum_cost_delay = 0",
    "runners": "fillfactor = 50, autovacuum_vacuum_scale_factor = 0.0, "
    "autovacuum_vacuum_threshold = 100, autovacuum_vacuum_cost_delay = 0",
    "events": "autovacuum_vacuum_insert_scale_factor = 0.05, "
    "autovacuum_analyze_scale_factor = 0.02",
    "job_edges": "autovacuum_vacuum_insert_scale_factor = 0.05",
}


def upgrade() -> None:
    bind = op.get_bind()
    for enum in ENUMS:
        enum.create(bind, checkfirst=False)

    op.create_table(
        "workflows",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("status", WORKFLOW_STATUS, nullable=False, server_default="pending"),
        sa.Column("model_run", sa.Text),
        sa.Column("bundle", sa.Integer),
        sa.Column("job_count", sa.Integer, nullable=False),
        sa.Column("unfinished_jobs", sa.Integer, nullable=False),
        sa.Column("submitted_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.CheckConstraint("job_count > 0", name="workflows_job_count_positive"),
        sa.CheckConstraint(
            "unfinished_jobs >= 0 AND unfinished_jobs <= job_count",
            name="workflows_unfinished_jobs_range",
        ),
    )
    op.create_index("workflows_status_idx", "workflows", ["status"])
    op.create_index(
        "workflows_unfinished_idx",
        "workflows",
        ["id"],
        postgresql_where=sa.text("finished_at IS NULL"),
    )
    op.create_index("workflows_model_run_idx", "workflows", ["model_run", "bundle"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column(
            "workflow_id",
            sa.BigInteger,
            sa.ForeignKey("workflows.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("kind", JOB_KIND, nullable=False),
        sa.Column("payload", postgresql.JSONB, nullable=False),
        sa.Column("model", sa.Text),
        sa.Column("operation", sa.Text),
        sa.Column("timestep", sa.Integer),
        sa.Column("decision", sa.Integer),
        sa.Column("status", JOB_STATUS, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("unfinished_parents", sa.Integer, nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False, server_default="1"),
        sa.Column("not_before", TS),
        sa.Column("timeout_seconds", sa.Double),
        sa.Column("retry_backoff_seconds", sa.Double, nullable=False, server_default="1"),
        sa.Column("cancel_requested_at", TS),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires_at", TS),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("exit_code", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("result", postgresql.JSONB),
        sa.Column("log_tail", sa.Text),
        sa.UniqueConstraint("workflow_id", "key", name="jobs_workflow_key_key"),
        sa.CheckConstraint("unfinished_parents >= 0", name="jobs_unfinished_parents_nonnegative"),
        sa.CheckConstraint("max_attempts >= 1", name="jobs_max_attempts_positive"),
        sa.CheckConstraint("attempts >= 0", name="jobs_attempts_nonnegative"),
        sa.CheckConstraint(
            "timeout_seconds IS NULL OR timeout_seconds > 0", name="jobs_timeout_positive"
        ),
        sa.CheckConstraint("retry_backoff_seconds >= 0", name="jobs_retry_backoff_nonnegative"),
    )
    op.create_index(
        "jobs_claim_idx",
        "jobs",
        [sa.text("priority DESC"), "id"],
        postgresql_where=sa.text("status = 'ready'"),
    )
    op.create_index(
        "jobs_running_lease_idx",
        "jobs",
        ["lease_expires_at"],
        postgresql_where=sa.text("status = 'running'"),
    )
    op.create_index(
        "jobs_retry_idx",
        "jobs",
        ["not_before"],
        postgresql_where=sa.text("status = 'ready' AND not_before IS NOT NULL"),
    )

    op.create_table(
        "job_edges",
        sa.Column(
            "parent_id", sa.BigInteger, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "child_id", sa.BigInteger, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.PrimaryKeyConstraint("parent_id", "child_id", name="job_edges_pkey"),
        sa.CheckConstraint("parent_id <> child_id", name="job_edges_no_self_loop"),
    )
    op.create_index("job_edges_child_idx", "job_edges", ["child_id"])

    op.create_table(
        "runners",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("host", sa.Text),
        sa.Column("pid", sa.Integer),
        sa.Column("slots", sa.Integer, nullable=False),
        sa.Column("state", RUNNER_STATE, nullable=False, server_default="registered"),
        sa.Column("registered_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("last_heartbeat_at", TS),
        sa.Column("jobs_succeeded", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("jobs_failed", sa.BigInteger, nullable=False, server_default="0"),
        sa.CheckConstraint("slots >= 1", name="runners_slots_positive"),
    )

    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("at", TS, nullable=False, server_default=sa.func.clock_timestamp()),
        sa.Column("workflow_id", sa.BigInteger, nullable=False),
        sa.Column("job_id", sa.BigInteger),
        sa.Column("from_status", sa.Text),
        sa.Column("to_status", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
    )
    op.create_index("events_workflow_job_idx", "events", ["workflow_id", "job_id", "id"])

    for table, options in QUEUE_STORAGE.items():
        op.execute(f"ALTER TABLE {table} SET ({options})")


def downgrade() -> None:
    for table in ("events", "runners", "job_edges", "jobs", "workflows"):
        op.drop_table(table)
    bind = op.get_bind()
    for enum in reversed(ENUMS):
        enum.drop(bind, checkfirst=False)
