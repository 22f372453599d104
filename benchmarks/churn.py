"""Retention under churn: with `smifdb prune` and vacuum keeping up, table sizes stay flat.

    python benchmarks/churn.py [--dsn DSN] [--cycles 10] [--workflows 200] [--jobs 250]
                               [--vacuum explicit|auto] [--overlap]

One database throughout (a new local cluster with durable commits unless --dsn is given). Each
cycle submits WORKFLOWS workflows of JOBS no-op Python jobs (random layered DAGs, two edges per
job), runs them with 2 runner processes, prunes everything that finished before the cycle
began (the previous cycle: a retention window of one cycle) and vacuums: an explicit VACUUM,
or with --vacuum auto, waiting until autovacuum (the tables' own settings) has cleared the
dead rows. With --overlap the prune runs while the cycle's runners work: their rate during
the prune, and pg_stat_activity sampled every 2 ms for sessions waiting for the prune's locks,
show what a prune costs the hot path.

Sizes of jobs, job_edges, events and workflows (heap, indexes, total) are printed before the
churn and after each step of each cycle.
"""

from __future__ import annotations

import tempfile
import threading
import time
from datetime import datetime

import psycopg
from common import database, layered_dag, machine, parser
from throughput import spawn_runners, steady_rate

import smifdb
from smifdb.store import prune as retention

TABLES = ("jobs", "job_edges", "events", "workflows", "ready_jobs", "claims", "workflow_counts")
MB = 1024 * 1024

_SIZES = """
SELECT c.relname, pg_relation_size(c.oid), pg_indexes_size(c.oid), pg_total_relation_size(c.oid),
       c.reltuples
FROM pg_class c WHERE c.relname = ANY(%s) AND c.relkind = 'r'
"""
_COUNTS = "SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in TABLES)
_DEAD = "SELECT relname, n_dead_tup, n_live_tup FROM pg_stat_user_tables WHERE relname = ANY(%s)"
# Sessions waiting for a lock: any at all, and those waiting for the prune's session.
_LOCK_WAITS = """
SELECT count(*), count(*) FILTER (WHERE %s = ANY(pg_blocking_pids(pid)))
FROM pg_stat_activity WHERE wait_event_type = 'Lock'
"""
_DONE_COUNT = """
SELECT count(*) FROM events
WHERE workflow_id = ANY(%s) AND job_id IS NOT NULL AND to_status = 'succeeded'
"""
_DONE = """
SELECT extract(epoch FROM at)::float FROM events
WHERE workflow_id = ANY(%s) AND job_id IS NOT NULL AND to_status = 'succeeded'
"""


def sizes(conn: psycopg.Connection) -> dict[str, tuple[int, int, int]]:
    return {
        name: (heap, idx, total)
        for name, heap, idx, total, _ in conn.execute(_SIZES, [list(TABLES)])
    }


def header() -> str:
    cells = " ".join(f"{t + ' heap/idx MB':>22}" for t in TABLES)
    return f"{'cycle':>5} {'step':12} {cells} {'total MB':>9} {'jobs':>8} {'events':>9}"


def row(conn: psycopg.Connection, cycle: int | str, step: str) -> tuple[str, float]:
    s = sizes(conn)
    counts = conn.execute(_COUNTS).fetchone()
    cells = " ".join(f"{s[t][0] / MB:>11.1f}/{s[t][1] / MB:<10.1f}" for t in TABLES)
    total = sum(s[t][2] for t in TABLES) / MB
    return f"{cycle:>5} {step:12} {cells} {total:>9.1f} {counts[0]:>8,} {counts[2]:>9,}", total


def submit_cycle(dsn: str, workflows: int, jobs: int, cycle: int) -> list[int]:
    specs = [
        layered_dag(jobs, 2 * jobs, layers=10, seed=cycle * 1000 + i) | {"name": f"c{cycle}-{i}"}
        for i in range(workflows)
    ]
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [smifdb.submit(conn, spec) for spec in specs]


def run_cycle(dsn: str, logs: str) -> float:
    t0 = time.perf_counter()
    for p in spawn_runners(dsn, 2, 64, 64, logs):
        assert p.wait() == 0
    return time.perf_counter() - t0


def wait_for_autovacuum(dsn: str, timeout: float = 300) -> float | None:
    """Seconds until no table has more dead rows than the laxest autovacuum trigger (20% + 1000),
    i.e. autovacuum has dealt with what the prune left; None on timeout."""
    t0 = time.perf_counter()
    time.sleep(1)  # backends flush their statistics about once a second
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.perf_counter() - t0 < timeout:
            rows = conn.execute(_DEAD, [list(TABLES)]).fetchall()
            if all(dead <= 0.2 * live + 1000 for _, dead, live in rows):
                return time.perf_counter() - t0
            time.sleep(0.5)
    return None


class Pruner(threading.Thread):
    """Prunes everything that finished before ``began``; with ``start_after``, first waits for
    the runners to be under way (that many jobs of ``ids`` done), to prune while they work."""

    def __init__(
        self, dsn: str, began: datetime, batch_size: int, ids: list[int], start_after: int
    ):
        super().__init__()
        self.dsn, self.began, self.batch_size = dsn, began, batch_size
        self.ids, self.start_after = ids, start_after
        self.report: retention.PruneReport | None = None
        self.window = (0.0, 0.0)  # wall-clock start and end of the prune
        self.samples = self.lock_waits = self.waits_on_prune = 0  # pg_stat_activity samples

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as c:
            while self.start_after and c.execute(_DONE_COUNT, [self.ids]).fetchone()[0] < (
                self.start_after
            ):
                time.sleep(0.02)
            older_than = c.execute("SELECT now() - %s", [self.began]).fetchone()[0]
            stop = threading.Event()
            sampler = threading.Thread(
                target=self.sample_lock_waits, args=(stop, c.info.backend_pid)
            )
            sampler.start()
            start = time.time()
            try:
                self.report = retention.prune(c, older_than, batch_size=self.batch_size)
            finally:
                self.window = (start, time.time())
                stop.set()
                sampler.join()

    def sample_lock_waits(self, stop: threading.Event, prune_pid: int) -> None:
        """While the prune runs: sessions seen waiting for a lock, and waiting for the prune."""
        with psycopg.connect(self.dsn, autocommit=True) as c:
            while not stop.is_set():
                waiting, on_prune = c.execute(_LOCK_WAITS, [prune_pid]).fetchone()
                self.samples += 1
                self.lock_waits += waiting
                self.waits_on_prune += on_prune
                time.sleep(0.002)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--cycles", type=int, default=10)
    p.add_argument("--workflows", type=int, default=200, help="workflows per cycle")
    p.add_argument("--jobs", type=int, default=250, help="jobs per workflow")
    p.add_argument("--vacuum", choices=["explicit", "auto"], default="explicit")
    p.add_argument("--overlap", action="store_true", help="prune while the runners work")
    p.add_argument("--batch-size", type=int, default=100, help="prune --batch-size")
    args = p.parse_args()
    logs = tempfile.mkdtemp(prefix="smifdb-churn-logs-")
    with database(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        print(machine(dsn))
        print(
            f"{args.cycles} cycles of {args.workflows} workflows x {args.jobs} no-op jobs "
            f"({args.workflows * args.jobs:,} jobs, {2 * args.workflows * args.jobs:,} edges per "
            f"cycle); 2 runners x 64 slots; prune batch {args.batch_size}; vacuum {args.vacuum}"
            + ("; prune overlaps the runners" if args.overlap else "")
            + "\n"
        )
        print(header())
        print(row(conn, "-", "empty")[0])
        totals: list[float] = []
        notes = []
        for cycle in range(1, args.cycles + 1):
            began: datetime = conn.execute("SELECT now()").fetchone()[0]
            t0 = time.perf_counter()
            ids = submit_cycle(dsn, args.workflows, args.jobs, cycle)
            submit_s = time.perf_counter() - t0
            start_after = args.workflows * args.jobs // 10 if args.overlap else 0
            pruner = Pruner(dsn, began, args.batch_size, ids, start_after)
            if args.overlap:
                pruner.start()
            run_s = run_cycle(dsn, logs)
            done = [r[0] for r in conn.execute(_DONE, [ids])]
            if not args.overlap:
                print(row(conn, cycle, "after churn")[0])
                pruner.start()
            pruner.join()
            report = pruner.report
            assert report is not None
            print(row(conn, cycle, "after prune" if not args.overlap else "churn+prune")[0])
            t0 = time.perf_counter()
            if args.vacuum == "explicit":
                conn.execute("VACUUM " + ", ".join(TABLES))
                how = f"VACUUM {time.perf_counter() - t0:.1f} s"
            else:
                waited = wait_for_autovacuum(dsn)
                how = "autovacuum not done after 300 s"
                if waited is not None:
                    how = f"autovacuum done {waited:.1f} s after the prune"
            line, total = row(conn, cycle, "after vacuum")
            print(line, flush=True)
            totals.append(total)
            during = ""
            lo, hi = pruner.window
            if args.overlap and report.workflows and hi > lo:
                n = sum(1 for t in done if lo <= t <= hi)
                during = (
                    f", {n / (hi - lo):,.0f} jobs/s while the prune ran; {pruner.samples} samples"
                    f" of pg_stat_activity saw {pruner.waits_on_prune} sessions waiting for the"
                    f" prune, {pruner.lock_waits} waiting for any lock"
                )
            notes.append(
                f"cycle {cycle}: submit {submit_s:.1f} s, run {run_s:.1f} s "
                f"({steady_rate(done):,.0f} jobs/s steady{during}); prune {report.seconds:.2f} s "
                f"({report.workflows} workflows, {report.jobs:,} jobs, {report.edges:,} edges, "
                f"{report.events:,} events, {report.transactions} transactions); {how}"
            )
        print()
        print("\n".join(notes))
        steady = totals[2:]
        if steady:
            print(
                f"\ntotal after vacuum, cycles 3-{args.cycles}: min {min(steady):.1f} MB, "
                f"max {max(steady):.1f} MB, last {steady[-1]:.1f} MB"
            )


if __name__ == "__main__":
    main()
