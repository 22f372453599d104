"""Reads through the SQL views of migration 0004 (docs/sql.md): `smifdb status` and `audit`.

The views are the documented interface for psql users too, so the CLI asks them rather than
the tables: what it prints is what anyone with `smifdb_readonly` can query.
"""

from __future__ import annotations

import psycopg
from psycopg.rows import dict_row

# Not in smifdb.schema's metadata (which holds tables only): migrations/versions/0004_views.py
# creates them, tests/test_migrations.py checks the list.
VIEWS = (
    "smifdb_workflow_progress",
    "smifdb_model_run_progress",
    "smifdb_job_history",
    "smifdb_runner_load",
    "smifdb_queue_health",
    "smifdb_slowest_jobs",
    "smifdb_failure_reasons",
)

# The runner state 'lost' depends on how long silence may last (smifdb_runner_load reads it).
_DEAD_AFTER = "SELECT set_config('smifdb.dead_after', %s, false)"
_QUEUE_HEALTH = "SELECT * FROM smifdb_queue_health"
_RUNNER_LOAD = "SELECT * FROM smifdb_runner_load ORDER BY runner"
_RECENT_WORKFLOWS = "SELECT * FROM smifdb_workflow_progress ORDER BY workflow_id DESC LIMIT %s"
_WORKFLOW = "SELECT * FROM smifdb_workflow_progress WHERE workflow_id = %s"
_RUNNING_OR_FAILED = """
SELECT * FROM smifdb_slowest_jobs
WHERE workflow_id = %s AND status IN ('running', 'failed')
ORDER BY status <> 'running', duration_seconds DESC, job_id
LIMIT %s
"""
_FAILURES = "SELECT * FROM smifdb_failure_reasons WHERE workflow_id = %s"
# Newest first with a LIMIT, returned oldest first: the last N events, in order. A claim shares
# the id of the event that ended its attempt (and comes first: it is older); the claim of an
# attempt still running has no id yet and is the newest.
_NEWEST_FIRST = "ORDER BY event_id DESC NULLS FIRST, at DESC LIMIT %(limit)s"
_WORKFLOW_HISTORY = f"SELECT * FROM smifdb_job_history WHERE workflow_id = %(id)s {_NEWEST_FIRST}"
_JOB_HISTORY = f"SELECT * FROM smifdb_job_history WHERE job_id = %(id)s {_NEWEST_FIRST}"
# The latest events anywhere: find the id of the Nth newest on events_pkey first, then ask the
# view for ids from there — a known bound the planner turns into two index range scans (an
# ORDER BY … LIMIT over the view's join would read every event).
_NTH_NEWEST_EVENT = """
SELECT id FROM events WHERE workflow_id IS NOT NULL ORDER BY id DESC OFFSET %s LIMIT 1
"""
_HISTORY_FROM = "SELECT * FROM smifdb_job_history WHERE event_id >= %s ORDER BY event_id, at"


def _rows(conn: psycopg.Connection, query: str, params: object = None) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def overview(conn: psycopg.Connection, *, dead_after: float = 30.0, workflows: int = 10) -> dict:
    """Queue health, every runner's load, and the newest workflows' progress."""
    conn.execute(_DEAD_AFTER, [str(dead_after)])
    return {
        "queue": _rows(conn, _QUEUE_HEALTH)[0],
        "runners": _rows(conn, _RUNNER_LOAD),
        "workflows": _rows(conn, _RECENT_WORKFLOWS, [workflows]),
    }


def workflow_status(conn: psycopg.Connection, workflow_id: int, *, jobs: int = 50) -> dict | None:
    """One workflow's progress, its running and failed jobs, and why jobs failed; None if absent."""
    progress = _rows(conn, _WORKFLOW, [workflow_id])
    if not progress:
        return None
    return {
        "workflow": progress[0],
        "jobs": _rows(conn, _RUNNING_OR_FAILED, [workflow_id, jobs]),
        "failures": _rows(conn, _FAILURES, [workflow_id]),
    }


def workflow_exists(conn: psycopg.Connection, workflow_id: int) -> bool:
    return bool(_rows(conn, _WORKFLOW, [workflow_id]))


def history(
    conn: psycopg.Connection,
    *,
    workflow_id: int | None = None,
    job_id: int | None = None,
    limit: int = 100,
) -> list[dict]:
    """The last ``limit`` events (0: all) of a workflow, of a job, or anywhere, oldest first."""
    params = {"id": job_id if job_id is not None else workflow_id, "limit": limit or None}
    if job_id is not None:
        rows = _rows(conn, _JOB_HISTORY, params)  # LIMIT NULL is no limit
    elif workflow_id is not None:
        rows = _rows(conn, _WORKFLOW_HISTORY, params)
    else:
        bound = conn.execute(_NTH_NEWEST_EVENT, [limit - 1]).fetchone() if limit else None
        rows = _rows(conn, _HISTORY_FROM, [bound[0] if bound else -(2**63)])
        return rows[-limit:] if limit else rows  # claims add rows that share their end's id
    rows.reverse()
    return rows
