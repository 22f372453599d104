"""`smifdb_runner_load` shows each runner's claims total, `jobs_claimed` (added to `runners` by
0007), beside its succeeded and failed totals.

A view can gain a column at its end in place: CREATE OR REPLACE keeps its owner, grants and
the views built on it (its options, such as security_invoker, are restated), so the upgrade is
instant and needs nothing of the roles of 0005. It cannot lose one in place: the downgrade
leaves the column, always NULL (see OLD).

The definition is written out whole here, as 0004 wrote it: a migration is history and must
not change when a later one does.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

VIEW = "smifdb_runner_load"

DEAD_AFTER = (
    "make_interval(secs => coalesce(nullif(current_setting('smifdb.dead_after', true), '')"
    "::float8, 30))"
)

# 0004's columns, then the new one last.
_SELECT = f"""
SELECT r.name AS runner,
       r.host,
       r.pid,
       r.slots,
       CASE WHEN r.state IN ('active', 'draining')
                 AND r.last_heartbeat_at < now() - {DEAD_AFTER}
            THEN 'lost' ELSE r.state::text END AS state,
       coalesce(b.busy, 0) AS busy,
       extract(epoch FROM now() - r.last_heartbeat_at)::float8 AS heartbeat_age_seconds,
       coalesce(h.succeeded, 0) AS succeeded_last_hour,
       coalesce(h.failed, 0) AS failed_last_hour,
       r.jobs_succeeded,
       r.jobs_failed,
       r.registered_at,
       r.last_heartbeat_at{{extra}}
FROM runners r
LEFT JOIN (
    SELECT lease_owner, count(*)::int AS busy FROM jobs
    WHERE status = 'running' GROUP BY lease_owner
) b ON b.lease_owner = r.name
LEFT JOIN (
    SELECT actor,
           count(*) FILTER (WHERE to_status = 'succeeded')::int AS succeeded,
           count(*) FILTER (
               WHERE to_status IN ('failed', 'ready')
                 AND coalesce(reason, '') NOT LIKE 'rescued:%'
                 AND coalesce(reason, '') NOT LIKE 'released:%')::int AS failed
    FROM events
    -- Both bounds, so that the planner estimates a narrow range of events_pkey (it cannot
    -- know the values): one bound alone is guessed at a third of the table and seq-scanned.
    WHERE id > (SELECT coalesce(max(id), 0) FROM events WHERE at < now() - interval '1 hour')
      AND id <= (SELECT max(id) FROM events)
      AND at >= now() - interval '1 hour'
      AND from_status = 'running' AND job_id IS NOT NULL
    GROUP BY actor
) h ON h.actor = r.name
"""
NEW = _SELECT.format(extra=",\n       r.jobs_claimed")
# A view cannot lose a column without being dropped, which would take with it its grants
# (with their grant options and grantors), column grants and the views built on it. So the
# downgrade keeps the column, always NULL: 0007's code reads the view by name, and 0007's own
# downgrade can then drop runners.jobs_claimed.
OLD = _SELECT.format(extra=",\n       NULL::bigint AS jobs_claimed")

_OPTIONS = f"SELECT reloptions FROM pg_class WHERE oid = '{VIEW}'::regclass"


def _replace(query: str) -> None:
    """CREATE OR REPLACE keeps owner, grants and dependants; its options must be restated."""
    options = op.get_bind().exec_driver_sql(_OPTIONS).scalar()
    with_options = f" WITH ({', '.join(options)})" if options else ""
    op.execute(f"CREATE OR REPLACE VIEW {VIEW}{with_options} AS {query}")


def upgrade() -> None:
    _replace(NEW)


def downgrade() -> None:
    _replace(OLD)
