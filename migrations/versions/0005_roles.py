"""Group roles: smifdb_readonly, smifdb_runner and smifdb_admin (docs/operations.md, "Roles").

Roles belong to the whole server but grants to one database, and tests (or sites) migrate many
databases on one server. So: a role is created only if missing (a concurrent migration of
another database may create it first), grants are made afresh in every database, and a
downgrade revokes in this database but drops a role only when nothing else uses it. A user
without CREATEROLE (a managed database) gets a NOTICE instead of a role, and the migration
still succeeds; the grants are made for whichever roles exist.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

import contextlib
import logging
from collections.abc import Iterator

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

log = logging.getLogger("smifdb.migrations")

READONLY, RUNNER, ADMIN = "smifdb_readonly", "smifdb_runner", "smifdb_admin"
ROLES = (READONLY, RUNNER, ADMIN)

# smifdb's objects as of this revision (a later revision that adds one grants it too).
CREDENTIALS = ("api_users", "api_tokens")
TABLES = (
    "model_runs",
    "workflows",
    "jobs",
    "job_edges",
    "runners",
    "events",
    "dafni_models",
    "dafni_model_uploads",
    "dafni_workflows",
    "dafni_parameter_sets",
    "dafni_instances",
    "alembic_version",
    *CREDENTIALS,
)
VIEWS = (
    "smifdb_workflow_progress",
    "smifdb_model_run_progress",
    "smifdb_job_history",
    "smifdb_runner_load",
    "smifdb_queue_health",
    "smifdb_slowest_jobs",
    "smifdb_failure_reasons",
)
TYPES = ("job_status", "workflow_status", "job_kind", "runner_state", "model_run_kind")

# Exactly what `smifdb runner run` uses, found by running one as a login with no privileges
# and granting what each failure named (tests/test_roles.py runs one as smifdb_runner).
# Identity columns need no sequence privilege; LISTEN/NOTIFY need none.
RUNNER_GRANTS = {
    "alembic_version": "SELECT",  # the schema check at start
    "jobs": "SELECT, UPDATE",  # claim, record, renew leases, rescue (FOR NO KEY UPDATE)
    "job_edges": "SELECT",  # children and descendants of finished jobs
    "workflows": "SELECT, UPDATE",  # start and settle workflows
    "events": "INSERT",  # the audit log: runners only append
    "runners": "SELECT, INSERT, UPDATE",  # register, heartbeat, mark lost
}
# Readers see everything but credentials: password hashes and token hashes stay private.
READONLY_API_USERS_COLUMNS = "id, name, created_at"

CREATE_ROLES = f"""
DO $roles$
DECLARE
    may_create boolean := (SELECT rolsuper OR rolcreaterole FROM pg_roles
                           WHERE rolname = current_user);
    role text;
BEGIN
    FOREACH role IN ARRAY ARRAY{list(ROLES)!r} LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role);
        IF NOT may_create THEN
            RAISE NOTICE 'smifdb: role % not created: % lacks CREATEROLE. Have an '
                'administrator run CREATE ROLE % NOLOGIN, then smifdb db downgrade 0004 and '
                'smifdb db upgrade to grant it', role, current_user, role;
            CONTINUE;
        END IF;
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', role);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- a migration of another database on this server created it meanwhile
        END;
    END LOOP;
END
$roles$
"""


def _owned_by(owner: str, indent: str) -> str:
    """ALTER … OWNER TO statements for every object of this revision, one per line."""
    objects = [("TABLE", TABLES), ("VIEW", VIEWS), ("TYPE", TYPES)]
    return "\n".join(
        f"{indent}ALTER {kind} {name} OWNER TO {owner};"
        for kind, names in objects
        for name in names
    )


# DDL needs ownership: smifdb's objects become smifdb_admin's, and the migrating user joins
# smifdb_admin so that later migrations (and downgrades) still own them.
_ALTER_OWNERS = _owned_by(ADMIN, " " * 8)
GIVE_TO_ADMIN = f"""
DO $owner$
BEGIN
    IF NOT pg_has_role(current_user, '{ADMIN}', 'USAGE') THEN
        BEGIN
            GRANT {ADMIN} TO CURRENT_USER;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'smifdb: % may not join {ADMIN}, so smifdb''s tables stay owned by %: '
                '{ADMIN} gets every privilege on them but DDL', current_user, current_user;
            RETURN;
        END;
    END IF;
    BEGIN
{_ALTER_OWNERS}
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE NOTICE 'smifdb: smifdb''s objects stay owned by their owners (%): {ADMIN} gets '
            'every privilege on them but DDL', SQLERRM;
    END;
END
$owner$
"""

_TAKE_BACK = _owned_by("CURRENT_USER", " " * 4)
TAKE_BACK = f"""
DO $owner$
BEGIN
    IF (SELECT relowner FROM pg_class WHERE oid = 'jobs'::regclass)
       = (SELECT oid FROM pg_roles WHERE rolname = '{ADMIN}') THEN
{_TAKE_BACK}
    END IF;
END
$owner$
"""

# A role goes only if no one is a member (dropping it would silently take it from its login
# users) and no other database has grants to it (DROP ROLE refuses then).
DROP_UNUSED_ROLES = f"""
DO $roles$
DECLARE
    role text;
BEGIN
    FOREACH role IN ARRAY ARRAY{list(reversed(ROLES))!r} LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role);
        IF EXISTS (SELECT 1 FROM pg_auth_members m
                   WHERE m.roleid = (SELECT oid FROM pg_roles WHERE rolname = role)
                     AND m.member <> (SELECT oid FROM pg_roles WHERE rolname = current_user))
        THEN
            RAISE NOTICE 'smifdb: role % kept: it has members', role;
            CONTINUE;
        END IF;
        BEGIN
            EXECUTE format('DROP ROLE %I', role);
        EXCEPTION
            WHEN dependent_objects_still_exist THEN
                RAISE NOTICE 'smifdb: role % kept: other databases still use it', role;
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'smifdb: role % kept: % may not drop it', role, current_user;
        END;
    END LOOP;
END
$roles$
"""


@contextlib.contextmanager
def _notices_logged() -> Iterator[None]:
    """PostgreSQL's NOTICEs (a role skipped or kept) reach the person migrating as warnings."""
    driver = op.get_bind().connection.driver_connection

    def forward(diag) -> None:
        log.warning("%s", diag.message_primary)

    driver.add_notice_handler(forward)
    try:
        yield
    finally:
        driver.remove_notice_handler(forward)


def _existing(roles: tuple[str, ...]) -> set[str]:
    rows = op.get_bind().execute(
        sa.text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:roles)"), {"roles": list(roles)}
    )
    return {r[0] for r in rows}


def _may_grant_on_public(privilege: str) -> bool:
    query = "SELECT has_schema_privilege('public', :p)"
    return op.get_bind().execute(sa.text(query), {"p": f"{privilege} WITH GRANT OPTION"}).scalar()


def upgrade() -> None:
    with _notices_logged():
        op.execute(CREATE_ROLES)
        roles = _existing(ROLES)
        readable = [t for t in TABLES if t not in CREDENTIALS] + list(VIEWS)
        everything = list(TABLES) + list(VIEWS)
        if _may_grant_on_public("USAGE"):
            for role in sorted(roles):
                op.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        if READONLY in roles:
            op.execute(f"GRANT SELECT ON {', '.join(readable)} TO {READONLY}")
            op.execute(f"GRANT SELECT ({READONLY_API_USERS_COLUMNS}) ON api_users TO {READONLY}")
        if RUNNER in roles:
            for table, privileges in RUNNER_GRANTS.items():
                op.execute(f"GRANT {privileges} ON {table} TO {RUNNER}")
        if ADMIN in roles:
            op.execute(f"GRANT ALL ON {', '.join(everything)} TO {ADMIN}")
            if _may_grant_on_public("CREATE"):
                op.execute(f"GRANT CREATE ON SCHEMA public TO {ADMIN}")
            op.execute(GIVE_TO_ADMIN)


def downgrade() -> None:
    with _notices_logged():
        roles = _existing(ROLES)
        if ADMIN in roles:
            op.execute(TAKE_BACK)
        everything = list(TABLES) + list(VIEWS)
        on_public = _may_grant_on_public("USAGE")  # else upgrade granted nothing on it
        for role in sorted(roles):
            op.execute(f"REVOKE ALL ON {', '.join(everything)} FROM {role}")
            if on_public:
                op.execute(f"REVOKE USAGE, CREATE ON SCHEMA public FROM {role}")
        op.execute(DROP_UNUSED_ROLES)
