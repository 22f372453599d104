"""Retention (`smifdb prune`) on real runs: what goes, what never goes, dry runs, the event
archive, bad durations, index-driven deletes on big tables, and a runner working throughout."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from processes import PY, Runners, cli, wait_for

import smifdb
from smifdb.spec import parse
from smifdb.store import modelruns, queue
from smifdb.store import prune as retention
from smifdb.store.queue import Outcome

NOOP = "smifdb.examples:noop"
OLD = timedelta(days=40)


def diamond(name: str) -> dict:
    """4 jobs, 4 edges."""
    return {
        "name": name,
        "jobs": [
            {"key": "a", "python": NOOP},
            {"key": "b", "python": NOOP, "after": ["a"]},
            {"key": "c", "python": NOOP, "after": ["a"]},
            {"key": "d", "python": NOOP, "after": ["b", "c"]},
        ],
    }


def run_all(runners: Runners) -> None:
    """Run everything submitted so far with a real runner process."""
    proc = runners.start("--slots", "4", "--exit-when-idle")
    assert proc.wait(60) == 0


def run_in_store(conn: psycopg.Connection, workflow_id: int, status: str = "succeeded") -> None:
    """Finish a workflow through the store, as a runner would."""
    scope = queue.Scope(workflow_id=workflow_id)
    while claimed := queue.claim(conn, "t", 100, lease=60, scope=scope):
        outcomes = [
            Outcome(c.id, c.workflow_id, c.attempt, "t", status, c.max_attempts) for c in claimed
        ]
        queue.finish(conn, "t", outcomes)


def backdate(conn: psycopg.Connection, workflow_ids: list[int], by: timedelta = OLD) -> None:
    conn.execute(
        "UPDATE workflows SET submitted_at = submitted_at - %(by)s,"
        " started_at = started_at - %(by)s, finished_at = finished_at - %(by)s"
        " WHERE id = ANY(%(ids)s)",
        {"by": by, "ids": workflow_ids},
    )


def backdate_model_run(conn: psycopg.Connection, model_run_id: int, by: timedelta = OLD) -> None:
    conn.execute(
        "UPDATE model_runs SET submitted_at = submitted_at - %s, finished_at = finished_at - %s"
        " WHERE id = %s",
        [by, by, model_run_id],
    )


class Footprint:
    """A workflow's rows, remembered by id so that orphans would be found after a delete."""

    def __init__(self, conn: psycopg.Connection, workflow_ids: list[int]) -> None:
        self.conn, self.workflow_ids = conn, workflow_ids
        self.job_ids = [
            r[0]
            for r in conn.execute("SELECT id FROM jobs WHERE workflow_id = ANY(%s)", [workflow_ids])
        ]
        self.before = self.counts()

    def counts(self) -> dict[str, int]:
        one = self.conn.execute(
            """
            SELECT (SELECT count(*) FROM workflows WHERE id = ANY(%(w)s)),
                   (SELECT count(*) FROM jobs WHERE id = ANY(%(j)s) OR workflow_id = ANY(%(w)s)),
                   (SELECT count(*) FROM job_edges
                    WHERE parent_id = ANY(%(j)s) OR child_id = ANY(%(j)s)),
                   (SELECT count(*) FROM events WHERE workflow_id = ANY(%(w)s)
                    OR job_id = ANY(%(j)s))
            """,
            {"w": self.workflow_ids, "j": self.job_ids},
        ).fetchone()
        return dict(zip(["workflows", "jobs", "edges", "events"], one, strict=True))

    def gone(self) -> bool:
        return set(self.counts().values()) == {0}

    def untouched(self) -> bool:
        return self.counts() == self.before


def model_run(conn: psycopg.Connection, name: str, bundles: int) -> tuple[int, list[int]]:
    """A model run with ``bundles`` bundles, each run to the end through the store."""
    mr_id = modelruns.create(
        conn,
        name=name,
        kind="python",
        project_dir="/nowhere",
        decide="smifdb.examples:converge_decision",
        options={},
        priority=0,
        actor="test",
    )
    run = modelruns.get(conn, mr_id)
    workflow_ids = []
    for bundle in range(bundles):
        with conn.transaction():
            wf = modelruns.submit_bundle(
                conn, run, bundle, parse(diamond(f"{name}-{bundle}")), actor="t"
            )
        run_in_store(conn, wf)
        workflow_ids.append(wf)
    return mr_id, workflow_ids


def end_model_run(conn: psycopg.Connection, model_run_id: int) -> None:
    with conn.transaction():
        assert modelruns.finish(conn, model_run_id, "succeeded", actor="t", reason="done")


def expired_history(conn: psycopg.Connection, runners, prefix: str, keep: str):
    """Five finished workflows and an ended model run of two bundles, all past the cutoff,
    and one recent workflow: (old workflows, kept workflow, model run, its bundles)."""
    old = [smifdb.submit(conn, diamond(f"{prefix}{i}")) for i in range(5)]
    recent = smifdb.submit(conn, diamond(keep))
    run_all(runners)
    mr, mr_wfs = model_run(conn, "ended", 2)
    end_model_run(conn, mr)
    backdate(conn, [*old, *mr_wfs])
    backdate_model_run(conn, mr)
    return old, recent, mr, mr_wfs


def model_run_rows(conn: psycopg.Connection, model_run_id: int) -> tuple[int, int]:
    return conn.execute(
        "SELECT (SELECT count(*) FROM model_runs WHERE id = %(m)s),"
        " (SELECT count(*) FROM events WHERE model_run_id = %(m)s)",
        {"m": model_run_id},
    ).fetchone()


# -- what goes and what stays -----------------------------------------------------------


def test_prune_deletes_old_finished_workflows_and_all_their_rows(dsn, conn, runners) -> None:
    old = [smifdb.submit(conn, diamond(f"old{i}")) for i in range(3)]
    failing = diamond("old-failed")
    failing["jobs"][1] = {"key": "b", "command": [PY, "-c", "raise SystemExit(3)"], "after": ["a"]}
    old.append(smifdb.submit(conn, failing))
    recent = smifdb.submit(conn, diamond("recent"))
    run_all(runners)
    statuses = dict(conn.execute("SELECT id, status::text FROM workflows").fetchall())
    assert statuses[old[-1]] == "failed" and statuses[recent] == "succeeded"
    unfinished = smifdb.submit(conn, diamond("never run"))
    conn.execute(
        "UPDATE workflows SET submitted_at = now() - interval '90 days' WHERE id = %s",
        [unfinished],
    )
    backdate(conn, old)
    gone, kept = Footprint(conn, old), Footprint(conn, [recent, unfinished])
    assert (gone.before["workflows"], gone.before["jobs"], gone.before["edges"]) == (4, 16, 16)
    assert gone.before["events"] >= 4 * 4 * 3  # submitted, running, succeeded at least

    out = cli(dsn, "prune", "--older-than", "30d", "--batch-size", "3")
    assert out.returncode == 0, out.stderr
    assert "deleted 4 workflow(s) and 0 model run(s)" in out.stdout, out.stdout
    assert f"16 jobs, 16 edges, {gone.before['events']:,} events" in out.stdout, out.stdout
    assert gone.gone(), gone.counts()
    assert kept.untouched(), kept.counts()

    # The cutoff is a cutoff: 41 days ago is not older than 45d, and nothing is left to do.
    assert "deleted 0 workflow(s)" in cli(dsn, "prune", "--older-than", "45d").stdout
    assert kept.untouched()


def test_model_runs_go_whole_and_only_once_ended(conn) -> None:
    ended, ended_wfs = model_run(conn, "ended", 3)
    end_model_run(conn, ended)
    backdate(conn, ended_wfs)
    backdate_model_run(conn, ended)
    running, running_wfs = model_run(conn, "running", 2)  # still running: decision input
    backdate(conn, running_wfs)
    backdate_model_run(conn, running)
    late, late_wfs = model_run(conn, "late", 2)  # ended long ago, but one bundle ended recently
    end_model_run(conn, late)
    backdate(conn, late_wfs[:1])
    backdate_model_run(conn, late)
    recent, recent_wfs = model_run(conn, "recent", 1)  # bundles old, the run itself ended now
    backdate(conn, recent_wfs)
    end_model_run(conn, recent)
    standalone = smifdb.submit(conn, diamond("standalone"))
    run_in_store(conn, standalone)
    backdate(conn, [standalone])

    gone = Footprint(conn, [*ended_wfs, standalone])
    kept = Footprint(conn, [*running_wfs, *late_wfs, *recent_wfs])
    kept_runs = {m: model_run_rows(conn, m) for m in (running, late, recent)}
    assert model_run_rows(conn, ended)[1] >= 5  # submitted, 3 bundles, ended

    report = retention.prune(conn, timedelta(days=30), batch_size=2)
    assert (report.workflows, report.model_runs, report.jobs) == (4, 1, 16)
    assert gone.gone(), gone.counts()
    assert model_run_rows(conn, ended) == (0, 0)
    assert kept.untouched(), kept.counts()
    assert {m: model_run_rows(conn, m) for m in kept_runs} == kept_runs


def test_dry_run_writes_nothing_and_counts_what_prune_deletes(dsn, conn, runners) -> None:
    old, recent, mr, mr_wfs = expired_history(conn, runners, "old", "recent")
    doomed, kept = Footprint(conn, [*old, *mr_wfs]), Footprint(conn, [recent])
    model_run_only = conn.execute(
        "SELECT count(*) FROM events WHERE model_run_id = %s AND workflow_id IS NULL", [mr]
    ).fetchone()[0]
    expected = {**doomed.before, "events": doomed.before["events"] + model_run_only}
    tables = ["workflows", "jobs", "job_edges", "events", "model_runs"]

    def snapshot() -> dict:
        # Every row's place, version and locker: a write changes ctid or xmin, a lock xmax.
        return {
            t: conn.execute(
                f"SELECT array_agg((ctid, xmin, xmax)::text ORDER BY ctid) FROM {t}"
            ).fetchone()
            for t in tables
        }

    before = snapshot()
    out = cli(dsn, "prune", "--older-than", "30d", "--dry-run", "--batch-size", "2")
    assert out.returncode == 0, out.stderr
    assert snapshot() == before
    assert "would delete 7 workflow(s) and 1 model run(s) finished before" in out.stdout, out.stdout
    assert (
        f"{expected['jobs']} jobs, {expected['edges']} edges, {expected['events']:,} events"
        in out.stdout
    ), out.stdout

    report = retention.prune(conn, timedelta(days=30))
    assert (report.workflows, report.model_runs) == (7, 1)
    assert (report.jobs, report.edges, report.events) == (
        expected["jobs"],
        expected["edges"],
        expected["events"],
    )
    assert doomed.gone()
    assert kept.untouched()


# -- the archive ------------------------------------------------------------------------


def event_rows(conn: psycopg.Connection, workflow_ids: list[int], model_run_ids: list[int]):
    rows = conn.execute(
        "SELECT id, workflow_id, model_run_id, job_id, to_status, actor FROM events"
        " WHERE workflow_id = ANY(%s) OR model_run_id = ANY(%s)",
        [workflow_ids, model_run_ids],
    ).fetchall()
    return {r[0]: r for r in rows}


def archived(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_archive_holds_every_deleted_event_exactly_once(dsn, conn, runners, tmp_path) -> None:
    archive = tmp_path / "events.jsonl"
    first, keep, mr, mr_wfs = expired_history(conn, runners, "a", "keep")
    expected = event_rows(conn, [*first, *mr_wfs], [mr])
    kept = event_rows(conn, [keep], [])

    args = ["prune", "--older-than", "30d", "--archive-events", str(archive), "--batch-size", "2"]
    out = cli(dsn, *args)
    assert out.returncode == 0, out.stderr
    lines = archived(archive)
    ids = [e["id"] for e in lines]
    assert len(ids) == len(set(ids)) == len(expected)
    assert set(ids) == set(expected)
    for e in lines:
        assert (
            e["id"],
            e["workflow_id"],
            e["model_run_id"],
            e["job_id"],
            e["to_status"],
            e["actor"],
        ) == expected[e["id"]]
        assert e["at"] and "reason" in e and "from_status" in e and "attempt" in e
    assert conn.execute("SELECT count(*) FROM events WHERE id = ANY(%s)", [ids]).fetchone()[0] == 0
    assert event_rows(conn, [keep], []) == kept

    # A later prune appends; a torn last line (a crash mid-write never commits) is cut off.
    second = [smifdb.submit(conn, diamond(f"b{i}")) for i in range(3)]
    run_all(runners)
    backdate(conn, second)
    expected_2 = event_rows(conn, second, [])
    with archive.open("a") as f:
        f.write('{"id": 1, "at": "2026-')
    out = cli(dsn, *args)
    assert out.returncode == 0, out.stderr
    ids = [e["id"] for e in archived(archive)]
    assert len(ids) == len(set(ids)) == len(expected) + len(expected_2)
    assert set(ids) == set(expected) | set(expected_2)
    assert "torn" in out.stderr


class FailingArchive(retention.EventArchive):
    def write(self, rows: list[tuple]) -> None:
        raise OSError(28, "No space left on device")


def test_events_are_not_deleted_unless_archived(dsn, conn, tmp_path) -> None:
    old = [smifdb.submit(conn, diamond(f"old{i}")) for i in range(3)]
    for wf in old:
        run_in_store(conn, wf)
    backdate(conn, old)
    doomed = Footprint(conn, old)
    with FailingArchive(tmp_path / "events.jsonl") as archive, pytest.raises(OSError):
        retention.prune(conn, timedelta(days=30), archive=archive)
    assert doomed.untouched(), doomed.counts()  # the batch rolled back: nothing lost

    # A second prune may not append to a file another prune is writing.
    with retention.EventArchive(tmp_path / "events.jsonl"):
        args = ["prune", "--older-than", "30d", "--archive-events", str(tmp_path / "events.jsonl")]
        out = cli(dsn, *args)
        assert out.returncode == 2 and "another prune" in out.stderr, out.stderr
        assert doomed.untouched()
    assert cli(dsn, *args).returncode == 0
    assert doomed.gone()
    assert len(archived(tmp_path / "events.jsonl")) == doomed.before["events"]


def test_dry_run_does_not_create_the_archive(dsn, conn, tmp_path) -> None:
    archive = tmp_path / "events.jsonl"
    out = cli(dsn, "prune", "--older-than", "1d", "--dry-run", "--archive-events", str(archive))
    assert out.returncode == 0, out.stderr
    assert not archive.exists()


# -- input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["30", "d", "-5d", "30x", "", "1.5d", "30 days", "5y", "30D", "99999999999w"]
)
def test_bad_durations_exit_2(dsn, value) -> None:
    out = cli(dsn, "prune", "--older-than", value)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "--older-than" in out.stderr and value in out.stderr, out.stderr


def test_durations() -> None:
    parse = retention.parse_duration
    assert parse("30d") == timedelta(days=30)
    assert parse("12h") == timedelta(hours=12)
    assert parse("90m") == timedelta(minutes=90)
    assert parse("45s") == timedelta(seconds=45)
    assert parse("2w") == timedelta(weeks=2)
    assert parse("1d12h") == timedelta(hours=36)
    assert parse(" 0s ") == timedelta(0)


def test_missing_older_than_and_bad_batch_size_exit_2(dsn) -> None:
    assert cli(dsn, "prune").returncode == 2
    assert cli(dsn, "prune", "--older-than", "1d", "--batch-size", "0").returncode == 2


# -- bounded transactions and big tables ------------------------------------------------


def test_a_big_workflow_goes_in_several_transactions(conn) -> None:
    chain = {
        "name": "big",
        "jobs": [
            {"key": f"j{i}", "python": NOOP, "after": [f"j{i - 1}"] if i else []} for i in range(50)
        ],
    }
    big = smifdb.submit(conn, chain)
    small = smifdb.submit(conn, diamond("small"))
    for wf in (big, small):
        run_in_store(conn, wf)
    backdate(conn, [big, small])
    gone = Footprint(conn, [big, small])

    report = retention.prune(conn, timedelta(days=30), max_jobs=8)
    assert (report.workflows, report.jobs, report.edges, report.events) == (
        2,
        54,
        53,
        gone.before["events"],
    )
    assert report.transactions >= 7  # 50 jobs at most 8 at a time, then the small one
    assert gone.gone(), gone.counts()


def fake_history(conn: psycopg.Connection, workflows: int, jobs: int, age: str) -> None:
    """Finished chains written straight into the tables: big tables quickly."""
    first = conn.execute("SELECT coalesce(max(id), 0) FROM jobs").fetchone()[0]
    conn.execute(
        """
        WITH w AS (
            INSERT INTO workflows (name, status, job_count, submitted_at, started_at,
                                   finished_at)
            SELECT 'fake', 'succeeded', %(jobs)s, now() - %(age)s::interval,
                   now() - %(age)s::interval, now() - %(age)s::interval
            FROM generate_series(1, %(workflows)s)
            RETURNING id
        )
        INSERT INTO jobs (workflow_id, key, kind, payload, status, finished_at)
        SELECT w.id, 'j' || k, 'python', '{}', 'succeeded', now() FROM w,
               generate_series(0, %(jobs)s - 1) k
        """,
        {"workflows": workflows, "jobs": jobs, "age": age},
    )
    conn.execute(
        """
        INSERT INTO job_edges (parent_id, child_id)
        SELECT p.id, c.id FROM jobs c
        JOIN jobs p ON p.workflow_id = c.workflow_id AND p.key = 'j' || (substr(c.key, 2)::int - 1)
        WHERE c.id > %s AND c.key <> 'j0'
        """,
        [first],
    )
    conn.execute(
        """
        INSERT INTO events (workflow_id, job_id, to_status, actor)
        SELECT j.workflow_id, j.id, s, 'fake' FROM jobs j,
               unnest(ARRAY['waiting', 'running', 'succeeded']) s
        WHERE j.id > %s
        """,
        [first],
    )


def test_deletes_are_index_driven_on_big_tables(conn) -> None:
    """Every prune statement reads indexes, never whole tables (EXPLAIN ANALYZE, rolled back)."""
    fake_history(conn, 4000, 25, "60 days")  # 100,000 jobs, 300,000 events
    fake_history(conn, 2000, 25, "1 day")
    fake_history(conn, 50000, 1, "1 day")  # workflows big enough that probes beat a scan
    # and 1000 model runs of 2 bundles each, made of workflows already there
    runs = [
        r[0]
        for r in conn.execute(
            "INSERT INTO model_runs (name, kind, project_dir, status, finished_at)"
            " SELECT 'm' || g, 'smif', '/p', 'succeeded', now() - interval '50 days'"
            " FROM generate_series(1, 1000) g RETURNING id"
        )
    ]
    conn.execute(
        "UPDATE workflows SET model_run_id = %(first)s + (id - 2001) / 2, bundle = id %% 2"
        " WHERE id > 2000 AND id <= 4000",
        {"first": runs[0]},
    )
    conn.execute("ANALYZE")
    cutoff = conn.execute("SELECT now() - interval '30 days'").fetchone()[0]
    ids = [r[0] for r in conn.execute("SELECT id FROM workflows ORDER BY id LIMIT 100")]
    jobs = queue.array(
        r[0] for r in conn.execute("SELECT id FROM jobs WHERE workflow_id = %s", [ids[0]])
    )
    batch = {"ids": queue.array(ids)}
    statements = {
        "lock workflows": (retention.LOCK_WORKFLOWS, {"after": 0, "cutoff": cutoff, "limit": 100}),
        "lock workflows, mid-way": (
            retention.LOCK_WORKFLOWS,
            {"after": ids[-1] + 3000, "cutoff": cutoff, "limit": 100},
        ),
        "lock bundles": (
            retention.LOCK_BUNDLES,
            # prune passes one batch of model runs (MODEL_RUNS' limit) at a time
            {"after": 0, "cutoff": cutoff, "limit": 100, "model_runs": queue.array(runs[:100])},
        ),
        "model runs": (
            retention.MODEL_RUNS,
            {"after": 0, "cutoff": cutoff, "limit": 100},
        ),
        "lock model runs": (retention.LOCK_MODEL_RUNS, {"ids": queue.array(runs[:100])}),
        "delete events": (retention.DELETE_WORKFLOW_EVENTS, batch),
        "delete edges": (retention.DELETE_WORKFLOW_EDGES, batch),
        "delete jobs": (retention.DELETE_WORKFLOW_JOBS, batch),
        "delete workflows": (retention.DELETE_WORKFLOWS, batch),
        "some jobs": (retention.SOME_JOBS, {"id": ids[0], "limit": 10}),
        "delete job events": (retention.DELETE_JOB_EVENTS, {"id": ids[0], "jobs": jobs}),
        "delete job edges": (retention.DELETE_JOB_EDGES, {"jobs": jobs}),
        "delete jobs by id": (retention.DELETE_JOBS, {"jobs": jobs}),
        "delete model run events": (retention.DELETE_MODEL_RUN_EVENTS, batch),
        "count": (retention.COUNT_WORKFLOW_ROWS, batch),
    }
    for name, (sql, params) in statements.items():
        with conn.transaction(force_rollback=True):
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN ANALYZE " + sql, params))
        for table in ("workflows", "jobs", "job_edges", "events"):
            assert f"Seq Scan on {table}" not in plan, f"{name}:\n{plan}"
        if name.startswith("lock workflows"):  # a keyset walk: each batch reads about its rows
            assert "Index Scan using workflows_pkey" in plan, plan

    report = retention.prune(conn, timedelta(days=30), batch_size=500)
    assert (report.workflows, report.model_runs, report.jobs, report.edges, report.events) == (
        4000,
        1000,
        100_000,
        96_000,
        300_000,
    )
    assert conn.execute("SELECT count(*) FROM workflows").fetchone()[0] == 52_000


# -- concurrency ------------------------------------------------------------------------


def test_skips_rows_locked_by_others_without_waiting(dsn, conn) -> None:
    old = [smifdb.submit(conn, diamond(f"old{i}")) for i in range(3)]
    for wf in old:
        run_in_store(conn, wf)
    backdate(conn, old)
    holder = psycopg.connect(dsn)  # e.g. a reader holding a row lock, open transaction
    try:
        holder.execute("SELECT 1 FROM workflows WHERE id = %s FOR KEY SHARE", [old[1]])
        conn.execute("SET lock_timeout = '5s'")  # fail, not hang, should prune ever wait
        started = time.monotonic()
        report = retention.prune(conn, timedelta(days=30))
        assert time.monotonic() - started < 5
        assert report.workflows == 2
    finally:
        holder.rollback()  # synchronous: close() alone may leave the lock held a moment longer
        holder.close()
    assert [r[0] for r in conn.execute("SELECT id FROM workflows")] == [old[1]]
    assert retention.prune(conn, timedelta(days=30)).workflows == 1  # the next prune takes it


class StallingArchive(retention.EventArchive):
    """Holds each prune transaction open, its locks taken and its deletes done, until the test
    hands out a permit."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.stalled, self.permits = threading.Event(), threading.Semaphore(0)

    def write(self, rows: list[tuple]) -> None:
        self.stalled.set()
        assert self.permits.acquire(timeout=60)
        super().write(rows)


def test_prune_does_not_block_a_working_runner(dsn, conn, runners, tmp_path) -> None:
    old = [smifdb.submit(conn, diamond(f"old{i}")) for i in range(20)]
    for wf in old:
        run_in_store(conn, wf)
    backdate(conn, old)
    doomed = Footprint(conn, old)
    # A chain: every step is a claim, a completion and a readiness update on the hot path.
    steps = 300
    chain = {
        "name": "busy",
        "jobs": [
            {
                "key": f"s{i}",
                "python": "smifdb.examples:sleep",
                "args": {"seconds": 0.01},
                "after": [f"s{i - 1}"] if i else [],
            }
            for i in range(steps)
        ],
    }
    busy = smifdb.submit(conn, chain)
    runners.start("--slots", "2")

    def done_jobs() -> int:
        return conn.execute(
            "SELECT count(*) FROM jobs WHERE workflow_id = %s AND status = 'succeeded'", [busy]
        ).fetchone()[0]

    wait_for(lambda: done_jobs() >= 5, what="the runner to get going")
    archive = StallingArchive(tmp_path / "events.jsonl")
    outcome: list[object] = []

    def prune() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as c, archive:
                outcome.append(retention.prune(c, OLD / 2, archive=archive, batch_size=5))
        except BaseException as exc:  # reported by the test thread
            outcome.append(exc)

    pruner = threading.Thread(target=prune)
    pruner.start()
    try:
        for _ in range(3):  # three of the four prune transactions, each held open
            assert archive.stalled.wait(30), outcome
            archive.stalled.clear()
            before = done_jobs()
            wait_for(lambda b=before: done_jobs() >= b + 20, timeout=20, what="runner progress")
            archive.permits.release()
    finally:
        archive.permits.release(100)
        pruner.join(60)
    (report,) = outcome
    assert isinstance(report, retention.PruneReport), report
    assert (report.workflows, report.transactions) == (20, 4)
    assert doomed.gone(), doomed.counts()
    assert len(archived(tmp_path / "events.jsonl")) == doomed.before["events"]
    status = wait_for(
        lambda: conn.execute(
            "SELECT status::text FROM workflows WHERE id = %s AND finished_at IS NOT NULL",
            [busy],
        ).fetchone(),
        timeout=60,
        what="the busy workflow to end",
    )
    assert status == ("succeeded",) and done_jobs() == steps
