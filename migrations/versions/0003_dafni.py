"""API users and tokens, and the DAFNI shim's records: model versions, workflow versions,
parameter sets and instances (each instance runs as one smifdb workflow).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
UUID = postgresql.UUID(as_uuid=True)
NEW_UUID = sa.text("gen_random_uuid()")


def upgrade() -> None:
    op.create_table(
        "api_users",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "api_tokens",
        sa.Column("token_hash", sa.LargeBinary, primary_key=True),
        sa.Column(
            "user_id",
            sa.BigInteger,
            sa.ForeignKey("api_users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("issued_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("expires_at", TS, nullable=False),
        sa.CheckConstraint("kind IN ('access', 'refresh')", name="api_tokens_kind_check"),
    )
    op.create_index("api_tokens_user_idx", "api_tokens", ["user_id"])
    op.create_table(
        "dafni_models",
        sa.Column("version_id", UUID, primary_key=True, server_default=NEW_UUID),
        sa.Column("model_id", UUID, nullable=False),
        sa.Column("definition", postgresql.JSONB, nullable=False),
        sa.Column("version_message", sa.Text, nullable=False, server_default=""),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("dafni_models_model_idx", "dafni_models", ["model_id", "created_at"])
    op.create_table(
        "dafni_model_uploads",
        sa.Column("id", UUID, primary_key=True, server_default=NEW_UUID),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("definition", postgresql.JSONB),
        sa.Column("image_bytes", sa.BigInteger),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "dafni_workflows",
        sa.Column("version_id", UUID, primary_key=True, server_default=NEW_UUID),
        sa.Column("workflow_id", UUID, nullable=False),
        sa.Column("definition", postgresql.JSONB, nullable=False),
        sa.Column("version_message", sa.Text, nullable=False, server_default=""),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_index(
        "dafni_workflows_workflow_idx", "dafni_workflows", ["workflow_id", "created_at"]
    )
    op.create_table(
        "dafni_parameter_sets",
        sa.Column("id", UUID, primary_key=True, server_default=NEW_UUID),
        sa.Column(
            "workflow_version_id",
            UUID,
            sa.ForeignKey("dafni_workflows.version_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("definition", postgresql.JSONB, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_index(
        "dafni_parameter_sets_workflow_idx", "dafni_parameter_sets", ["workflow_version_id"]
    )
    op.create_table(
        "dafni_instances",
        sa.Column("id", UUID, primary_key=True, server_default=NEW_UUID),
        sa.Column(
            "workflow_version_id",
            UUID,
            sa.ForeignKey("dafni_workflows.version_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "parameter_set_id",
            UUID,
            sa.ForeignKey("dafni_parameter_sets.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "workflow_id",
            sa.BigInteger,
            sa.ForeignKey("workflows.id", ondelete="CASCADE"),
            nullable=False,
            unique=True,
        ),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.Text),
        sa.Column("submitted_at", TS, nullable=False, server_default=sa.func.now()),
        # A retried execute request with the same key gets the same instance, not a second one.
        sa.UniqueConstraint("owner", "idempotency_key", name="dafni_instances_idempotency_key"),
    )
    op.create_index(
        "dafni_instances_workflow_version_idx", "dafni_instances", ["workflow_version_id"]
    )
    op.create_index("dafni_instances_parameter_set_idx", "dafni_instances", ["parameter_set_id"])


def downgrade() -> None:
    op.drop_table("dafni_instances")
    op.drop_table("dafni_parameter_sets")
    op.drop_table("dafni_workflows")
    op.drop_table("dafni_model_uploads")
    op.drop_table("dafni_models")
    op.drop_table("api_tokens")
    op.drop_table("api_users")
