"""The data layer: every SQL statement smifdb runs lives in this package, one module a concern.

- ``submit``:  writing a validated DAG (COPY, one transaction)
- ``queue``:   claiming, finishing, releasing and rescuing jobs — the hot path
- ``control``: cancelling workflows and jobs
- ``runners``: registration, heartbeats, status
- ``modelruns``: model runs and their bundles (the manager's state)
- ``read``:    progress and listings for the CLI and API
- ``views``:   reads through the SQL views (docs/sql.md) for `smifdb status` and `audit`
- ``blobs``:   the blob store: files by SHA-256 in chunks, and the records that name them
- ``prune``:   retention: deleting what finished long ago, in many short transactions that
  touch only finished rows and skip any workflow row another session holds (SKIP LOCKED)

Callers pass psycopg connections in autocommit mode; each function that writes more than one
row opens exactly one transaction. Every transaction that locks several job rows locks them
in ascending id order, in one statement, before it locks any workflow row: no deadlocks.
"""

from __future__ import annotations

import os
import socket

import psycopg

READY_CHANNEL = "smifdb_ready"  # payload: workflow id; sent once per committing batch
CANCEL_CHANNEL = "smifdb_cancel"  # payload: workflow id; runners check their jobs at once
FINISHED_CHANNEL = "smifdb_finished"  # payload: workflow id; `smifdb wait` wakes up
MODEL_RUN_CHANNEL = "smifdb_model_run"  # payload: model run id, when one ends

# The migration this code expects: alembic's head, written down so that starting a runner or a
# CLI command need not import alembic (0.2 s) to find it. tests/test_migrations.py checks it.
SCHEMA_REVISION = "0014"


# A workflow `w`'s finished jobs: the sum of its sessions' counts (migration 0009).
FINISHED_JOBS = (
    "(SELECT coalesce(sum(n.finished), 0)::int FROM workflow_counts n WHERE n.workflow_id = w.id)"
)
# Jobs `j` running under open claims `c` (its leases), each job fenced to its claim; the query
# adds `WHERE c.closed_at IS NULL` (claims_open_idx) and whatever else it needs.
UNDER_OPEN_CLAIMS = """
FROM claims c
CROSS JOIN LATERAL unnest(c.job_ids) AS u(job_id)
JOIN jobs j ON j.id = u.job_id
  AND j.status = 'running' AND j.lease_owner = c.owner AND j.started_at = c.claimed_at
"""


class SchemaError(RuntimeError):
    """The database is reachable but not migrated to this smifdb's schema."""


def actor_name(role: str) -> str:
    """Who made a change, for the audit log: role, host and process."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def check_schema(conn: psycopg.Connection) -> None:
    """Fail with a clear message, not a missing-table error, on an unmigrated database."""
    version = None
    if conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL").fetchone()[0]:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        version = row[0] if row else None
    expected = SCHEMA_REVISION
    if version != expected:
        raise SchemaError(
            f"database schema is at revision {version or 'none'} but this smifdb needs "
            f"{expected}: run `smifdb db upgrade`"
        )


def listen(conn: psycopg.Connection, *channels: str) -> None:
    for channel in channels:
        conn.execute(f"LISTEN {channel}")


def notify(conn: psycopg.Connection, channel: str, payload: object) -> None:
    """NOTIFY takes a global lock at commit: callers send one per transaction, never per row."""
    conn.execute("SELECT pg_notify(%s, %s)", (channel, str(payload)))
