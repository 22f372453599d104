"""A bundle's decider state: ``workflows.decider_state`` (jsonb, null for plain workflows).

The manager replayed smif's decision loop from the start for every bundle, so deciding bundle k
cost k steps and a model run's k bundles cost k²/2. The decider now stores the decision
module's state (plain data, as JSON) with the bundle it just decided, and resumes from it for
the next: one step per bundle. Bundles submitted before this revision have none; their next
bundle is decided by replaying, as before.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workflows", sa.Column("decider_state", postgresql.JSONB()))


def downgrade() -> None:
    op.drop_column("workflows", "decider_state")
