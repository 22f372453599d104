"""The blob store: files stored once by SHA-256 in chunks, and the records that name them.

- ``blobs``: one row per stored content (its SHA-256, size and number of chunks). A writer
  inserts it and COPYs its chunks in one transaction, so a blob is visible only when complete.
  ``last_used_at`` is bumped by every upload or dedup hit, so that prune's grace covers a blob
  between its upload and the commit of the record that names it.
- ``blob_chunks``: the content, ≤ 1 MiB ``bytea`` per row, stored EXTERNAL (out of line,
  never through pglz: most data files are compressed already, and pglz would cost CPU on
  every write for nothing).
- ``workflow_files``, ``job_outputs``, ``model_run_files``: relative paths naming blobs, each
  owned by its record (ON DELETE CASCADE) and holding its blob (no cascade: a referenced blob
  cannot be deleted). Indexed by blob for prune's anti-join.

Grants as 0005 did for the tables it knew: read, run, own.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
READONLY, RUNNER, ADMIN = "smifdb_readonly", "smifdb_runner", "smifdb_admin"
RUNNER_GRANTS = {
    "blobs": "SELECT, INSERT, UPDATE",  # upload, dedup (bump last_used_at)
    "blob_chunks": "SELECT, INSERT",  # upload, download
    "workflow_files": "SELECT",  # materialise a job's folder
    "job_outputs": "SELECT, INSERT, UPDATE, DELETE",  # store the recorded attempt's outputs
    "model_run_files": "SELECT, INSERT, UPDATE, DELETE",  # snapshots, decision-state files
}
STORAGE = {
    # Insert, bump last_used_at, delete: room for HOT bumps; vacuum after prunes.
    "blobs": "fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02, "
    "autovacuum_vacuum_insert_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0",
    # Insert and delete only; the data lives in TOAST, the heap rows are narrow.
    "blob_chunks": "autovacuum_vacuum_scale_factor = 0.02, "
    "autovacuum_vacuum_insert_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0",
    "workflow_files": "autovacuum_vacuum_scale_factor = 0.05",
    "job_outputs": "autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0",
    "model_run_files": "autovacuum_vacuum_scale_factor = 0.05",
}
# Relative POSIX paths: not empty, not absolute, no '..' component (smifdb.store.blobs.check_path
# also normalises them and refuses NUL, which text cannot hold anyway).
PATH_CHECK = "path <> '' AND left(path, 1) <> '/' AND NOT ('..' = ANY(string_to_array(path, '/')))"
REFERENCES = {
    "workflow_files": ("workflow_id", "workflows"),
    "job_outputs": ("job_id", "jobs"),
    "model_run_files": ("model_run_id", "model_runs"),
}


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


def _reference_table(table: str, owner_column: str, owner: str, *extra: sa.Column) -> None:
    op.create_table(
        table,
        sa.Column(
            owner_column,
            sa.BigInteger,
            sa.ForeignKey(f"{owner}.id", ondelete="CASCADE", name=f"{table}_{owner_column}_fkey"),
            nullable=False,
        ),
        *extra,
        sa.Column("path", sa.Text, nullable=False),
        sa.Column(
            "sha256",
            sa.LargeBinary,
            sa.ForeignKey("blobs.sha256", name=f"{table}_sha256_fkey"),
            nullable=False,
        ),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("mode", sa.Integer, nullable=False, server_default="420"),
        sa.PrimaryKeyConstraint(owner_column, "path", name=f"{table}_pkey"),
        sa.CheckConstraint(PATH_CHECK, name=f"{table}_path_relative"),
        sa.CheckConstraint("mode IN (420, 493)", name=f"{table}_mode_check"),  # 0o644, 0o755
    )
    op.create_index(f"{table}_sha256_idx", table, ["sha256"])


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.LargeBinary, primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("chunks", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("last_used_at", TS, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("length(sha256) = 32", name="blobs_sha256_length"),
        sa.CheckConstraint("size >= 0", name="blobs_size_check"),
        sa.CheckConstraint("chunks >= 0", name="blobs_chunks_check"),
    )
    op.create_table(
        "blob_chunks",
        sa.Column(
            "sha256",
            sa.LargeBinary,
            sa.ForeignKey("blobs.sha256", ondelete="CASCADE", name="blob_chunks_sha256_fkey"),
            nullable=False,
        ),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("sha256", "seq", name="blob_chunks_pkey"),
    )
    op.execute("ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL")
    _reference_table("workflow_files", "workflow_id", "workflows")
    _reference_table(
        "job_outputs", "job_id", "jobs", sa.Column("attempt", sa.Integer, nullable=False)
    )
    _reference_table("model_run_files", "model_run_id", "model_runs")
    for table, options in STORAGE.items():
        op.execute(f"ALTER TABLE {table} SET ({options})")
    _grant(list(STORAGE))
    _smif_job_kind()


def downgrade() -> None:
    for table in ("model_run_files", "job_outputs", "workflow_files", "blob_chunks", "blobs"):
        op.drop_table(table)


# -- the smif job kind (issue 16, deliverable 3) ----------------------------------------------
# A smif model run's jobs without a shared folder are of kind 'smif' (smifdb/kinds/smif.py).
# PostgreSQL 12+ adds an enum value inside a transaction (it is not used in this one). The
# downgrade leaves the value: removing one means rebuilding the type under 0004's views, and
# a runner of an older smifdb fails a job of a kind it does not know clearly.


def _smif_job_kind() -> None:
    op.execute("ALTER TYPE job_kind ADD VALUE IF NOT EXISTS 'smif'")
