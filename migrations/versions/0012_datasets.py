"""The DAFNI data catalogue: datasets, their versions, metadata and files, on the blob store.

- ``dafni_datasets``: one row per dataset (DAFNI's dataset id), owned by its creator.
- ``dafni_dataset_versions``: its versions (DAFNI's version id); a reference version points
  at a URL instead of holding files.
- ``dafni_dataset_metadata``: each metadata version of a dataset version (DAFNI's metadata
  id); the newest is the version's metadata.
- ``dafni_dataset_files``: a version's files, relative paths naming blobs (as 0011's
  ``workflow_files``: owned with cascade, holding their blob without).
- ``dafni_dataset_uploads`` and ``dafni_dataset_upload_files``: dafni-cli's temporary
  buckets, filled by PUTs to the URLs handed out, emptied when the dataset is committed.

Grants as 0011 did: read for smifdb_readonly, all for smifdb_admin (runners read dataslot
files through ``workflow_files``, never these tables).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-09
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
UUID = postgresql.UUID(as_uuid=True)
NEW_UUID = sa.text("gen_random_uuid()")
READONLY, ADMIN = "smifdb_readonly", "smifdb_admin"
PATH_CHECK = "path <> '' AND left(path, 1) <> '/' AND NOT ('..' = ANY(string_to_array(path, '/')))"
TABLES = [
    "dafni_datasets",
    "dafni_dataset_versions",
    "dafni_dataset_metadata",
    "dafni_dataset_files",
    "dafni_dataset_uploads",
    "dafni_dataset_upload_files",
]


def _owner() -> list[sa.Column]:
    return [
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("owner_id", sa.BigInteger, sa.ForeignKey("api_users.id", ondelete="SET NULL")),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
    ]


def _files(table: str, owner_column: str, owner: str) -> None:
    op.create_table(
        table,
        sa.Column(
            owner_column,
            UUID,
            sa.ForeignKey(owner, ondelete="CASCADE", name=f"{table}_{owner_column}_fkey"),
            nullable=False,
        ),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column(
            "sha256",
            sa.LargeBinary,
            sa.ForeignKey("blobs.sha256", name=f"{table}_sha256_fkey"),
            nullable=False,
        ),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("media_type", sa.Text, nullable=False, server_default="application/octet-stream"),
        sa.PrimaryKeyConstraint(owner_column, "path", name=f"{table}_pkey"),
        sa.CheckConstraint(PATH_CHECK, name=f"{table}_path_relative"),
    )
    op.create_index(f"{table}_sha256_idx", table, ["sha256"])  # prune's anti-join


def upgrade() -> None:
    op.create_table(
        "dafni_datasets",
        sa.Column("dataset_id", UUID, primary_key=True, server_default=NEW_UUID),
        *_owner(),
    )
    op.create_table(
        "dafni_dataset_versions",
        sa.Column("version_id", UUID, primary_key=True, server_default=NEW_UUID),
        sa.Column(
            "dataset_id",
            UUID,
            sa.ForeignKey("dafni_datasets.dataset_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("reference_url", sa.Text),  # a reference version: a URL, no files
        *_owner(),
    )
    op.create_index(
        "dafni_dataset_versions_dataset_idx",
        "dafni_dataset_versions",
        ["dataset_id", "created_at"],
    )
    op.create_table(
        "dafni_dataset_metadata",
        sa.Column("metadata_id", UUID, primary_key=True, server_default=NEW_UUID),
        sa.Column(
            "version_id",
            UUID,
            sa.ForeignKey("dafni_dataset_versions.version_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("metadata", postgresql.JSONB, nullable=False),
        *_owner(),
    )
    op.create_index(
        "dafni_dataset_metadata_version_idx",
        "dafni_dataset_metadata",
        ["version_id", "created_at"],
    )
    _files("dafni_dataset_files", "version_id", "dafni_dataset_versions.version_id")
    op.create_table(
        "dafni_dataset_uploads",
        sa.Column("bucket_id", UUID, primary_key=True, server_default=NEW_UUID),
        *_owner(),
    )
    _files("dafni_dataset_upload_files", "bucket_id", "dafni_dataset_uploads.bucket_id")
    _grant()


def _grant() -> None:
    rows = op.get_bind().execute(
        sa.text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:r)"), {"r": [READONLY, ADMIN]}
    )
    roles = {r[0] for r in rows}
    if READONLY in roles:
        op.execute(f"GRANT SELECT ON {', '.join(TABLES)} TO {READONLY}")
    if ADMIN in roles:
        op.execute(f"GRANT ALL ON {', '.join(TABLES)} TO {ADMIN}")
        for table in TABLES:  # owned as jobs is (see 0011)
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


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)
