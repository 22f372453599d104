"""The SQL views (docs/sql.md) after real runs, and `smifdb status` / `smifdb audit` on them."""

from __future__ import annotations

import json
import signal
import textwrap

import psycopg
import pytest
from processes import PY, cli, wait_for
from psycopg.rows import dict_row

import smifdb


def rows(conn: psycopg.Connection, query: str, params: object = None) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def one(conn: psycopg.Connection, query: str, params: object = None) -> dict:
    (row,) = rows(conn, query, params)
    return row


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def job_id(conn: psycopg.Connection, wf: int, key: str) -> int:
    return conn.execute(
        "SELECT id FROM jobs WHERE workflow_id = %s AND key = %s", [wf, key]
    ).fetchone()[0]


FLAKY = "import os, sys; sys.exit(1 if os.environ['SMIFDB_ATTEMPT'] == '1' else 0)"


def test_views_after_a_run_with_failures_and_a_retry(dsn, conn, runners) -> None:
    wf = smifdb.submit(
        conn,
        {
            "name": "mixed",
            "jobs": [
                {"key": "a", "python": "smifdb.examples:noop"},
                {"key": "flaky", "command": py(FLAKY), "max_attempts": 2, "retry_backoff": 0.1},
                {"key": "slow", "python": "smifdb.examples:sleep", "args": {"seconds": 1.0}},
                {"key": "bad", "command": "exit 3"},
                {"key": "bad2", "command": "exit 3", "after": ["a"]},
                {"key": "after_bad", "command": "true", "after": ["bad"]},
            ],
        },
    )
    proc = runners.start("--slots", "4", "--exit-when-idle", name="r0")
    assert proc.wait(timeout=60) == 0, runners.output("r0")

    p = one(conn, "SELECT * FROM smifdb_workflow_progress WHERE workflow_id = %s", [wf])
    assert (p["name"], p["status"], p["jobs_total"], p["jobs_done"]) == ("mixed", "failed", 6, 6)
    counts = {s: p[s] for s in ("waiting", "ready", "running", "succeeded", "failed")}
    assert counts == {"waiting": 0, "ready": 0, "running": 0, "succeeded": 3, "failed": 2}
    assert (p["upstream_failed"], p["cancelled"], p["percent_done"]) == (1, 0, 100.0)
    assert p["eta_seconds"] is None and p["elapsed_seconds"] >= 1.0  # `slow` slept 1 s
    assert p["queued_seconds"] >= 0

    # The retried job's whole life, in order, with who did what and why.
    history = rows(
        conn,
        "SELECT * FROM smifdb_job_history WHERE job_id = %s ORDER BY event_id NULLS LAST, at",
        [job_id(conn, wf, "flaky")],
    )
    steps = [(e["from_status"], e["to_status"], e["attempt"], e["reason"]) for e in history]
    assert steps == [
        (None, "ready", None, "submitted"),
        ("ready", "running", 1, "claimed"),
        ("running", "ready", 1, "exit status 1"),
        ("ready", "running", 2, "claimed"),
        ("running", "succeeded", 2, "exit status 0"),
    ]
    assert history[0]["actor"].startswith("api@")
    assert {e["actor"] for e in history[1:]} == {"r0"}
    assert {(e["workflow_id"], e["job_key"]) for e in history} == {(wf, "flaky")}

    # The workflow's history holds every job's events and its own (job_id null), in order.
    whole = rows(
        conn,
        "SELECT * FROM smifdb_job_history WHERE workflow_id = %s ORDER BY event_id NULLS LAST, at",
        [wf],
    )
    assert [e["event_id"] for e in whole] == sorted(e["event_id"] for e in whole)
    own = [(e["from_status"], e["to_status"]) for e in whole if e["job_id"] is None]
    assert own == [(None, "pending"), ("pending", "running"), ("running", "failed")]
    assert sum(1 for e in whole if e["job_key"] == "after_bad") == 2  # submitted, upstream_failed

    failures = rows(conn, "SELECT * FROM smifdb_failure_reasons WHERE workflow_id = %s", [wf])
    assert [(f["error"], f["jobs"], f["attempts"], f["example_keys"]) for f in failures] == [
        ("exit status 3", 2, 2, ["bad", "bad2"])
    ]

    slowest = rows(conn, "SELECT * FROM smifdb_slowest_jobs WHERE workflow_id = %s", [wf])
    assert slowest[0]["key"] == "slow" and slowest[0]["duration_seconds"] >= 1.0
    assert [s["duration_seconds"] for s in slowest] == sorted(
        (s["duration_seconds"] for s in slowest), reverse=True
    )
    assert {s["key"] for s in slowest} == {"a", "flaky", "slow", "bad", "bad2"}  # not after_bad

    # Outcomes in the last hour, from events, agree with the runner's own counters; each
    # of its six attempts was a claim.
    load = one(conn, "SELECT * FROM smifdb_runner_load WHERE runner = 'r0'")
    assert (load["state"], load["busy"], load["slots"]) == ("stopped", 0, 4)
    assert (load["succeeded_last_hour"], load["failed_last_hour"]) == (3, 3)  # flaky's 1st too
    assert (load["jobs_succeeded"], load["jobs_failed"], load["jobs_claimed"]) == (3, 3, 6)

    health = one(conn, "SELECT * FROM smifdb_queue_health")
    assert health == {
        "ready": 0,
        "claimable": 0,
        "retries_pending": 0,
        "next_retry_in_seconds": None,
        "oldest_ready_seconds": None,
        "running": 0,
        "expired_leases": 0,
        "waiting": 0,
        "unfinished_workflows": 0,
        "live_runners": 0,
        "live_slots": 0,
    }


def test_queue_health_with_a_killed_runner_retries_and_a_cancel(dsn, conn, runners, tmp_path):
    started = tmp_path / "started"
    hang = py(f"import time; open({str(started)!r}, 'a').write('x'); time.sleep(60)")
    w2 = smifdb.submit(
        conn,
        {
            "name": "stuck",
            "jobs": [
                # Claimed first (priority), fails, and waits a minute for its retry.
                {
                    "key": "retry",
                    "command": "exit 1",
                    "priority": 10,
                    "max_attempts": 3,
                    "retry_backoff": 60,
                },
                {"key": "hang", "command": hang, "priority": 5, "max_attempts": 2},
                {"key": "hang2", "command": hang, "max_attempts": 2},
                {"key": "child", "command": "true", "after": ["hang"]},
            ],
        },
    )
    victim = runners.start("--slots", "2", "--lease", "3", name="victim")
    wait_for(lambda: started.exists() and len(started.read_text()) == 2, what="both hangs")
    w3 = smifdb.submit(conn, {"name": "queued", "jobs": [{"key": "q1", "command": "true"}]})
    w3b = smifdb.submit(conn, {"name": "queued2", "jobs": [{"key": "q2", "command": "true"}]})

    h = one(conn, "SELECT * FROM smifdb_queue_health")
    assert (h["ready"], h["claimable"], h["retries_pending"]) == (3, 2, 1)
    assert 25 <= h["next_retry_in_seconds"] <= 90  # 60 s jittered ×[0.5, 1.5)
    assert 0 <= h["oldest_ready_seconds"] < h["next_retry_in_seconds"]
    assert (h["running"], h["expired_leases"], h["waiting"]) == (2, 0, 1)
    assert (h["unfinished_workflows"], h["live_runners"], h["live_slots"]) == (3, 1, 2)
    load = one(conn, "SELECT * FROM smifdb_runner_load WHERE runner = 'victim'")
    assert (load["state"], load["busy"], load["failed_last_hour"]) == ("active", 2, 1)
    assert load["heartbeat_age_seconds"] < 2

    victim.send_signal(signal.SIGKILL)
    victim.wait()
    conn.execute("SET smifdb.dead_after = 1")  # what `smifdb status --dead-after 1` does
    wait_for(
        lambda: one(conn, "SELECT * FROM smifdb_queue_health")["expired_leases"] == 2,
        what="the dead runner's leases to expire",
    )
    load = one(conn, "SELECT * FROM smifdb_runner_load WHERE runner = 'victim'")
    assert (load["state"], load["busy"]) == ("lost", 2)  # nobody has rescued its jobs yet
    h = one(conn, "SELECT * FROM smifdb_queue_health")
    assert (h["live_runners"], h["running"]) == (0, 2)

    # A cancelled ready job, and a workflow mid-way: an ETA from its pace so far.
    assert cli(dsn, "cancel", str(w3b), "--job", "q2").returncode == 0
    assert cli(dsn, "cancel", str(w2)).returncode == 0
    p = one(conn, "SELECT * FROM smifdb_workflow_progress WHERE workflow_id = %s", [w2])
    assert (p["status"], p["cancelled"], p["running"], p["jobs_done"]) == ("cancelled", 2, 2, 2)
    assert p["percent_done"] == 50.0
    assert p["eta_seconds"] == pytest.approx(p["elapsed_seconds"] * 2 / 2, rel=1e-6)

    rescuer = runners.start("--slots", "2", "--exit-when-idle", name="rescuer")
    assert rescuer.wait(timeout=60) == 0, runners.output("rescuer")
    p = one(conn, "SELECT * FROM smifdb_workflow_progress WHERE workflow_id = %s", [w2])
    assert (p["status"], p["cancelled"], p["jobs_done"], p["eta_seconds"]) == (
        "cancelled",
        4,
        4,
        None,
    )
    hang_history = rows(
        conn,
        "SELECT * FROM smifdb_job_history WHERE job_id = %s ORDER BY event_id NULLS LAST, at",
        [job_id(conn, w2, "hang")],
    )
    assert [(e["to_status"], e["actor"], e["reason"]) for e in hang_history[1:]] == [
        ("running", "victim", "claimed"),
        ("cancelled", "rescuer", "rescued: lease expired"),
    ]
    assert one(conn, "SELECT status FROM smifdb_workflow_progress WHERE workflow_id = %s", [w3])[
        "status"
    ] == ("succeeded")
    h = one(conn, "SELECT * FROM smifdb_queue_health")
    assert (h["ready"], h["running"], h["waiting"], h["unfinished_workflows"]) == (0, 0, 0, 0)
    assert one(conn, "SELECT state FROM smifdb_runner_load WHERE runner = 'victim'") == {
        "state": "lost"
    }


DECIDE = """
def decide(history):
    if len(history) == 2:
        return None
    return {"jobs": [{"key": "a", "command": "true"}, {"key": "b", "command": "true", "after": ["a"]}]}
"""


def test_model_run_progress(dsn, conn, tmp_path) -> None:
    (tmp_path / "twice.py").write_text(textwrap.dedent(DECIDE))
    args = ["--decide", "twice:decide", "--slots", "2", "--log-dir", str(tmp_path / "logs")]
    done = cli(dsn, "modelrun", "run", str(tmp_path), "done", *args)
    assert done.returncode == 0, done.stderr + done.stdout
    fresh = cli(dsn, "modelrun", "submit", str(tmp_path), "fresh", "--decide", "twice:decide")
    assert fresh.returncode == 0, fresh.stderr
    by_name = {r["name"]: r for r in rows(conn, "SELECT * FROM smifdb_model_run_progress")}
    d, f = by_name["done"], by_name["fresh"]
    assert (d["status"], d["kind"], d["bundles"], d["current_bundle"]) == (
        "succeeded",
        "python",
        2,
        1,
    )
    assert (d["jobs_total"], d["jobs_done"], d["percent_done"]) == (4, 4, 100.0)
    last = conn.execute(
        "SELECT id FROM workflows WHERE model_run_id = %s AND bundle = 1", [d["model_run_id"]]
    ).fetchone()[0]
    assert d["current_workflow_id"] == last
    assert (f["status"], f["bundles"], f["jobs_total"], f["jobs_done"], f["percent_done"]) == (
        "running",
        1,
        2,
        0,
        0.0,
    )
    assert f["finished_at"] is None and f["elapsed_seconds"] >= 0


def test_status_and_audit_commands(dsn, conn, runners) -> None:
    wf = smifdb.submit(
        conn,
        {
            "name": "cli",
            "jobs": [
                {"key": "ok", "command": "true"},
                {"key": "broken", "command": "echo no; exit 7", "after": ["ok"]},
            ],
        },
    )
    assert runners.start("--slots", "2", "--exit-when-idle", name="r0").wait(timeout=60) == 0
    broken = job_id(conn, wf, "broken")

    out = cli(dsn, "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["ready", "claimable", "retrying"]
    runner_line = next(line for line in lines if line.startswith("r0 "))
    assert runner_line.split()[2:4] == ["stopped", "0/2"]
    workflow_line = next(line for line in lines if line.split()[:1] == [str(wf)])
    assert workflow_line.split()[1:5] == ["cli", "failed", "2/2", "100.0"]
    data = json.loads(cli(dsn, "status", "--json").stdout)
    assert data["queue"]["ready"] == 0
    assert [r["runner"] for r in data["runners"]] == ["r0"]
    assert data["workflows"][0]["workflow_id"] == wf

    out = cli(dsn, "status", str(wf))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"workflow {wf} 'cli': failed, 2/2 jobs done (100.0%)")
    assert f"{broken}  broken  failed" in out.stdout and "exit status 7" in out.stdout
    data = json.loads(cli(dsn, "status", str(wf), "--json").stdout)
    assert data["workflow"]["succeeded"] == 1 and data["workflow"]["failed"] == 1
    assert [j["key"] for j in data["jobs"]] == ["broken"]
    assert data["failures"][0]["error"] == "exit status 7"

    out = cli(dsn, "audit", "--job", str(broken))
    assert out.returncode == 0, out.stderr
    header, *events = out.stdout.splitlines()
    assert header.split() == [
        "event",
        "at",
        "workflow",
        "job",
        "key",
        "attempt",
        "from",
        "to",
        "actor",
        "reason",
    ]
    assert len(events) == 4  # submitted (waiting), ready, running, failed
    assert events[-1].split()[-6:] == ["running", "failed", "r0", "exit", "status", "7"]
    assert events[1].split()[-6:] == ["waiting", "ready", "r0", "all", "parents", "succeeded"]

    history = json.loads(cli(dsn, "audit", str(wf), "--json").stdout)
    assert len(history) == 3 + 3 + 4  # the workflow's own, ok's, broken's
    assert [e["event_id"] for e in history] == sorted(e["event_id"] for e in history)
    last3 = json.loads(cli(dsn, "audit", str(wf), "--json", "--limit", "3").stdout)
    assert [e["event_id"] for e in last3] == [e["event_id"] for e in history[-3:]]
    anywhere = json.loads(cli(dsn, "audit", "--json", "--limit", "2").stdout)
    assert [e["event_id"] for e in anywhere] == [e["event_id"] for e in history[-2:]]
    assert len(json.loads(cli(dsn, "audit", "--json", "--limit", "0").stdout)) == len(history)

    for args, message in [
        (["status", "99999"], "no workflow 99999"),
        (["audit", "99999"], "no workflow 99999"),
        (["audit", "--job", "99999"], "no job 99999"),
        (["audit", str(wf), "--job", str(broken)], "not both"),
    ]:
        out = cli(dsn, *args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
