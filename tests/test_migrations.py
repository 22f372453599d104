"""Migrations: up, down to base, up again, and no drift from smifdb.schema.metadata."""

from __future__ import annotations

import psycopg

from smifdb import migrate
from smifdb.store.views import VIEWS

DATASET_TABLES = {  # 0012
    "dafni_datasets",
    "dafni_dataset_versions",
    "dafni_dataset_metadata",
    "dafni_dataset_files",
    "dafni_dataset_uploads",
    "dafni_dataset_upload_files",
}
TABLES = {
    "model_runs",
    "workflows",
    "jobs",
    "job_edges",
    "runners",
    "events",
    "api_users",
    "api_tokens",
    "api_login_failures",
    "dafni_models",
    "dafni_model_uploads",
    "dafni_workflows",
    "dafni_parameter_sets",
    "dafni_instances",
    "ready_jobs",
    "claims",
    "workflow_counts",
    "blobs",
    "blob_chunks",
    "workflow_files",
    "job_outputs",
    "model_run_files",
    *DATASET_TABLES,
}


def _tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in rows} - {"alembic_version"}


def _views(dsn: str) -> set[str]:
    """Views are not in smifdb.schema's metadata (the drift check compares tables only)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT viewname FROM pg_views WHERE schemaname = 'public'").fetchall()
    return {r[0] for r in rows}


def _types(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT typname FROM pg_type WHERE typtype = 'e'").fetchall()
    return {r[0] for r in rows}


def test_round_trip_and_no_drift(empty_dsn: str) -> None:
    assert migrate.current(empty_dsn) is None
    migrate.upgrade(empty_dsn)
    assert migrate.current(empty_dsn) == migrate.head()
    assert _tables(empty_dsn) == TABLES
    assert _views(empty_dsn) == set(VIEWS)
    assert migrate.drift(empty_dsn) == []

    migrate.downgrade(empty_dsn, "base")
    assert migrate.current(empty_dsn) is None
    assert _tables(empty_dsn) == set()
    assert _views(empty_dsn) == set()
    assert _types(empty_dsn) == set()

    migrate.upgrade(empty_dsn)
    assert migrate.current(empty_dsn) == migrate.head()
    assert migrate.drift(empty_dsn) == []


def test_drift_is_detected(dsn: str) -> None:
    """The no-drift check can fail: a column the metadata does not know shows up."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE jobs ADD COLUMN stray integer")
        conn.execute("DROP INDEX ready_jobs_claim_idx")
    diffs = migrate.drift(dsn)
    kinds = {d[0] if isinstance(d, tuple) else d[0][0] for d in diffs}
    assert "add_index" in kinds  # the missing claim index
    assert "remove_column" in kinds  # the stray column


def test_queue_tables_have_autovacuum_settings(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        options = dict(
            conn.execute(
                "SELECT relname, reloptions FROM pg_class WHERE relname IN ('jobs', 'runners')"
            ).fetchall()
        )
    assert "fillfactor=50" in options["jobs"]  # room on each page for HOT status updates
    assert "autovacuum_vacuum_scale_factor=0.01" in options["jobs"]
    assert any(o.startswith("autovacuum_vacuum_threshold") for o in options["runners"])


def test_statuses_are_enforced(conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO workflows (name, job_count) VALUES ('w', 1)")
    try:
        conn.execute("UPDATE workflows SET status = 'exploded'")
    except psycopg.errors.InvalidTextRepresentation:
        pass
    else:
        raise AssertionError("an unknown workflow status was accepted")


def test_code_expects_the_newest_migration() -> None:
    """store.SCHEMA_REVISION (what commands check at start) is alembic's head: update it with
    every new migration."""
    from smifdb import store

    assert migrate.head() == store.SCHEMA_REVISION


def test_runner_load_gains_claims_and_keeps_everything_else_both_ways(dsn: str) -> None:
    """0008 changes a view in place both ways: its grants (with grant options), column grants,
    options and the views built on it survive, and 0007's own downgrade still works."""

    def view() -> tuple:
        with psycopg.connect(dsn) as conn:
            columns = conn.execute(
                "SELECT attname, coalesce(attacl::text, '') FROM pg_attribute"
                " WHERE attrelid = 'smifdb_runner_load'::regclass AND attnum > 0 ORDER BY attnum"
            )
            rest = conn.execute(
                "SELECT relowner::regrole::text, coalesce(relacl::text, ''), reloptions"
                " FROM pg_class WHERE oid = 'smifdb_runner_load'::regclass"
            )
            return columns.fetchall(), *rest.fetchone()

    def claims() -> list:
        with psycopg.connect(dsn) as conn:
            return conn.execute("SELECT jobs_claimed FROM smifdb_runner_load").fetchall()

    role = f"reader_{abs(hash(dsn)) % 10**8}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO runners (name, slots, jobs_claimed) VALUES ('r', 1, 7)")
        conn.execute(f"CREATE ROLE {role}")
        conn.execute(f"GRANT SELECT ON smifdb_runner_load TO {role} WITH GRANT OPTION")
        conn.execute(f"GRANT SELECT (runner, state) ON smifdb_runner_load TO {role}")
        conn.execute("ALTER VIEW smifdb_runner_load SET (security_invoker = true)")
        conn.execute("CREATE VIEW busy_runners AS SELECT runner FROM smifdb_runner_load")
    try:
        before = view()
        assert [c for c, _ in before[0]][-2:] == ["last_heartbeat_at", "jobs_claimed"]
        assert "smifdb_readonly=r/" in before[2] and f"{role}=r*/" in before[2]
        assert claims() == [(7,)]

        migrate.downgrade(dsn, "0007")
        assert view() == before and claims() == [(None,)]
        migrate.upgrade(dsn)
        assert view() == before and claims() == [(7,)]

        migrate.downgrade(dsn, "0006")  # 0007 drops runners.jobs_claimed: nothing depends on it
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP VIEW IF EXISTS busy_runners")
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_0009_moves_the_queue_out_of_jobs_and_back(empty_dsn: str) -> None:
    """Ready jobs to ready_jobs, leases to claims, the finished count to workflow_counts, a
    running attempt's claim event to the job (until its end records it); and back again."""
    migrate.upgrade(empty_dsn, "0008")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        wf = conn.execute(
            "INSERT INTO workflows (name, status, job_count, unfinished_jobs)"
            " VALUES ('w', 'running', 4, 3) RETURNING id"
        ).fetchone()[0]
        ids = {}
        for key, status in (("a", "succeeded"), ("b", "ready"), ("c", "running"), ("d", "waiting")):
            ids[key] = conn.execute(
                "INSERT INTO jobs (workflow_id, key, kind, payload, status, priority)"
                " VALUES (%s, %s, 'python', '{}', %s, 3) RETURNING id",
                [wf, key, status],
            ).fetchone()[0]
        conn.execute("UPDATE jobs SET not_before = '2030-01-01Z' WHERE id = %s", [ids["b"]])
        started, expires = "2026-12-01 10:00:00Z", "2026-12-01 10:05:00Z"
        conn.execute(
            "UPDATE jobs SET attempts = 1, lease_owner = 'r1', started_at = %s,"
            " lease_expires_at = %s WHERE id = %s",
            [started, expires, ids["c"]],
        )
        # An earlier attempt 1, released (not counted), then the attempt 1 now running.
        released = "2026-12-01 09:00:00Z"
        for at, frm, to, reason in (
            (released, "ready", "running", "claimed"),
            (released, "running", "ready", "released: runner shutting down"),
            (started, "ready", "running", "claimed"),
        ):
            conn.execute(
                "INSERT INTO events (at, workflow_id, job_id, from_status, to_status, attempt,"
                " actor, reason) VALUES (%s, %s, %s, %s, %s, 1, 'r1', %s)",
                [at, wf, ids["c"], frm, to, reason],
            )

    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT job_id, workflow_id, priority FROM ready_jobs").fetchall() == [
            (ids["b"], wf, 3)
        ]
        claims = conn.execute(
            "SELECT workflow_id, owner, claimed_at = %s, expires_at = %s, job_ids, closed_at"
            " FROM claims",
            [started, expires],
        ).fetchall()
        assert claims == [(wf, "r1", True, True, [ids["c"]], None)]
        assert conn.execute(
            "SELECT jobs_done FROM smifdb_workflow_progress WHERE workflow_id = %s", [wf]
        ).fetchone() == (1,)
        # The running attempt's claim moved to the job; the released attempt's stays.
        assert conn.execute(
            "SELECT at = %s FROM events WHERE reason = 'claimed'", [released]
        ).fetchall() == [(True,)]
        claim = conn.execute(
            "SELECT event_id IS NULL, at = %s, actor, attempt FROM smifdb_job_history"
            " WHERE job_id = %s AND reason = 'claimed' ORDER BY event_id NULLS LAST",
            [started, ids["c"]],
        ).fetchall()
        # The released attempt's claim event, then the running one's, from the job.
        assert claim == [(False, False, "r1", 1), (True, True, "r1", 1)]

    migrate.downgrade(empty_dsn, "0008")
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT unfinished_jobs FROM workflows").fetchone() == (3,)
        assert conn.execute(
            "SELECT lease_expires_at = %s FROM jobs WHERE id = %s", [expires, ids["c"]]
        ).fetchone() == (True,)
        assert conn.execute(
            "SELECT job_id, attempt, actor, at = %s FROM events WHERE reason = 'claimed'"
            " ORDER BY at",
            [started],
        ).fetchall() == [(ids["c"], 1, "r1", False), (ids["c"], 1, "r1", True)]


def test_0010_links_records_to_users_by_id_and_back(empty_dsn: str) -> None:
    """DAFNI records get their owner's id by name; existing tokens and users keep working
    (users become operators); the downgrade drops what 0009 cannot hold."""
    migrate.upgrade(empty_dsn, "0009")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        alice = conn.execute(
            "INSERT INTO api_users (name, password_hash) VALUES ('alice', 'x') RETURNING id"
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO api_tokens (token_hash, user_id, kind, expires_at)"
            " VALUES ('\\x01', %s, 'access', now() + interval '1 h')",
            [alice],
        )
        for owner in ("alice", "gone"):
            conn.execute(
                "INSERT INTO dafni_models (model_id, definition, owner)"
                " VALUES (gen_random_uuid(), '{}', %s)",
                [owner],
            )
    migrate.upgrade(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        owners = dict(conn.execute("SELECT owner, owner_id FROM dafni_models").fetchall())
        assert owners == {"alice": alice, "gone": None}
        assert conn.execute("SELECT role FROM api_users").fetchone()[0] == "operator"
        token = conn.execute("SELECT id, kind, session_id FROM api_tokens").fetchone()
        assert token[0] is not None and token[1:] == ("access", None)
        conn.execute(
            "INSERT INTO api_tokens (token_hash, user_id, kind, expires_at, name)"
            " VALUES ('\\x02', %s, 'api', NULL, 'ci')",
            [alice],
        )
    migrate.downgrade(empty_dsn, "0009")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        kinds = [r[0] for r in conn.execute("SELECT kind FROM api_tokens")]
        assert kinds == ["access"]  # the never-expiring api token had no place in 0009
        assert conn.execute("SELECT count(*) FROM dafni_models").fetchone()[0] == 2


def test_blob_store_down_and_up(dsn: str) -> None:
    """0011 down drops exactly its five tables (files stored in them too); up restores them."""
    blob_tables = {"blobs", "blob_chunks", "workflow_files", "job_outputs", "model_run_files"}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO blobs (sha256, size, chunks) VALUES (sha256(''), 0, 0)")
    migrate.downgrade(dsn, "0010")
    assert _tables(dsn) == TABLES - blob_tables - DATASET_TABLES  # 0012 needs 0011
    migrate.upgrade(dsn)
    assert _tables(dsn) == TABLES
    assert migrate.drift(dsn) == []
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM blobs").fetchone() == (0,)


def _edge_foreign_keys(conn: psycopg.Connection) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'job_edges'::regclass"
            " AND contype = 'f' ORDER BY conname"
        )
    ]


def test_0013_drops_the_edge_foreign_keys_and_down_restores_them(dsn: str) -> None:
    """Down deletes edges whose jobs are gone (the keys could not be added over them) and keeps
    the rest; up drops the keys again."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert _edge_foreign_keys(conn) == []
        wf = conn.execute(
            "INSERT INTO workflows (name, job_count) VALUES ('w', 2) RETURNING id"
        ).fetchone()[0]
        a, b = (
            conn.execute(
                "INSERT INTO jobs (workflow_id, key, kind, payload, status)"
                " VALUES (%s, %s, 'command', '{}', 'waiting') RETURNING id",
                [wf, key],
            ).fetchone()[0]
            for key in ("a", "b")
        )
        conn.execute("INSERT INTO job_edges VALUES (%s, %s), (%s, -1)", [a, b, a])
    migrate.downgrade(dsn, "0012")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert _edge_foreign_keys(conn) == ["job_edges_child_id_fkey", "job_edges_parent_id_fkey"]
        assert conn.execute("SELECT parent_id, child_id FROM job_edges").fetchall() == [(a, b)]
    migrate.upgrade(dsn)
    assert migrate.drift(dsn) == []
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert _edge_foreign_keys(conn) == []
