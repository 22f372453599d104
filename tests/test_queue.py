"""Queue semantics on a real database: claim order, fencing, readiness, failure, cancel, rescue."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import psycopg
import pytest

import smifdb
from smifdb.store import control, queue, read
from smifdb.store import runners as runner_rows
from smifdb.store.queue import Outcome


def job(key: str, after: list[str] | None = None, **extra) -> dict:
    return {"key": key, "python": "smifdb.examples:noop", "after": after or [], **extra}


def statuses(conn: psycopg.Connection, workflow_id: int) -> dict[str, str]:
    rows = conn.execute(
        "SELECT key, status::text FROM jobs WHERE workflow_id = %s", [workflow_id]
    ).fetchall()
    return dict(rows)


def done(claimed, status: str = "succeeded", owner: str = "r1", **kw) -> list[Outcome]:
    return [
        Outcome(
            job_id=c.id,
            workflow_id=c.workflow_id,
            attempt=c.attempt,
            owner=owner,
            status=status,
            max_attempts=c.max_attempts,
            retry_backoff=c.retry_backoff,
            claimed_at=c.claimed_at,
            **kw,
        )
        for c in claimed
    ]


def test_claim_order_priority_then_age_and_batch(conn) -> None:
    wf = smifdb.submit(
        conn, {"jobs": [job("a"), job("b", priority=5), job("c"), job("d", priority=5)]}
    )
    first = queue.claim(conn, "r1", 3, lease=60)
    assert [c.key for c in first] == ["b", "d", "a"]
    assert all(c.attempt == 1 for c in first)
    assert queue.claim(conn, "r2", 10, lease=60)[0].key == "c"
    assert queue.claim(conn, "r2", 10, lease=60) == []
    assert read.get_workflow(conn, wf)["status"] == "running"
    rows = conn.execute(
        "SELECT lease_owner, count(*) FROM jobs WHERE status = 'running' GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert rows == [("r1", 3), ("r2", 1)]


def test_claim_skips_rows_locked_by_another_claim(conn, dsn) -> None:
    smifdb.submit(conn, {"jobs": [job(f"j{i}") for i in range(4)]})
    other = psycopg.connect(dsn)
    # Another claim in flight: it holds the first two queue rows.
    other.execute("SELECT job_id FROM ready_jobs ORDER BY job_id LIMIT 2 FOR UPDATE")
    try:
        got = queue.claim(conn, "r1", 10, lease=60)
        assert [c.key for c in got] == ["j2", "j3"]
    finally:
        other.close()


def test_children_become_ready_only_when_all_parents_succeed(conn) -> None:
    wf = smifdb.submit(conn, {"jobs": [job("a"), job("b"), job("c", ["a", "b"])]})
    claimed = queue.claim(conn, "r1", 10, lease=60)
    a = [c for c in claimed if c.key == "a"]
    b = [c for c in claimed if c.key == "b"]
    report = queue.finish(conn, "r1", done(a))
    assert report.became_ready == 0 and statuses(conn, wf)["c"] == "waiting"
    report = queue.finish(conn, "r1", done(b))
    assert report.became_ready == 1 and statuses(conn, wf)["c"] == "ready"
    (c,) = queue.claim(conn, "r1", 10, lease=60)
    report = queue.finish(conn, "r1", done([c], result={"x": 1}))
    assert report.finished_workflows == {wf: "succeeded"}
    wf_row = read.get_workflow(conn, wf)
    assert wf_row["status"] == "succeeded" and wf_row["finished_at"] is not None
    assert wf_row["unfinished_jobs"] == 0
    assert conn.execute("SELECT result FROM jobs WHERE key = 'c'").fetchone()[0] == {"x": 1}


def test_completion_is_fenced_by_owner_and_attempt(conn) -> None:
    smifdb.submit(conn, {"jobs": [job("a", max_attempts=3)]})
    (a,) = queue.claim(conn, "r1", 1, lease=60)
    # A stranger, and the right owner with a stale attempt, change nothing.
    assert queue.finish(conn, "intruder", done([a], owner="intruder")).recorded == []
    stale = done([a])[0]
    stale.attempt = 0
    assert queue.finish(conn, "r1", [stale]).recorded == []
    assert queue.finish(conn, "r1", done([a])).recorded == [a.id]
    # A duplicate (say, retried after a dropped COMMIT) is a no-op, not a second record.
    assert queue.finish(conn, "r1", done([a], status="failed")).recorded == []
    events = conn.execute(
        "SELECT to_status FROM events WHERE job_id = %s AND from_status = 'running'", [a.id]
    ).fetchall()
    assert events == [("succeeded",)]


def test_failure_retries_with_backoff_then_fails_and_propagates(conn) -> None:
    wf = smifdb.submit(
        conn,
        {
            "jobs": [
                job("a", max_attempts=2, retry_backoff=30),
                job("b", ["a"]),
                job("c", ["b"]),
                job("side"),
            ]
        },
    )
    claimed = {c.key: c for c in queue.claim(conn, "r1", 10, lease=60)}
    queue.finish(conn, "r1", done([claimed["a"]], status="failed", error="boom"))
    row = conn.execute(
        "SELECT status::text, attempts, not_before - now() FROM jobs WHERE key = 'a'"
    ).fetchone()
    assert row[0] == "ready" and row[1] == 1
    assert 14 <= row[2].total_seconds() <= 46  # 30 s nominal, jittered to [15, 45)
    assert queue.claim(conn, "r1", 10, lease=60) == []  # not claimable before not_before
    assert 14 <= queue.seconds_until_next_retry(conn) <= 46
    conn.execute(  # the backoff is over
        "UPDATE ready_jobs SET not_before = now() WHERE job_id = (SELECT id FROM jobs WHERE key = 'a')"
    )
    (a2,) = queue.claim(conn, "r1", 10, lease=60)
    assert a2.attempt == 2
    queue.finish(conn, "r1", done([a2], status="failed", error="boom again"))
    assert statuses(conn, wf) == {
        "a": "failed",
        "b": "upstream_failed",
        "c": "upstream_failed",
        "side": "running",
    }
    wf_row = read.get_workflow(conn, wf)
    assert wf_row["status"] == "failed" and wf_row["finished_at"] is None  # side still runs
    report = queue.finish(conn, "r1", done([claimed["side"]]))
    assert report.finished_workflows == {wf: "failed"}


def test_rescue_takes_back_jobs_of_dead_runners_only(conn) -> None:
    smifdb.submit(conn, {"jobs": [job("a", max_attempts=2), job("b"), job("c")]})
    runner_rows.start(conn, "dead", host="h", pid=1, slots=2, dead_after=30)
    runner_rows.start(conn, "alive", host="h", pid=2, slots=1, dead_after=30)
    dead_jobs = queue.claim(conn, "dead", 2, lease=600)
    (alive_job,) = queue.claim(conn, "alive", 1, lease=600)
    conn.execute(
        "UPDATE runners SET last_heartbeat_at = now() - interval '1 minute' WHERE name = 'dead'"
    )
    report = queue.rescue(conn, "rescuer", dead_after=30)
    assert sorted(report.recorded) == sorted(c.id for c in dead_jobs)
    rows = dict(conn.execute("SELECT key, status::text FROM jobs").fetchall())
    assert rows == {"a": "ready", "b": "failed", alive_job.key: "running"}  # b: no attempts left
    # The dead runner's late completion is fenced out.
    assert queue.finish(conn, "dead", done(dead_jobs, owner="dead")).recorded == []
    assert runner_rows.mark_lost(conn, 30) == ["dead"]


def test_expired_lease_is_rescued_even_with_live_runner(conn) -> None:
    smifdb.submit(conn, {"jobs": [job("a", max_attempts=3)]})
    runner_rows.start(conn, "r1", host="h", pid=1, slots=1, dead_after=30)
    (a,) = queue.claim(conn, "r1", 1, lease=60)
    assert queue.rescue(conn, "x", dead_after=30).recorded == []
    conn.execute("UPDATE claims SET expires_at = now() - interval '1 second'")
    assert queue.rescue(conn, "x", dead_after=30).recorded == [a.id]
    reason = conn.execute("SELECT reason FROM events ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert "lease expired" in reason


def test_rescue_racing_completion_never_overwrites(dsn, conn) -> None:
    """Many rounds of a completion and a rescue of the same job at the same moment."""
    rounds = 30
    smifdb.submit(conn, {"jobs": [job(f"j{i}", max_attempts=5) for i in range(rounds)]})
    conn.execute("INSERT INTO runners (name, slots, state) VALUES ('r1', 1, 'lost')")
    claimed = queue.claim(conn, "r1", rounds, lease=600)
    barrier = threading.Barrier(2)
    results: dict[str, list] = {"finish": [], "rescue": []}

    def finisher() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            for cj in claimed:
                barrier.wait()
                results["finish"] += queue.finish(c, "r1", done([cj])).recorded

    def rescuer() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            for _ in claimed:
                barrier.wait()
                results["rescue"] += queue.rescue(c, "x", dead_after=30, limit=1).recorded

    threads = [threading.Thread(target=finisher), threading.Thread(target=rescuer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each job's attempt 1 ended exactly once: by its runner or by the rescue, never both.
    for cj in claimed:
        ends = conn.execute(
            "SELECT count(*) FROM events WHERE job_id = %s AND attempt = 1"
            " AND from_status = 'running'",
            [cj.id],
        ).fetchone()[0]
        assert ends == 1
    assert set(results["finish"]).isdisjoint(results["rescue"])
    assert len(results["finish"]) + len(results["rescue"]) == rounds


def test_runners_recording_and_claiming_crosswise_do_not_deadlock(dsn, conn, monkeypatch):
    """r1 records a job of workflow A and claims B's first job; r2 records B's and claims A's.
    A claim that locked its pending workflow's row would hold what the other's settle waits
    for, while waiting in its own settle for the row the other's claim holds."""
    spec = {"jobs": [job("x"), job("y")]}
    wa, wb = smifdb.submit(conn, spec), smifdb.submit(conn, spec)
    with conn.transaction():  # x of each is claimed while its workflow row is held: still pending
        conn.execute("SELECT 1 FROM workflows WHERE id IN (%s, %s) FOR NO KEY UPDATE", [wa, wb])
        with psycopg.connect(dsn, autocommit=True) as c:
            (xa,) = queue.claim(c, "r1", 1, lease=60, scope=queue.Scope(workflow_id=wa))
            (xb,) = queue.claim(c, "r2", 1, lease=60, scope=queue.Scope(workflow_id=wb))
    settle = queue._settle
    barrier = threading.Barrier(2)

    def settle_together(*args):  # both claims are made before either settles
        barrier.wait(timeout=10)
        return settle(*args)

    monkeypatch.setattr(queue, "_settle", settle_together)
    errors: list[BaseException] = []

    def record(owner: str, claimed: queue.ClaimedJob, other: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                scope = queue.Scope(workflow_id=other)
                report = queue.finish(
                    c, owner, done([claimed], owner=owner), claim_n=1, scope=scope
                )
                assert len(report.claimed) == 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=record, args=("r1", xa, wb)),
        threading.Thread(target=record, args=("r2", xb, wa)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    statuses_now = conn.execute(
        "SELECT status::text FROM workflows WHERE id IN (%s, %s)", [wa, wb]
    ).fetchall()
    assert statuses_now == [("running",), ("running",)]


def test_release_hands_back_without_counting_the_attempt(conn) -> None:
    smifdb.submit(conn, {"jobs": [job("a")]})
    (a,) = queue.claim(conn, "r1", 1, lease=60)
    queue.finish(conn, "r1", done([a], status="released"))
    assert conn.execute("SELECT status::text, attempts FROM jobs").fetchone() == ("ready", 0)
    (again,) = queue.claim(conn, "r2", 1, lease=60)
    assert again.attempt == 1


def test_release_unknown_after_lost_claim(conn) -> None:
    smifdb.submit(conn, {"jobs": [job("a"), job("b")]})
    a, b = queue.claim(conn, "r1", 2, lease=60)
    report = queue.release_unknown(conn, "r1", known=[a.id])
    assert report.recorded == [b.id]
    assert statuses(conn, a.workflow_id) == {"a": "running", "b": "ready"}


def test_an_attempt_number_reused_after_a_release_does_not_open_the_fence(conn) -> None:
    """A release does not count its attempt, so the next claim has the same number; the claim
    time tells the two apart. (Two live processes sharing one runner name once got a result
    recorded from an execution that no longer held the lease this way.)"""
    wf = smifdb.submit(conn, {"jobs": [job("a")]})
    (first,) = queue.claim(conn, "twin", 1, lease=60)
    released = queue.release_unknown(conn, "twin", known=[])  # the other twin's reconnect
    assert released.recorded == [first.id]
    (second,) = queue.claim(conn, "twin", 1, lease=60)
    assert (first.attempt, second.attempt) == (1, 1)
    assert first.claimed_at < second.claimed_at
    assert queue.finish(conn, "twin", done([first], owner="twin")).recorded == []  # stale
    assert statuses(conn, wf) == {"a": "running"}
    assert queue.finish(conn, "twin", done([second], owner="twin")).recorded == [second.id]
    assert statuses(conn, wf) == {"a": "succeeded"}


def test_cancel_workflow(conn) -> None:
    wf = smifdb.submit(conn, {"jobs": [job("a"), job("b", ["a"]), job("c")]})
    claimed = queue.claim(conn, "r1", 1, lease=60)
    assert [c.key for c in claimed] == ["a"]
    report = control.cancel(conn, wf, actor="test")
    assert (report.cancelled, report.terminating) == (2, 1)
    assert statuses(conn, wf) == {"a": "running", "b": "cancelled", "c": "cancelled"}
    assert queue.cancel_requested(conn, "r1", [claimed[0].id]) == [claimed[0].id]
    wf_row = read.get_workflow(conn, wf)
    assert wf_row["status"] == "cancelled" and wf_row["finished_at"] is None
    # The runner stops the attempt and records it; that ends the workflow.
    report = queue.finish(conn, "r1", done(claimed, status="cancelled"))
    assert report.finished_workflows == {wf: "cancelled"}
    again = control.cancel(conn, wf, actor="test")
    assert again.already_finished


def test_cancel_one_job_and_its_descendants(conn) -> None:
    wf = smifdb.submit(conn, {"jobs": [job("a"), job("b", ["a"]), job("c", ["b"]), job("d")]})
    report = control.cancel(conn, wf, actor="test", job_key="b")
    assert report.cancelled == 2
    assert statuses(conn, wf) == {"a": "ready", "b": "cancelled", "c": "cancelled", "d": "ready"}
    for c in queue.claim(conn, "r1", 10, lease=60):
        report = queue.finish(conn, "r1", done([c]))
    assert report.finished_workflows == {wf: "cancelled"}
    with pytest.raises(control.NotFound):
        control.cancel(conn, wf, actor="test", job_key="nope")
    with pytest.raises(control.NotFound):
        control.cancel(conn, 999999, actor="test")


def test_cancelling_a_finished_job_stops_its_running_descendants(conn) -> None:
    wf = smifdb.submit(conn, {"jobs": [job("a"), job("b", ["a"]), job("c", ["b"])]})
    queue.finish(conn, "r1", done(queue.claim(conn, "r1", 1, lease=60)))
    (b,) = queue.claim(conn, "r1", 1, lease=60)
    report = control.cancel(conn, wf, actor="test", job_key="a")
    assert (report.cancelled, report.terminating) == (1, 1)  # c at once, b by its runner
    assert list(queue.cancel_requested(conn, "r1", [b.id])) == [b.id]
    report = queue.finish(conn, "r1", done([b], status="cancelled"))
    assert report.finished_workflows == {wf: "cancelled"}


def test_retry_of_a_cancelled_job_is_cancelled_not_requeued(conn) -> None:
    wf = smifdb.submit(conn, {"jobs": [job("a", max_attempts=3)]})
    (a,) = queue.claim(conn, "r1", 1, lease=60)
    control.cancel(conn, wf, actor="test")
    report = queue.finish(conn, "r1", done([a], status="failed"))
    assert statuses(conn, wf) == {"a": "cancelled"}
    assert report.finished_workflows == {wf: "cancelled"}


def test_cancelling_a_failed_workflow_stops_its_running_jobs_and_their_retries(conn) -> None:
    """A failed workflow stays failed when cancelled, so its running jobs carry the request."""
    wf = smifdb.submit(conn, {"jobs": [job("f"), job("long", max_attempts=3), job("k", ["long"])]})
    claimed = {c.key: c for c in queue.claim(conn, "r1", 2, lease=60)}
    queue.finish(conn, "r1", done([claimed["f"]], status="failed"))
    assert read.get_workflow(conn, wf)["status"] == "failed"
    long = claimed["long"]
    assert queue.cancel_requested(conn, "r1", [long.id]) == []
    report = control.cancel(conn, wf, actor="test")
    assert (report.cancelled, report.terminating) == (1, 1)
    assert report.workflow_status == "failed"
    assert queue.cancel_requested(conn, "r1", [long.id]) == [long.id]
    # The runner stops it; a failure it reports instead is not retried.
    report = queue.finish(conn, "r1", done([long], status="failed"))
    assert statuses(conn, wf) == {"f": "failed", "long": "cancelled", "k": "cancelled"}
    assert report.finished_workflows == {wf: "failed"}


def test_a_cancel_that_waits_while_the_workflow_fails_still_stops_its_running_jobs(
    conn, dsn
) -> None:
    """Cancel reads the workflow's status, then waits for its idle jobs' locks; a runner that
    holds them may fail the workflow and commit meanwhile."""
    wf = smifdb.submit(conn, {"jobs": [job("f"), job("long", max_attempts=3), job("c", ["f"])]})
    claimed = {c.key: c for c in queue.claim(conn, "r1", 2, lease=60)}
    runner = psycopg.connect(dsn)  # a transaction of its own, like a runner's finish
    c_id = conn.execute("SELECT id FROM jobs WHERE key = 'c'").fetchone()[0]
    runner.execute("SELECT id FROM jobs WHERE id = %s FOR NO KEY UPDATE", [c_id])
    result: list = []
    worker = threading.Thread(target=lambda: result.append(control.cancel(conn, wf, actor="t")))
    worker.start()
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    with psycopg.connect(dsn, autocommit=True) as watcher:
        for _ in range(200):
            if watcher.execute(waiting).fetchone()[0]:
                break
            time.sleep(0.02)
    runner.execute("UPDATE workflows SET status = 'failed' WHERE id = %s", [wf])
    runner.commit()
    runner.close()
    worker.join(10)
    (report,) = result
    assert (report.workflow_status, report.cancelled, report.terminating) == ("failed", 1, 2)
    ids = sorted(c.id for c in claimed.values())
    assert queue.cancel_requested(conn, "r1", ids) == ids


def test_claim_reads_only_ready_rows_through_the_claim_index(conn) -> None:
    """The claim predicate's rows (ready jobs) are their own table, read in claim order through
    its index; the picked rows are deleted by ctid and their jobs found by primary key."""
    spec = {"jobs": [job(f"j{i}") for i in range(3000)]}
    for _ in range(3):
        smifdb.submit(conn, spec)
    conn.execute("UPDATE jobs SET status = 'succeeded' WHERE id % 100 <> 0")
    conn.execute("DELETE FROM ready_jobs WHERE job_id % 100 <> 0")
    conn.execute("ANALYZE jobs, ready_jobs")
    plan = "\n".join(
        r[0]
        for r in conn.execute(
            "EXPLAIN " + queue.CLAIM_ANY,
            {"n": 10, "owner": "r1", "lease": 60, "workflow_id": None},
        )
    )
    picked = plan[plan.index("CTE picked") : plan.index("CTE dequeued")]
    assert "Index Scan using ready_jobs_claim_idx on ready_jobs" in picked, plan
    dequeued = plan[plan.index("CTE dequeued") : plan.index("CTE claimed")]
    assert "Tid Scan on ready_jobs" in dequeued, plan
    claimed = plan[plan.index("CTE claimed") : plan.index("CTE leased")]
    assert "jobs_pkey" in claimed, plan
    assert "Seq Scan" not in plan, plan


def _explain(conn: psycopg.Connection, sql: str, params: dict) -> str:
    """The plan a runner's claiming transaction would get (PLAN_CLAIM in force)."""
    with conn.transaction():
        conn.execute(queue.PLAN_CLAIM)
        return "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, params))


def test_claim_and_record_plans_survive_stale_statistics(conn) -> None:
    """Statistics lag a queue: VACUUM ANALYZE last saw no jobs at all, then a big DAG came.

    Each claim must still be an ordered index scan of ready_jobs that stops at n, not a bitmap
    scan and sort of every ready job (any scope), nor a scan of every ready row, filtered by
    workflow (workflow and model-run scopes). Recording must find each job by id. (Both
    mistakes were made here before: claims cost O(ready), records O(history).)
    """
    conn.execute("VACUUM ANALYZE jobs, ready_jobs")  # while empty
    wf = smifdb.submit(conn, {"jobs": [job(f"j{i}") for i in range(20000)]})
    run = conn.execute(
        "INSERT INTO model_runs (name, kind, project_dir, decide)"
        " VALUES ('mr', 'python', '.', 'm:f') RETURNING id"
    ).fetchone()[0]
    conn.execute("UPDATE workflows SET model_run_id = %s, bundle = 0 WHERE id = %s", [run, wf])
    params = {"n": 64, "owner": "r1", "lease": 60, "workflow_id": wf, "model_run_id": run}
    scopes = {
        "any": (queue.CLAIM_ANY, "ready_jobs_claim_idx"),
        "workflow": (queue.CLAIM_WORKFLOW, "ready_jobs_workflow_idx"),
        "model run": (queue.CLAIM_MODEL_RUN, "ready_jobs_workflow_idx"),
    }
    for name, (sql, index) in scopes.items():
        plan = _explain(conn, sql, params)
        picked = plan[plan.index("CTE picked") : plan.index("CTE dequeued")]
        assert f"Index Scan using {index} on ready_jobs" in picked, (name, plan)
        assert "Bitmap" not in picked, (name, plan)
        if name != "model run":  # which merges its bundles' first n rows: a top-n sort
            assert "Sort" not in picked, (name, plan)

    claimed = queue.claim(conn, "r1", 64, lease=60)
    outcomes = queue._outcomes_json(done(claimed), datetime.now(UTC))
    ids = queue.array(c.id for c in claimed)
    params = {"outcomes": outcomes, "ids": ids, "actor": "r1"}
    plan = _explain(conn, queue._record(True, False), params)
    updated = plan[plan.index("CTE updated") : plan.index("CTE logged")]
    assert "Index Scan using jobs_pkey on jobs j" in updated, plan
    assert "Seq Scan" not in updated, plan


def test_exactly_once_under_concurrent_claims(dsn, conn) -> None:
    """Several claimers racing on one queue never get the same job, nor lose a count."""
    wf = smifdb.submit(conn, {"jobs": [job(f"j{i}") for i in range(2000)]})
    got: list[list[int]] = [[] for _ in range(4)]

    def worker(i: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            while True:
                batch = queue.claim(c, f"r{i}", 7, lease=60)
                if not batch:
                    return
                got[i] += [b.id for b in batch]
                queue.finish(c, f"r{i}", done(batch, owner=f"r{i}"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for g in got for i in g]
    assert len(ids) == len(set(ids)) == 2000
    assert all(len(g) > 0 for g in got)
    row = read.get_workflow(conn, wf)  # concurrent settles must not lose a decrement
    assert (row["unfinished_jobs"], row["status"]) == (0, "succeeded")


def test_hot_path_statements_never_scan_whole_tables(conn) -> None:
    """Every statement of claim and finish is driven by an index, however big the tables.

    (An earlier lock statement hash-joined over a sequential scan of all jobs: O(table) per
    batch, invisible at test sizes.)
    """
    for w in range(30):
        jobs = [job(f"j{i}", [f"j{i - 1}"] if i % 10 else []) for i in range(2000)]
        smifdb.submit(conn, {"name": f"w{w}", "jobs": jobs})
    conn.execute("ANALYZE")
    claimed = queue.claim(conn, "r1", 64, lease=60)
    ids = queue.array(c.id for c in claimed)
    outcomes = queue._outcomes_json(done(claimed), datetime.now(UTC))
    statements = {
        "claim": (queue.CLAIM_ANY, {"n": 64, "owner": "r1", "lease": 60, "workflow_id": None}),
        "lock": (queue._LOCK_JOBS, {"succeeding": ids, "doomed": ids}),
        "record+promote": (
            queue._record(True, False),
            {"outcomes": outcomes, "ids": ids, "actor": "r1"},
        ),
        "descendants": (queue.DESCENDANTS, [ids]),
        "fail descendants": (queue._FAIL_DESCENDANTS, {"doomed": ids, "actor": "r1"}),
    }
    for name, (sql, params) in statements.items():
        with conn.transaction(force_rollback=True):  # EXPLAIN ANALYZE really writes
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN ANALYZE " + sql, params))
        assert "Seq Scan on jobs" not in plan, f"{name}:\n{plan}"
        assert "Seq Scan on job_edges" not in plan, f"{name}:\n{plan}"


def test_no_index_of_jobs_names_what_claims_and_completions_change(conn) -> None:
    """Claims and completions are HOT updates only while no index of `jobs` (key columns,
    expressions or partial predicates) names a column they write."""
    rows = conn.execute(
        """
        SELECT i.indexrelid::regclass::text, a.attname
        FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
        WHERE i.indrelid = 'jobs'::regclass
        UNION ALL
        SELECT i.indexrelid::regclass::text, 'predicate or expression'
        FROM pg_index i
        WHERE i.indrelid = 'jobs'::regclass AND (i.indpred IS NOT NULL OR i.indexprs IS NOT NULL)
        """
    ).fetchall()
    assert {column for _, column in rows} <= {"id", "workflow_id", "key"}, rows


def test_claims_and_completions_are_hot(conn) -> None:
    # An autovacuum or autoanalyze of jobs meanwhile (likely on a busy machine: 2000 rows are
    # past its thresholds) holds a snapshot, and pages cannot be pruned for room behind it.
    conn.execute("ALTER TABLE jobs SET (autovacuum_enabled = off)")
    smifdb.submit(conn, {"jobs": [job(f"j{i}") for i in range(2000)]})
    conn.execute("SELECT pg_stat_force_next_flush()")
    before = conn.execute(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'jobs'"
    ).fetchone()
    while claimed := queue.claim(conn, "r1", 256, lease=60):
        queue.finish(conn, "r1", done(claimed))
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    after = conn.execute(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'jobs'"
    ).fetchone()
    updates, hot = after[0] - before[0], after[1] - before[1]
    assert updates == 4000  # a claim and a completion each
    assert hot >= 0.9 * updates, (hot, updates)  # fillfactor 50 leaves room on the page
    conn.execute("ALTER TABLE jobs RESET (autovacuum_enabled)")


@pytest.mark.parametrize("defer", [False, True], ids=["settled", "deferred"])
def test_a_workflow_ends_when_two_sessions_finish_its_last_jobs_at_once(
    dsn, conn, monkeypatch, defer
):
    """Neither transaction sees the other's count, so neither sees the workflow complete; the
    check after each commit does (the later one), and exactly one ends it. Deferred, the
    workflow waits in FinishReport.unsettled, and the rescue sweep ends it if nobody checks."""
    wf = smifdb.submit(conn, {"jobs": [job("a"), job("b")]})
    a, b = queue.claim(conn, "r1", 2, lease=60)
    settle = queue._settle
    barrier = threading.Barrier(2)

    def settle_together(*args):  # both record, then count and check, then commit
        barrier.wait(timeout=10)
        result = settle(*args)
        barrier.wait(timeout=10)
        return result

    monkeypatch.setattr(queue, "_settle", settle_together)
    reports: list[queue.FinishReport] = []

    def record(claimed) -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            reports.append(queue.finish(c, "r1", done([claimed]), defer_settle=defer))

    threads = [threading.Thread(target=record, args=(x,)) for x in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(queue, "_settle", settle)
    ended = [r.finished_workflows for r in reports if r.finished_workflows]
    if not defer:
        assert ended == [{wf: "succeeded"}]
    else:
        assert ended == [] and all(r.unsettled == {wf} for r in reports)
        assert read.finished_status(conn, wf) is None
        queue.rescue(conn, "sweeper", dead_after=30)
    assert read.finished_status(conn, wf) == "succeeded"
    ends = conn.execute(
        "SELECT count(*) FROM events WHERE workflow_id = %s AND job_id IS NULL"
        " AND to_status = 'succeeded'",
        [wf],
    ).fetchone()[0]
    assert ends == 1


def test_claims_close_once_recorded_and_the_sweep_closes_what_was_left_open(conn) -> None:
    runner_rows.start(conn, "r1", host="h", pid=1, slots=3, dead_after=30)  # alive
    smifdb.submit(conn, {"jobs": [job(f"j{i}") for i in range(3)]})
    claimed = queue.claim(conn, "r1", 3, lease=60)
    (claim_id,) = {c.claim_id for c in claimed}
    queue.finish(conn, "r1", done(claimed[:2]))
    open_claims = "SELECT id FROM claims WHERE closed_at IS NULL ORDER BY id"
    assert conn.execute(open_claims).fetchall() == [(claim_id,)]
    queue.rescue(conn, "sweeper", dead_after=30)  # a job still runs under it: stays open
    assert conn.execute(open_claims).fetchall() == [(claim_id,)]
    queue.finish(conn, "r1", done(claimed[2:]), close=[claim_id])
    assert conn.execute(open_claims).fetchall() == []

    smifdb.submit(conn, {"jobs": [job("x")]})
    claimed = queue.claim(conn, "r1", 1, lease=60)
    queue.finish(conn, "r1", done(claimed))  # recorded, but its runner never closed it
    assert len(conn.execute(open_claims).fetchall()) == 1
    queue.rescue(conn, "sweeper", dead_after=30)
    assert conn.execute(open_claims).fetchall() == []


def test_history_shows_each_claim_with_its_attempt(conn) -> None:
    """A claim is recorded with the end of its attempt; while the attempt runs it comes from
    the job. Either way the history shows it once, before the attempt's end."""
    smifdb.submit(conn, {"jobs": [job("a", max_attempts=2)]})
    (a1,) = queue.claim(conn, "r1", 1, lease=60)
    history = (
        "SELECT to_status, attempt, split_part(actor, '@', 1), reason FROM smifdb_job_history"
        " WHERE job_id = %s ORDER BY event_id NULLS LAST, at"
    )
    assert conn.execute(history, [a1.id]).fetchall() == [
        ("ready", None, "api", "submitted"),
        ("running", 1, "r1", "claimed"),
    ]
    queue.finish(conn, "r1", done([a1], status="failed", error="boom"))
    conn.execute("UPDATE ready_jobs SET not_before = NULL")
    (a2,) = queue.claim(conn, "r2", 1, lease=60)
    queue.finish(conn, "r2", done([a2], owner="r2"))
    rows = conn.execute(history, [a1.id]).fetchall()
    assert rows == [
        ("ready", None, "api", "submitted"),
        ("running", 1, "r1", "claimed"),
        ("ready", 1, "r1", "retry"),
        ("running", 2, "r2", "claimed"),
        ("succeeded", 2, "r2", "succeeded"),
    ]
    claims = conn.execute(
        "SELECT claimed_at, claimed_by FROM events WHERE job_id = %s AND claimed_at IS NOT NULL"
        " ORDER BY id",
        [a1.id],
    ).fetchall()
    assert claims == [(a1.claimed_at, "r1"), (a2.claimed_at, "r2")]
