"""How long does a /metrics scrape take on a big database?

    python benchmarks/metrics.py [--dsn DSN] [--jobs 100000] [--repeat 20]

Writes rows straight into the tables with generate_series (no runners), in two shapes:

- history: workflows of 100 jobs, 90% succeeded, 5% failed, 5% running; two events a job (its
  submission, and the end of its attempt, which records its claim) and one claims row a job,
  spread over two hours; 50 live runners and 500 stopped ones. Workflows' jobs are written
  interleaved, so each job of a workflow lies on a different heap page: the worst layout for
  counting one workflow's jobs by index;
- live: one running workflow of all the jobs (40% succeeded, 20% ready, 1% running, the rest
  waiting), its events in the last minute (so the events tail is cut at TAIL rows).

For each: the median and worst time of `smifdb.store.metrics.snapshot`, of a whole scrape
through the app (TestClient: snapshot and rendering), and each statement's execution time
from EXPLAIN ANALYZE.
"""

from __future__ import annotations

import statistics
import time

import psycopg
from common import database, machine, parser
from starlette.testclient import TestClient

from smifdb.api import create_app
from smifdb.store import metrics, runners

RESET = (
    "TRUNCATE workflows, jobs, job_edges, events, runners, ready_jobs, claims, workflow_counts"
    " RESTART IDENTITY CASCADE"
)

HISTORY = """
INSERT INTO workflows (id, name, status, job_count, submitted_at, started_at, finished_at)
SELECT g, 'w' || g,
       (CASE WHEN g %% 20 = 0 THEN 'failed' WHEN g %% 20 = 1 THEN 'running'
             ELSE 'succeeded' END)::workflow_status,
       %(per)s, now() - interval '2 hours', now() - interval '2 hours',
       CASE WHEN g %% 20 <> 1 THEN now() - interval '1 hour' END
FROM generate_series(1, %(workflows)s) g;

INSERT INTO jobs (workflow_id, key, kind, payload, status, created_at, started_at, finished_at)
SELECT w, 'j' || k, 'python', '{"function": "smifdb.examples:noop"}',
       s::job_status, t, CASE WHEN s NOT IN ('waiting', 'ready', 'upstream_failed') THEN t END,
       CASE WHEN s NOT IN ('waiting', 'ready', 'running') THEN t + (k %% 37) * interval '1 s' END
FROM generate_series(1, %(workflows)s) w, generate_series(0, %(per)s - 1) k,
LATERAL (SELECT CASE
    WHEN w %% 20 = 0 THEN CASE WHEN k %% 10 = 0 THEN 'failed'
                                WHEN k %% 10 < 4 THEN 'upstream_failed' ELSE 'succeeded' END
    WHEN w %% 20 = 1 THEN CASE WHEN k < %(per)s * 4 / 10 THEN 'succeeded'
                                WHEN k < %(per)s / 2 THEN 'running'
                                WHEN k < %(per)s * 7 / 10 THEN 'ready' ELSE 'waiting' END
    ELSE 'succeeded' END AS s,
    now() - interval '2 hours' + (w * %(per)s + k) * %(step)s * interval '1 s' AS t) x;
"""

LIVE = """
INSERT INTO workflows (id, name, status, job_count, submitted_at, started_at)
VALUES (1, 'live', 'running', %(jobs)s, now() - interval '1 minute', now());

INSERT INTO jobs (workflow_id, key, kind, payload, status, created_at, started_at, finished_at)
SELECT 1, 'j' || k, 'python', '{"function": "smifdb.examples:noop"}', s::job_status, t,
       CASE WHEN s IN ('succeeded', 'running') THEN t END,
       CASE WHEN s = 'succeeded' THEN t + interval '10 ms' END
FROM generate_series(0, %(jobs)s - 1) k,
LATERAL (SELECT CASE WHEN k < %(jobs)s * 4 / 10 THEN 'succeeded'
                     WHEN k < %(jobs)s * 41 / 100 THEN 'running'
                     WHEN k < %(jobs)s * 6 / 10 THEN 'ready' ELSE 'waiting' END AS s,
                now() - interval '1 minute' + k * %(step)s * interval '1 s' AS t) x;
"""

# Two events a job (submitted; ended, carrying its claim), in time order, so ids follow time.
EVENTS = """
INSERT INTO events (at, workflow_id, job_id, from_status, to_status, attempt, actor, reason,
                    claimed_at, claimed_by)
SELECT at, workflow_id, id, from_status, to_status, attempt, 'bench', reason, claimed_at,
       CASE WHEN claimed_at IS NOT NULL THEN 'bench' END FROM (
    SELECT created_at AS at, workflow_id, id, NULL AS from_status,
           CASE WHEN status = 'waiting' THEN 'waiting' ELSE 'ready' END AS to_status,
           NULL::int AS attempt, 'submitted' AS reason, NULL::timestamptz AS claimed_at
    FROM jobs
    UNION ALL
    SELECT finished_at, workflow_id, id, CASE WHEN started_at IS NULL THEN 'waiting'
           ELSE 'running' END, status::text, 1, 'ended', started_at
    FROM jobs WHERE finished_at IS NOT NULL
) e ORDER BY at;

INSERT INTO runners (name, host, pid, slots, state, last_heartbeat_at, jobs_succeeded,
                     jobs_failed)
SELECT 'r' || g, 'host', g, 64, (CASE WHEN g <= 50 THEN 'active' ELSE 'stopped' END)::runner_state,
       CASE WHEN g <= 50 THEN now() ELSE now() - interval '2 days' END, g * 1000, g
FROM generate_series(1, 550) g;

UPDATE jobs SET lease_owner = 'r' || (id %% 50 + 1) WHERE status = 'running';

-- What the queue keeps beside the jobs (migration 0009): ready rows, leases, finished counts.
INSERT INTO ready_jobs (job_id, workflow_id, priority)
SELECT id, workflow_id, priority FROM jobs WHERE status = 'ready';
-- One claim a job, in claim order (the metrics read the newest claims): closed once ended.
INSERT INTO claims (workflow_id, owner, claimed_at, expires_at, closed_at, job_ids)
SELECT workflow_id, coalesce(lease_owner, 'bench'), started_at, now() + interval '5 min',
       finished_at, ARRAY[id]
FROM jobs WHERE started_at IS NOT NULL ORDER BY started_at;
INSERT INTO workflow_counts (workflow_id, shard, finished)
SELECT workflow_id, 0, count(*) FROM jobs
WHERE status NOT IN ('waiting', 'ready', 'running') GROUP BY workflow_id;
"""


def fill(conn: psycopg.Connection, shape: str, jobs: int) -> None:
    conn.execute(RESET)
    if shape == "history":
        script, params = HISTORY, {"workflows": jobs // 100, "per": 100, "step": 7200 / jobs}
    else:
        script, params = LIVE, {"jobs": jobs, "step": 50 / jobs}
    for statement in (script + EVENTS).split(";\n"):
        if statement.strip():
            conn.execute(statement, params)  # one statement a call: parameters are bound
    conn.execute("SELECT setval(pg_get_serial_sequence('workflows', 'id'), max(id)) FROM workflows")
    conn.execute("VACUUM ANALYZE")


def statements(conn: psycopg.Connection) -> dict[str, float]:
    """Execution time (ms) of each statement, from EXPLAIN ANALYZE."""
    negated = [-float(b) for b in reversed(metrics.DURATION_BUCKETS)]
    params = {
        "dead_after": 30.0,
        "recent": metrics.RECENT_RUNNER,
        "tail": metrics.TAIL,
        "window": metrics.WINDOW,
        "negated": negated,
        "n": len(negated),
    }
    queries = {
        name: getattr(metrics, name)
        for name in ("WORKFLOWS", "JOBS_NOT_IN_SUCCEEDED", "OLDEST_READY", "RECENT_EVENTS")
    }
    queries["RUNNERS"] = runners._STATUS  # the runner states `smifdb runner status` reports
    timings = {}
    for name, query in queries.items():
        plan = conn.execute(
            "EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + query, params
        ).fetchone()[0]
        timings[name] = plan[0]["Execution Time"]
    return timings


def timed(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    with database(args.dsn) as dsn:
        print(machine(dsn))
        for shape in ("history", "live"):
            with psycopg.connect(dsn, autocommit=True) as conn:
                fill(conn, shape, args.jobs)
                counts = conn.execute(
                    "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM events)"
                ).fetchone()
                print(f"\n{shape}: {counts[0]} jobs, {counts[1]} events")
                snap = metrics.snapshot(conn, dead_after=30.0)
                print(f"  jobs {snap.jobs}")
                print(f"  window {snap.window:.1f} s, claims {snap.claims}")
                median, worst = timed(lambda c=conn: metrics.snapshot(c, dead_after=30.0), 20)
                print(f"  snapshot: median {median:.1f} ms, worst {worst:.1f} ms")
                for name, ms in statements(conn).items():
                    print(f"    {name:<22} {ms:7.2f} ms")
            with TestClient(create_app(dsn)) as client:
                client.get("/metrics")
                median, worst = timed(lambda: client.get("/metrics"), args.repeat)
                size = len(client.get("/metrics").content)
            print(f"  GET /metrics: median {median:.1f} ms, worst {worst:.1f} ms ({size} bytes)")


if __name__ == "__main__":
    main()
