"""Model runs: a row per smif (or generic) model run; workflows become its bundles' fragments.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
WORKFLOW_STATUS = postgresql.ENUM(name="workflow_status", create_type=False)
MODEL_RUN_KIND = postgresql.ENUM("smif", "python", name="model_run_kind", create_type=False)


def upgrade() -> None:
    MODEL_RUN_KIND.create(op.get_bind())
    op.create_table(
        "model_runs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("kind", MODEL_RUN_KIND, nullable=False),
        sa.Column("project_dir", sa.Text, nullable=False),
        sa.Column("decide", sa.Text),
        sa.Column("options", postgresql.JSONB, nullable=False, server_default="{}"),
        sa.Column("status", WORKFLOW_STATUS, nullable=False, server_default="running"),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("bundles", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
        sa.Column("submitted_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("finished_at", TS),
        sa.CheckConstraint(
            "(kind = 'python') = (decide IS NOT NULL)", name="model_runs_decide_iff_python"
        ),
        sa.CheckConstraint(
            "(finished_at IS NULL) = (status IN ('pending', 'running'))",
            name="model_runs_finished_iff_ended",
        ),
    )
    # Two live runs of one model run in one project would write the same results folder.
    op.create_index(
        "model_runs_live_name_idx",
        "model_runs",
        ["project_dir", "name"],
        unique=True,
        postgresql_where=sa.text("finished_at IS NULL"),
    )
    op.add_column(
        "workflows",
        sa.Column("model_run_id", sa.BigInteger, sa.ForeignKey("model_runs.id"), nullable=True),
    )
    # A bundle is submitted once, whatever managers race: enforced here, not by timing.
    op.create_unique_constraint(
        "workflows_model_run_bundle_key", "workflows", ["model_run_id", "bundle"]
    )
    op.drop_index("workflows_model_run_idx", table_name="workflows")
    op.add_column("events", sa.Column("model_run_id", sa.BigInteger))
    op.alter_column("events", "workflow_id", nullable=True)
    op.create_index(
        "events_model_run_idx",
        "events",
        ["model_run_id", "id"],
        postgresql_where=sa.text("model_run_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("events_model_run_idx", table_name="events")
    op.execute("DELETE FROM events WHERE workflow_id IS NULL")
    op.alter_column("events", "workflow_id", nullable=False)
    op.drop_column("events", "model_run_id")
    op.create_index("workflows_model_run_idx", "workflows", ["model_run", "bundle"])
    op.drop_constraint("workflows_model_run_bundle_key", "workflows", type_="unique")
    op.drop_column("workflows", "model_run_id")
    op.drop_index("model_runs_live_name_idx", table_name="model_runs")
    op.drop_table("model_runs")
    MODEL_RUN_KIND.drop(op.get_bind())
