"""API security: user roles, long-lived and session tokens, login throttling, and records that
name their submitter by user id (so a user removed and re-created under the same name inherits
nothing).

- ``api_users.role``: viewer, operator (the default, as every user could submit before), admin
  or runner.
- ``api_tokens`` gains an ``id`` (for ``token revoke ID``), a ``name`` label, a ``session_id``
  (a login's access, refresh and cookie tokens share it: reusing a spent refresh token revokes
  the session), ``spent_at`` (a refresh token is kept, spent, until it expires, to notice reuse)
  and kinds ``session`` (a browser cookie) and ``api`` (``smifdb api token create``, which may
  never expire: ``expires_at`` becomes nullable).
- ``api_login_failures``: failed sign-ins per user name and per client address, shared by every
  API process.
- ``workflows``, ``model_runs`` and the DAFNI rows get ``submitted_by``/``owner_id`` referencing
  ``api_users`` (SET NULL when the user is removed); the DAFNI ``owner`` names stay for display.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
READONLY, RUNNER, ADMIN = "smifdb_readonly", "smifdb_runner", "smifdb_admin"
ROLES = ("viewer", "operator", "admin", "runner")
DAFNI_TABLES = (
    "dafni_models",
    "dafni_model_uploads",
    "dafni_workflows",
    "dafni_parameter_sets",
    "dafni_instances",
)
OLD_KINDS = "kind IN ('access', 'refresh')"
NEW_KINDS = "kind IN ('access', 'refresh', 'session', 'api')"


def _user_fk(table: str, column: str) -> None:
    op.add_column(
        table,
        sa.Column(
            column,
            sa.BigInteger,
            sa.ForeignKey("api_users.id", ondelete="SET NULL", name=f"{table}_{column}_fkey"),
        ),
    )


def _roles() -> set[str]:
    rows = op.get_bind().execute(
        sa.text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:r)"),
        {"r": [READONLY, RUNNER, ADMIN]},
    )
    return {r[0] for r in rows}


def upgrade() -> None:
    roles = ", ".join(f"'{r}'" for r in ROLES)
    op.add_column(
        "api_users", sa.Column("role", sa.Text, nullable=False, server_default="operator")
    )
    op.create_check_constraint("api_users_role_check", "api_users", f"role IN ({roles})")

    op.add_column(
        "api_tokens", sa.Column("id", sa.BigInteger, sa.Identity(always=False), nullable=False)
    )
    op.create_unique_constraint("api_tokens_id_key", "api_tokens", ["id"])
    op.add_column("api_tokens", sa.Column("name", sa.Text))
    op.add_column("api_tokens", sa.Column("session_id", postgresql.UUID(as_uuid=True)))
    op.add_column("api_tokens", sa.Column("spent_at", TS))
    op.alter_column("api_tokens", "expires_at", nullable=True)
    op.drop_constraint("api_tokens_kind_check", "api_tokens")
    op.create_check_constraint("api_tokens_kind_check", "api_tokens", NEW_KINDS)
    op.create_index(
        "api_tokens_session_idx",
        "api_tokens",
        ["session_id"],
        postgresql_where=sa.text("session_id IS NOT NULL"),
    )

    op.create_table(
        "api_login_failures",
        sa.Column("scope", sa.Text, nullable=False),  # 'user' or 'address'
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_failure_at", TS, nullable=False),
        sa.Column("blocked_until", TS),
        sa.PrimaryKeyConstraint("scope", "key", name="api_login_failures_pkey"),
        sa.CheckConstraint("scope IN ('user', 'address')", name="api_login_failures_scope_check"),
    )

    _user_fk("workflows", "submitted_by")
    _user_fk("model_runs", "submitted_by")
    for table in ("workflows", "model_runs"):  # removing a user finds their records by index
        op.create_index(
            f"{table}_submitted_by_idx",
            table,
            ["submitted_by"],
            postgresql_where=sa.text("submitted_by IS NOT NULL"),
        )
    for table in DAFNI_TABLES:
        _user_fk(table, "owner_id")
        op.execute(f"UPDATE {table} t SET owner_id = u.id FROM api_users u WHERE u.name = t.owner")
    op.drop_constraint("dafni_instances_idempotency_key", "dafni_instances")
    op.create_unique_constraint(
        "dafni_instances_idempotency_key", "dafni_instances", ["owner_id", "idempotency_key"]
    )

    existing = _roles()
    if READONLY in existing:
        op.execute(f"GRANT SELECT (role) ON api_users TO {READONLY}")
    if ADMIN in existing:
        op.execute(f"GRANT ALL ON api_login_failures TO {ADMIN}")
        op.execute(
            f"""
DO $owner$
BEGIN
    IF (SELECT relowner FROM pg_class WHERE oid = 'jobs'::regclass)
       = (SELECT oid FROM pg_roles WHERE rolname = '{ADMIN}') THEN
        ALTER TABLE api_login_failures OWNER TO {ADMIN};
    END IF;
END
$owner$"""
        )


def downgrade() -> None:
    existing = _roles()
    if READONLY in existing:
        op.execute(f"REVOKE SELECT (role) ON api_users FROM {READONLY}")
    op.drop_constraint("dafni_instances_idempotency_key", "dafni_instances")
    op.create_unique_constraint(
        "dafni_instances_idempotency_key", "dafni_instances", ["owner", "idempotency_key"]
    )
    for table in DAFNI_TABLES:
        op.drop_column(table, "owner_id")
    for table in ("workflows", "model_runs"):
        op.drop_index(f"{table}_submitted_by_idx", table)
        op.drop_column(table, "submitted_by")
    op.drop_table("api_login_failures")
    # Tokens 0009 cannot hold (long-lived, cookie sessions, spent refresh tokens) go.
    op.execute(
        "DELETE FROM api_tokens WHERE kind NOT IN ('access', 'refresh') "
        "OR expires_at IS NULL OR spent_at IS NOT NULL"
    )
    op.drop_index("api_tokens_session_idx", "api_tokens")
    op.drop_constraint("api_tokens_kind_check", "api_tokens")
    op.create_check_constraint("api_tokens_kind_check", "api_tokens", OLD_KINDS)
    op.alter_column("api_tokens", "expires_at", nullable=False)
    for column in ("spent_at", "session_id", "name"):
        op.drop_column("api_tokens", column)
    op.drop_constraint("api_tokens_id_key", "api_tokens")
    op.drop_column("api_tokens", "id")
    op.drop_constraint("api_users_role_check", "api_users")
    op.drop_column("api_users", "role")
