"""DAG edges without foreign keys: a million-job DAG's two million edges were checked row by
row against ``jobs`` (two RI trigger lookups per edge: 11 of 18 s of a 200k-job submit).

``job_edges`` has one writer, ``submit_dag``, which writes an edge only between jobs it inserts
in the same transaction (validated first: both ends exist, no self-loops, no cycles), and one
deleter, prune, which deletes a workflow's edges explicitly before its jobs. That is the
integrity the foreign keys gave, as ``ready_jobs``, ``claims`` and ``events`` already have it.
The self-loop check stays (it costs nothing).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint("job_edges_parent_id_fkey", "job_edges", type_="foreignkey")
    op.drop_constraint("job_edges_child_id_fkey", "job_edges", type_="foreignkey")


def downgrade() -> None:
    # Edges left by hand-deleted jobs would stop the constraints being added: drop them first.
    op.execute(
        "DELETE FROM job_edges e WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE id = e.parent_id)"
        " OR NOT EXISTS (SELECT 1 FROM jobs WHERE id = e.child_id)"
    )
    for end in ("parent", "child"):
        op.create_foreign_key(
            f"job_edges_{end}_id_fkey",
            "job_edges",
            "jobs",
            [f"{end}_id"],
            ["id"],
            ondelete="CASCADE",
        )
