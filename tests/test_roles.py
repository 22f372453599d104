"""Roles (migration 0005): what login users granted smifdb_readonly, smifdb_runner or
smifdb_admin can and cannot do, and migrating without CREATEROLE or with other databases."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from processes import Runners, cli, wait_for
from psycopg import conninfo, sql

import smifdb
from smifdb import migrate
from smifdb.pgserver import ThrowawayCluster
from smifdb.store.views import VIEWS

Login = Callable[[str, str], str]


def _superuser(server: str) -> psycopg.Connection:
    return psycopg.connect(conninfo.make_conninfo(server, dbname="postgres"), autocommit=True)


def _create_login(server: str, name: str, *grants: str, options: str = "") -> None:
    with _superuser(server) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN " + options).format(sql.Identifier(name)))
        for group in grants:
            conn.execute(sql.SQL("GRANT {} TO {}").format(*map(sql.Identifier, (group, name))))


def _drop_login(server: str, name: str) -> None:
    with _superuser(server) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def login(pg_server: str) -> Iterator[Login]:
    """login(group, dsn): a new login role granted ``group``, and a DSN for it; dropped after."""
    made: list[str] = []

    def make(group: str, dsn: str) -> str:
        name = f"t_{group.removeprefix('smifdb_')}_{uuid.uuid4().hex[:8]}"
        _create_login(pg_server, name, group, options="PASSWORD 'not-a-secret'")
        made.append(name)
        return conninfo.make_conninfo(dsn, user=name, password="not-a-secret")

    yield make
    for name in made:
        _drop_login(pg_server, name)


def denied(dsn: str, statement: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            return True
    return False


JOBS = {
    "jobs": [
        {"key": "ok", "command": "true"},
        {"key": "flaky", "command": "exit 1", "max_attempts": 2, "retry_backoff": 0.05},
        {
            "key": "after_ok",
            "python": "smifdb.examples:sleep",
            "args": {"seconds": 1},
            "after": ["ok"],
        },
        {"key": "after_flaky", "command": "true", "after": ["flaky"]},
    ]
}


def test_readonly_login_reads_status_but_writes_nothing(dsn, conn, login, tmp_path) -> None:
    wf = smifdb.submit(conn, {"jobs": [{"key": "a", "command": "true"}]})
    reader = login("smifdb_readonly", dsn)
    with psycopg.connect(reader) as ro:
        for view in VIEWS:
            ro.execute(f"SELECT * FROM {view}").fetchall()
        assert ro.execute("SELECT count(*) FROM jobs").fetchone() == (1,)
        assert ro.execute("SELECT name FROM api_users").fetchall() == []
    for args in (["status"], ["status", str(wf)], ["audit", str(wf)], ["status", "--json"]):
        out = cli(reader, *args)
        assert out.returncode == 0, (args, out.stderr)
    assert "pending" in cli(reader, "status", str(wf)).stdout

    assert denied(reader, "UPDATE jobs SET priority = 1")
    assert denied(reader, "DELETE FROM events")
    assert denied(reader, "INSERT INTO runners (name, slots) VALUES ('x', 1)")
    assert denied(reader, "SELECT password_hash FROM api_users")
    assert denied(reader, "SELECT * FROM api_tokens")
    refused = cli(reader, "cancel", str(wf))
    assert refused.returncode == 1, refused.stderr
    assert "the database refused: permission denied" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    assert conn.execute("SELECT status::text FROM workflows").fetchone() == ("pending",)


def test_runner_login_runs_jobs_but_cannot_change_the_schema(dsn, conn, login, tmp_path) -> None:
    wf = smifdb.submit(conn, JOBS)
    runner_dsn = login("smifdb_runner", dsn)
    runners = Runners(runner_dsn, tmp_path)
    try:
        # --dead-after 0.5: the heartbeat's lost-runner checks and rescues run too.
        proc = runners.start("--slots", "2", "--exit-when-idle", "--dead-after", "0.5", name="rr")
        assert proc.wait(timeout=60) == 0, runners.output("rr")
    finally:
        runners.close()
    assert "denied" not in runners.output("rr")
    statuses = dict(conn.execute("SELECT key, status::text FROM jobs WHERE workflow_id = %s", [wf]))
    assert statuses == {
        "ok": "succeeded",
        "after_ok": "succeeded",
        "flaky": "failed",
        "after_flaky": "upstream_failed",
    }
    claimed = "FROM smifdb_job_history WHERE reason = 'claimed'"
    actors = {r[0] for r in conn.execute(f"SELECT actor {claimed}")}
    assert actors == {"rr"}
    assert conn.execute("SELECT jobs_succeeded, jobs_failed FROM runners").fetchone() == (2, 2)
    claims = conn.execute(f"SELECT count(*) {claimed}").fetchone()[0]
    assert conn.execute("SELECT jobs_claimed FROM runners").fetchone()[0] == claims

    assert denied(runner_dsn, "DROP TABLE jobs")
    assert denied(runner_dsn, "ALTER TABLE jobs ADD COLUMN stray integer")
    assert denied(runner_dsn, "DROP VIEW smifdb_queue_health")
    assert denied(runner_dsn, "DELETE FROM events")
    assert denied(runner_dsn, "UPDATE events SET reason = 'forged'")
    assert denied(runner_dsn, "INSERT INTO workflows (name, job_count) VALUES ('x', 1)")
    assert denied(runner_dsn, "SELECT * FROM api_users")


def test_admin_login_owns_smifdb_objects(dsn, login) -> None:
    admin = login("smifdb_admin", dsn)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("ALTER TABLE jobs ADD COLUMN note text")
        conn.execute("UPDATE jobs SET note = 'x'")
        conn.execute("ALTER TABLE jobs DROP COLUMN note")
        conn.execute("COMMENT ON VIEW smifdb_queue_health IS 'owned by smifdb_admin'")
        conn.execute("ALTER TYPE job_kind ADD VALUE IF NOT EXISTS 'command'")
        assert conn.execute("SELECT password_hash FROM api_users").fetchall() == []
    assert migrate.current(admin) == migrate.head()


def test_migrating_as_an_owner_without_createrole(pg_server, login, caplog) -> None:
    """A managed database: the roles exist already (made by someone else), and the migrating
    user may neither create roles nor join smifdb_admin. Grants are made; the tables stay its."""
    name = f"t_owner_{uuid.uuid4().hex[:8]}"
    database = f"smifdb_{name}"
    _create_login(pg_server, name)
    with _superuser(pg_server) as su:
        su.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(*map(sql.Identifier, (database, name)))
        )
    owner_dsn = conninfo.make_conninfo(pg_server, dbname=database, user=name)
    try:
        with caplog.at_level(logging.WARNING, logger="smifdb.migrations"):
            migrate.upgrade(owner_dsn)
        assert migrate.current(owner_dsn) == migrate.head()
        assert f"{name} may not join smifdb_admin" in caplog.text
        with psycopg.connect(owner_dsn) as conn:
            owner = conn.execute(
                "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'jobs'"
            )
            assert owner.fetchone() == (name,)
            may = conn.execute(
                "SELECT has_table_privilege('smifdb_readonly', 'smifdb_job_history', 'SELECT'),"
                " has_table_privilege('smifdb_runner', 'jobs', 'UPDATE'),"
                " has_table_privilege('smifdb_runner', 'jobs', 'DELETE'),"
                " has_table_privilege('smifdb_admin', 'jobs', 'DELETE')"
            )
            assert may.fetchone() == (True, True, False, True)
        # A reader of this database reads it.
        reader = login("smifdb_readonly", owner_dsn)
        assert cli(reader, "status").returncode == 0
        migrate.downgrade(owner_dsn, "base")  # revokes here; the roles stay for the others
    finally:
        with _superuser(pg_server) as su:
            su.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
            )
        _drop_login(pg_server, name)


def test_roles_on_a_fresh_server(tmp_path: Path, caplog) -> None:
    """Creating roles only when allowed, and dropping them only when no one uses them: on a
    server of its own, where no other test's database holds grants."""
    with ThrowawayCluster() as server:
        with _superuser(server) as su:
            su.execute("CREATE ROLE plain LOGIN")
            for db, owner in (("plain_db", "plain"), ("a", "postgres"), ("b", "postgres")):
                su.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(db), sql.Identifier(owner)
                    )
                )

        def roles() -> set[str]:
            with _superuser(server) as su:
                rows = su.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'smifdb_%'")
                return {r[0] for r in rows}

        # No CREATEROLE and no roles yet: a notice per role, and the migration succeeds.
        plain = conninfo.make_conninfo(server, dbname="plain_db", user="plain")
        with caplog.at_level(logging.WARNING, logger="smifdb.migrations"):
            migrate.upgrade(plain)
        assert migrate.current(plain) == migrate.head()
        assert roles() == set()
        assert caplog.text.count("lacks CREATEROLE") == 3

        a, b = (conninfo.make_conninfo(server, dbname=d) for d in ("a", "b"))
        migrate.upgrade(a)
        migrate.upgrade(b)  # the roles exist now: created once, granted in both
        assert roles() == {"smifdb_readonly", "smifdb_runner", "smifdb_admin"}
        with _superuser(server) as su:
            su.execute("CREATE ROLE alice LOGIN")
            su.execute("GRANT smifdb_readonly TO alice")

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="smifdb.migrations"):
            migrate.downgrade(a, "0004")
        assert roles() == {"smifdb_readonly", "smifdb_runner", "smifdb_admin"}  # b uses them
        assert "other databases still use it" in caplog.text
        with psycopg.connect(a) as conn:  # nothing is left granted in a
            acl = conn.execute(
                "SELECT coalesce(relacl::text, '') FROM pg_class WHERE relname = 'jobs'"
            )
            assert "smifdb_" not in acl.fetchone()[0]

        migrate.downgrade(b, "0004")
        assert roles() == {"smifdb_readonly"}  # alice is a member: kept for her
        with _superuser(server) as su:
            su.execute("DROP ROLE alice")
        migrate.upgrade(b)
        migrate.downgrade(b, "base")
        assert roles() == set()


def test_a_runner_short_of_connections_claims_nothing_and_says_why(
    dsn, conn, login, pg_server, tmp_path
) -> None:
    """Issue 17's saturation bug: a runner that got its claim connection but not its heartbeat
    one claimed and ran jobs without ever heartbeating, so its peers declared it lost and its
    succeeded jobs ended failed. Now it claims nothing until it can heartbeat, and says why."""
    wf = smifdb.submit(conn, {"jobs": [{"key": f"j{i}", "command": "true"} for i in range(4)]})
    runner_dsn = login("smifdb_runner", dsn)
    role = sql.Identifier(conninfo.conninfo_to_dict(runner_dsn)["user"])
    with _superuser(pg_server) as su:
        su.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 1").format(role))
    runners = Runners(runner_dsn, tmp_path)
    try:
        proc = runners.start("--slots", "2", "--exit-when-idle", name="short")
        wait_for(lambda: "cannot heartbeat" in runners.output("short"), 20, "the warning")
        time.sleep(2)  # longer than --dead-after: the old runner had run every job by now
        statuses = "SELECT status::text, count(*) FROM jobs WHERE workflow_id = %s GROUP BY 1"
        assert dict(conn.execute(statuses, [wf]).fetchall()) == {"ready": 4}
        out = runners.output("short")
        assert "too many connections" in out and "claiming no jobs until it can" in out, out
        assert proc.poll() is None  # jobs are ready: not idle, it waits

        with _superuser(pg_server) as su:
            su.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 5").format(role))
        assert proc.wait(timeout=60) == 0, runners.output("short")
    finally:
        runners.close()
    assert dict(conn.execute(statuses, [wf]).fetchall()) == {"succeeded": 4}
    assert "heartbeat connection restored" in runners.output("short")
    lost = "SELECT count(*) FROM events WHERE workflow_id = %s AND reason LIKE 'rescued%%'"
    assert conn.execute(lost, [wf]).fetchone()[0] == 0


@pytest.mark.parametrize("listen", [True, False])
def test_a_direct_runner_holds_two_connections(dsn, conn, login, tmp_path, listen) -> None:
    """The claim loop's and the heartbeat's (which LISTENs between beats); --no-listen polls
    instead, so a chain still runs, woken by --poll."""
    spec = {
        "jobs": [
            {"key": "a", "command": "sleep 2"},
            {"key": "b", "command": "true", "after": ["a"]},
        ]
    }
    wf = smifdb.submit(conn, spec)
    runner_dsn = login("smifdb_runner", dsn)
    role = conninfo.conninfo_to_dict(runner_dsn)["user"]
    runners = Runners(runner_dsn, tmp_path)
    extra = () if listen else ("--no-listen",)
    try:
        proc = runners.start("--slots", "4", "--exit-when-idle", *extra, name="two")
        running = "SELECT count(*) FROM jobs WHERE workflow_id = %s AND status = 'running'"
        wait_for(lambda: conn.execute(running, [wf]).fetchone()[0] == 1, 20, "job a to run")
        held = "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
        counts = set()
        for _ in range(5):
            counts.add(conn.execute(held, [role]).fetchone()[0])
            time.sleep(0.2)
        assert counts == {2}, counts
        assert proc.wait(timeout=60) == 0, runners.output("two")
    finally:
        runners.close()
    statuses = dict(conn.execute("SELECT key, status::text FROM jobs WHERE workflow_id = %s", [wf]))
    assert statuses == {"a": "succeeded", "b": "succeeded"}
