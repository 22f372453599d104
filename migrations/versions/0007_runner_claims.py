"""A claims counter per runner: `runners.jobs_claimed`, added to at each heartbeat.

/metrics exports it as `smifdb_runner_claims_total`, a counter Prometheus can rate() over any
range, beside the windowed `smifdb_job_claims_per_second`. The heartbeat already adds the
succeeded and failed counts since the last beat; the claim count rides on the same update, so
claiming itself writes nothing more.

Additive and instant: a NOT NULL column with a constant default rewrites no rows (PostgreSQL
11 and later). Runners started before the upgrade keep working (their heartbeat does not name
the column; their claims are not counted); runners of this version need the column and check
for this revision at start.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "runners",
        sa.Column("jobs_claimed", sa.BigInteger(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_column("runners", "jobs_claimed")
