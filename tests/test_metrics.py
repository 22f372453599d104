"""/metrics on a real database with real runners: every value checked against the tables,
counters that only go up as more jobs finish, and an answer (smifdb_up 0) with the database
unreachable."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import credentials
import psycopg
import pytest
from conftest import dsn_for
from processes import wait_for
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString
from psycopg import conninfo, sql
from starlette.testclient import TestClient

from smifdb.api import create_app
from smifdb.spec import parse
from smifdb.states import JOB_STATUSES, WORKFLOW_STATUSES
from smifdb.store import control, metrics, read, runners
from smifdb.store.submit import submit_dag

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def client(dsn: str) -> Iterator[TestClient]:
    with credentials.client(create_app(dsn)) as c:  # /metrics is public by default
        yield c


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def submit(conn: psycopg.Connection, spec: dict) -> int:
    return submit_dag(conn, parse(spec), actor="test")


def check_against_tables(samples: Samples, conn: psycopg.Connection) -> None:
    """Counts, rates and durations as the tables have them (all of this test's events are
    inside the window)."""
    assert value(samples, "smifdb_up") == 1
    jobs = dict(conn.execute("SELECT status::text, count(*) FROM jobs GROUP BY 1").fetchall())
    for status in JOB_STATUSES:
        assert value(samples, "smifdb_jobs", status=status) == jobs.get(status, 0), status
    flows = dict(conn.execute("SELECT status::text, count(*) FROM workflows GROUP BY 1").fetchall())
    for status in WORKFLOW_STATUSES:
        assert value(samples, "smifdb_workflows", status=status) == flows.get(status, 0), status
    window = value(samples, "smifdb_events_window_seconds")
    assert window == metrics.WINDOW
    claims = conn.execute("SELECT sum(cardinality(job_ids)) FROM claims").fetchone()[0]
    assert value(samples, "smifdb_job_claims_per_second") * window == pytest.approx(claims)
    ended = dict(
        conn.execute(
            "SELECT to_status, count(*) FROM events WHERE job_id IS NOT NULL"
            " AND from_status = 'running' AND to_status <> 'running' GROUP BY 1"
        ).fetchall()
    )
    for outcome in ("succeeded", "failed", "cancelled"):
        rate = value(samples, "smifdb_job_attempts_ended_per_second", outcome=outcome)
        assert rate * window == pytest.approx(ended.get(outcome, 0)), outcome
    for status in ("succeeded", "failed"):
        durations = [
            r[0]
            for r in conn.execute(
                "SELECT extract(epoch FROM finished_at - started_at)::float FROM jobs"
                " WHERE status = %s AND started_at IS NOT NULL",
                [status],
            )
        ]
        hist = "smifdb_job_duration_seconds"
        for bound in (*metrics.DURATION_BUCKETS, "+Inf"):
            le = floatToGoString(bound)
            expected = sum(1 for d in durations if bound == "+Inf" or d <= float(bound))
            assert value(samples, f"{hist}_bucket", status=status, le=le) == expected
        assert value(samples, f"{hist}_gcount", status=status) == len(durations)
        assert value(samples, f"{hist}_gsum", status=status) == pytest.approx(sum(durations))
    for name, succeeded, failed, claimed in conn.execute(
        "SELECT name, jobs_succeeded, jobs_failed, jobs_claimed FROM runners"
    ):
        total = "smifdb_runner_attempts_total"
        assert value(samples, total, runner=name, outcome="succeeded") == succeeded
        assert value(samples, total, runner=name, outcome="failed") == failed
        assert value(samples, "smifdb_runner_claims_total", runner=name) == claimed


def test_metrics_match_the_database(client, conn, procs) -> None:
    # Two workflows run to the end by a runner that then exits: one fails (a command exiting
    # 3, and the job after it never runs), one succeeds.
    failing = submit(
        conn,
        {
            "name": "failing",
            "jobs": [
                {"key": "a", "python": "smifdb.examples:noop"},
                {
                    "key": "b",
                    "python": "smifdb.examples:sleep",
                    "args": {"seconds": 0.3},
                    "after": ["a"],
                },
                {"key": "c", "command": "exit 3"},
                {"key": "d", "python": "smifdb.examples:noop", "after": ["c"]},
            ],
        },
    )
    ok = submit(
        conn,
        {
            "name": "ok",
            "jobs": [{"key": f"k{i}", "python": "smifdb.examples:noop"} for i in range(3)],
        },
    )
    first = procs.start("--slots", "2", "--exit-when-idle", name="first")
    assert first.wait(60) == 0, procs.output("first")
    assert read.finished_status(conn, failing) == "failed"
    assert read.finished_status(conn, ok) == "succeeded"

    # A third workflow keeps one runner slot busy with a long job, so a job stays ready and
    # one waits behind it.
    queued = submit(
        conn,
        {
            "name": "queued",
            "jobs": [
                {
                    "key": "long",
                    "command": "sleep 60",  # a process: cancelling it kills it at once
                    "priority": 10,
                },
                {"key": "x", "python": "smifdb.examples:noop"},
                {"key": "y", "python": "smifdb.examples:noop", "after": ["x"]},
            ],
        },
    )
    procs.start("--slots", "1", name="busy")
    job = dict(conn.execute("SELECT key, id FROM jobs WHERE workflow_id = %s", [queued]))
    wait_for(
        lambda: (
            conn.execute("SELECT status FROM jobs WHERE id = %s", [job["long"]]).fetchone()[0]
            == "running"
        ),
        what="the long job to run",
    )
    time.sleep(0.5)  # x has been ready for at least this long

    before = scrape(client)
    check_against_tables(before, conn)
    assert value(before, "smifdb_jobs", status="ready") == 1
    assert value(before, "smifdb_jobs", status="waiting") == 1
    assert value(before, "smifdb_jobs", status="failed") == 1
    assert value(before, "smifdb_jobs", status="upstream_failed") == 1
    ready_since = conn.execute(
        "SELECT extract(epoch FROM now() - max(at))::float FROM events WHERE job_id = %s",
        [job["x"]],
    ).fetchone()[0]
    age = value(before, "smifdb_oldest_ready_job_age_seconds")
    assert 0.5 <= age <= ready_since + 0.5
    assert value(before, "smifdb_runners", state="active") == 1
    assert value(before, "smifdb_runners", state="stopped") == 1
    assert value(before, "smifdb_runner_busy_slots", runner="busy") == 1
    assert value(before, "smifdb_runner_slots", runner="busy") == 1
    assert ("smifdb_runner_slots", (("runner", "first"),)) not in before  # stopped: no capacity
    heartbeat = conn.execute(
        "SELECT name, extract(epoch FROM now() - last_heartbeat_at)::float FROM runners"
    ).fetchall()
    for name, seconds in heartbeat:
        scraped = value(before, "smifdb_runner_heartbeat_age_seconds", runner=name)
        assert abs(scraped - seconds) < 1.0, name
    assert value(before, "smifdb_runner_heartbeat_age_seconds", runner="busy") < 1.0  # 0.2 s
    assert value(before, "smifdb_job_duration_seconds_gcount", status="succeeded") == 5
    assert value(before, "smifdb_job_duration_seconds_gcount", status="failed") == 1
    assert value(before, "smifdb_runner_attempts_total", runner="first", outcome="failed") == 1

    # Cancel the long job: x and y run; the runner's counters and the rates only go up.
    control.cancel(conn, queued, job_key="long", actor="test")
    wait_for(lambda: read.finished_status(conn, queued), what="the queued workflow")
    wait_for(
        lambda: (
            conn.execute("SELECT jobs_succeeded FROM runners WHERE name = 'busy'").fetchone()[0]
            == 2
        ),
        what="the busy runner's heartbeat to count x and y",
    )
    after = scrape(client)
    check_against_tables(after, conn)
    assert value(after, "smifdb_oldest_ready_job_age_seconds") == 0  # nothing ready
    assert value(after, "smifdb_jobs", status="cancelled") == 1
    assert value(after, "smifdb_job_attempts_ended_per_second", outcome="cancelled") > 0
    for key, v in before.items():
        if key[0] in ("smifdb_runner_attempts_total", "smifdb_job_claims_per_second"):
            assert after[key] >= v, key
    attempts = ("smifdb_runner_attempts_total", (("outcome", "succeeded"), ("runner", "busy")))
    assert after[attempts] == before[attempts] + 2

    # OpenMetrics when asked for: the duration histogram is a gauge histogram there.
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert "# TYPE smifdb_job_duration_seconds gaugehistogram" in response.text
    assert response.text.endswith("# EOF\n")


def _write_finished_jobs(conn: psycopg.Connection, seconds: list[float]) -> int:
    """Jobs that ran for exactly these durations, with their events, written directly."""
    workflow_id = submit(
        conn,
        {"jobs": [{"key": f"j{i}", "python": "smifdb.examples:noop"} for i in range(len(seconds))]},
    )
    now = datetime.now(UTC)
    with conn.transaction():
        for i, s in enumerate(seconds):
            start = now - timedelta(seconds=s)
            (job_id,) = conn.execute(
                "UPDATE jobs SET status = 'succeeded', attempts = 1, started_at = %s,"
                " finished_at = %s WHERE workflow_id = %s AND key = %s RETURNING id",
                [start, now, workflow_id, f"j{i}"],
            ).fetchone()
            # The claim (its lease row, closed) and the event that ends the attempt.
            conn.execute(
                "INSERT INTO claims (workflow_id, owner, claimed_at, expires_at, closed_at,"
                " job_ids) VALUES (%s, 'test', %s, %s, %s, ARRAY[%s::bigint])",
                [workflow_id, start, now, now, job_id],
            )
            conn.execute(
                "INSERT INTO events (workflow_id, job_id, from_status, to_status, actor,"
                " claimed_at, claimed_by) VALUES (%s, %s, 'running', 'succeeded', 'test', %s,"
                " 'test')",
                [workflow_id, job_id, start],
            )
    return workflow_id


def test_buckets_count_up_to_and_including_their_bound(conn) -> None:
    _write_finished_jobs(conn, [0.1, 1.0, 1.5, 86_400.0, 90_000.0])
    snap = metrics.snapshot(conn, dead_after=30)
    counts = snap.durations["succeeded"].counts
    bucket = dict(zip((*metrics.DURATION_BUCKETS, "+Inf"), counts, strict=True))
    assert bucket[0.1] == 1 and bucket[1] == 1 and bucket[5] == 1
    assert bucket[86400] == 1 and bucket["+Inf"] == 1 and sum(counts) == 5
    assert snap.durations["succeeded"].total == pytest.approx(0.1 + 1 + 1.5 + 86_400 + 90_000)
    # Claims count at their own time: the two day-long attempts were claimed outside the window.
    assert snap.claims == 3 and snap.attempts_ended == {"succeeded": 5}
    assert snap.window == metrics.WINDOW


def test_a_busy_tail_narrows_the_window_instead_of_reading_more(conn) -> None:
    _write_finished_jobs(conn, [0.0] * 10)  # 10 submission and 10 end events, 10 claims
    snap = metrics.snapshot(conn, dead_after=30, tail=6)
    assert 0 < snap.window < 60  # the span of the newest 6 events, not the whole window
    assert snap.attempts_ended == {"succeeded": 6}
    assert snap.claims <= 6  # of the newest 6 claims, those inside that span
    # Events older than the window are not counted, and do not cut the window short.
    conn.execute("UPDATE events SET at = at - interval '1 hour'")
    conn.execute("UPDATE claims SET claimed_at = claimed_at - interval '1 hour'")
    snap = metrics.snapshot(conn, dead_after=30, tail=6)
    assert snap.window == metrics.WINDOW and snap.claims == 0 and snap.attempts_ended == {}


def test_metrics_answer_while_the_database_is_unreachable(client, dsn, pg_server) -> None:
    assert value(scrape(client), "smifdb_up") == 1
    name = conninfo.conninfo_to_dict(dsn)["dbname"]
    ident = sql.Identifier(name)
    with psycopg.connect(dsn_for(pg_server, "postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(ident))
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name]
        )
        try:
            for _ in range(2):  # a dropped pooled connection, then no connection at all
                started = time.monotonic()
                down = scrape(client)
                assert value(down, "smifdb_up") == 0
                assert ("smifdb_jobs", (("status", "ready"),)) not in down
                assert time.monotonic() - started < 10  # inside Prometheus's scrape timeout
        finally:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(ident))
    wait_for(lambda: value(scrape(client), "smifdb_up") == 1, what="metrics to recover")


def test_runner_states_are_those_runner_status_reports(conn) -> None:
    """Silent past dead_after is lost; runners that ended over an hour ago get no series."""
    conn.execute(
        """
        INSERT INTO runners (name, slots, state, last_heartbeat_at) VALUES
            ('live', 2, 'active', now()),
            ('silent', 2, 'active', now() - interval '1 minute'),
            ('ended', 2, 'stopped', now() - interval '10 minutes'),
            ('long-gone', 2, 'lost', now() - interval '2 hours'),
            ('booked', 2, 'registered', NULL)
        """
    )
    snap = metrics.snapshot(conn, dead_after=30)
    seen = {r.name: (r.state, r.recent) for r in snap.runners}
    assert seen == {
        "live": ("active", True),
        "silent": ("lost", True),
        "ended": ("stopped", True),
        "long-gone": ("lost", False),
        "booked": ("registered", True),
    }
    status = {r["name"]: r["state"] for r in runners.status(conn, dead_after=30)}
    assert status == {name: state for name, (state, _) in seen.items()}
