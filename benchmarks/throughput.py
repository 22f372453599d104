"""Queue throughput and dispatch latency, smifdb side by side with pgqueuer and procrastinate.

    pip install "pgqueuer[asyncpg]" procrastinate     # only for the comparison
    python benchmarks/throughput.py [--dsn DSN] [--jobs 20000] [--peers pgqueuer,procrastinate]
                                    [--modes thread,workers] [--quick]

Everything runs in one process tree on one database (a new local cluster with durable
commits unless --dsn is given). Runners and pgqueuer workers are separate processes.

Throughput is measured in steady state, after the run and without polling during it: from each
system's own log of completions (smifdb's events, pgqueuer's pgqueuer_log, procrastinate's
procrastinate_events), the rate between
the 10% and the 90% completion (process start-up excluded). The wall time from spawning
workers to their exit is printed too. Dispatch latency is from a parent's
'succeeded' event to its child's 'running' event (both stamped with clock_timestamp()).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from common import database, layered_dag, machine, parser

import smifdb

HERE = Path(__file__).resolve().parent
NOOP = "smifdb.examples:noop"


def steady_rate(times: list[float]) -> float:
    """Jobs per second between the 10% and the 90% completion (start-up and tail excluded)."""
    times = sorted(times)
    lo, hi = times[len(times) // 10], times[(len(times) * 9) // 10]
    return 0.8 * len(times) / (hi - lo) if hi > lo else float("inf")


def completion_times(dsn: str, query: str, params: list) -> list[float]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(query, params)]


_SMIFDB_DONE = """
SELECT extract(epoch FROM at)::float FROM events
WHERE workflow_id = %s AND job_id IS NOT NULL AND to_status = 'succeeded'
"""
_PGQUEUER_DONE = (
    "SELECT extract(epoch FROM created)::float FROM pgqueuer_log WHERE status = 'successful'"
)


def spawn_runners(
    dsn: str,
    runners: int,
    slots: int,
    batch: int | None,
    logs: str,
    extra: Callable[[int], list[str]] = lambda i: [],
    in_thread: bool = True,
) -> list:
    """``runners`` runner processes that exit once idle; ``batch`` None: all free slots per
    claim; ``extra(i)``: more options for runner ``i``; ``in_thread``: no-op calls in runner
    threads, as pgqueuer's and procrastinate's in-process ones (else in warm workers, the
    default for users)."""
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smifdb.cli",
                "--dsn",
                dsn,
                "runner",
                "run",
                "--name",
                f"bench-{i}-{time.monotonic_ns()}",
                "--slots",
                str(slots),
                *(["--batch", str(batch)] if batch is not None else []),
                "--exit-when-idle",
                "--log-level",
                "warning",
                "--log-dir",
                logs,
                "--poll",
                "0.5",
                *(["--python-in-thread"] if in_thread else []),
                *extra(i),
            ],
        )
        for i in range(runners)
    ]


SMIFDB_TABLES = "workflows, jobs, job_edges, events, ready_jobs, claims, workflow_counts, runners"


def start_clean(dsn: str, tables: str, truncate: bool) -> None:
    """Each run of either system starts from empty tables (pgqueuer's log is emptied too) and
    a fresh checkpoint, so that no run inherits the other's history or pays for a checkpoint's
    full-page writes that happened to fall into it. Without ``truncate`` (someone's database,
    --dsn without --truncate) smifdb's tables are only vacuumed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if truncate:
            conn.execute(f"TRUNCATE {tables} CASCADE")
        conn.execute(f"VACUUM ANALYZE {tables}")
        conn.execute("CHECKPOINT")


def run_smifdb(
    dsn: str,
    spec: dict,
    runners: int,
    slots: int,
    batch: int,
    logs: str,
    truncate: bool,
    in_thread: bool = True,
) -> dict:
    start_clean(dsn, SMIFDB_TABLES, truncate)
    with psycopg.connect(dsn, autocommit=True) as conn:
        wf = smifdb.submit(conn, spec)
        conn.execute(
            "ANALYZE jobs, ready_jobs"
        )  # as pgqueuer's queue: both start with current statistics
    t0 = time.perf_counter()
    procs = spawn_runners(dsn, runners, slots, batch, logs, in_thread=in_thread)
    for p in procs:
        p.wait()
    wall = time.perf_counter() - t0
    with psycopg.connect(dsn) as conn:
        status = conn.execute("SELECT status::text FROM workflows WHERE id = %s", [wf]).fetchone()[
            0
        ]
    assert status == "succeeded", status
    rate = steady_rate(completion_times(dsn, _SMIFDB_DONE, [wf]))
    return {"workflow": wf, "rate": rate, "wall": wall}


def run_pgqueuer(dsn: str, total: int, workers: int, batch: int) -> dict:
    worker = str(HERE / "pgqueuer_worker.py")
    subprocess.run([sys.executable, worker, "install", dsn], check=True)
    start_clean(dsn, "pgqueuer, pgqueuer_log", truncate=True)
    subprocess.run([sys.executable, worker, "enqueue", dsn, str(total)], check=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE pgqueuer")

    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, worker, "work", dsn, str(batch)]) for _ in range(workers)
    ]
    for p in procs:
        p.wait()
    wall = time.perf_counter() - t0
    times = completion_times(dsn, _PGQUEUER_DONE, [])
    assert len(times) == total, (len(times), total)
    return {"rate": steady_rate(times), "wall": wall}


_PROCRASTINATE_DONE = (
    "SELECT extract(epoch FROM at)::float FROM procrastinate_events WHERE type = 'succeeded'"
)


def run_procrastinate(dsn: str, total: int, workers: int, concurrency: int) -> dict:
    """procrastinate fetches one job per query; ``concurrency`` async jobs per worker."""
    worker = str(HERE / "procrastinate_worker.py")
    subprocess.run([sys.executable, worker, "install", dsn], check=True)
    start_clean(dsn, "procrastinate_jobs, procrastinate_events", truncate=True)
    subprocess.run([sys.executable, worker, "enqueue", dsn, str(total)], check=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE procrastinate_jobs")
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, worker, "work", dsn, str(concurrency)])
        for _ in range(workers)
    ]
    for p in procs:
        p.wait()
    wall = time.perf_counter() - t0
    times = completion_times(dsn, _PROCRASTINATE_DONE, [])
    assert len(times) == total, (len(times), total)
    return {"rate": steady_rate(times), "wall": wall}


PEERS = {"pgqueuer": run_pgqueuer, "procrastinate": run_procrastinate}


def dispatch_latency(dsn: str, workflow_id: int) -> tuple[float, float, int]:
    """From a parent's success event to its child's, in a chain of no-op jobs: the child's
    dispatch plus its (empty) run and its recording, so an upper bound on dispatch latency.
    (A child is claimed at its claiming transaction's start, often the very transaction that
    records its parent, so claim times alone cannot show it.)"""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            """
            SELECT extract(epoch FROM c.at - p.at) * 1000
            FROM job_edges e
            JOIN jobs cj ON cj.id = e.child_id AND cj.workflow_id = %(wf)s
            JOIN events p ON p.workflow_id = %(wf)s AND p.job_id = e.parent_id
                         AND p.to_status = 'succeeded'
            JOIN events c ON c.workflow_id = %(wf)s AND c.job_id = e.child_id
                         AND c.to_status = 'succeeded'
            """,
            {"wf": workflow_id},
        ).fetchall()
    values = sorted(float(r[0]) for r in rows)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return statistics.median(values), p99, len(values)


def independent(n: int) -> dict:
    return {
        "name": f"independent-{n}",
        "jobs": [{"key": f"j{i}", "python": NOOP} for i in range(n)],
    }


def chain(n: int) -> dict:
    return {
        "name": f"chain-{n}",
        "jobs": [
            {"key": f"j{i}", "python": NOOP, "after": [f"j{i - 1}"] if i else []} for i in range(n)
        ],
    }


def fan(n: int) -> dict:
    jobs = [{"key": "start", "python": NOOP}]
    jobs += [{"key": f"j{i}", "python": NOOP, "after": ["start"]} for i in range(n)]
    jobs += [{"key": "end", "python": NOOP, "after": [f"j{i}" for i in range(n)]}]
    return {"name": f"fan-{n}", "jobs": jobs}


def side_by_side(
    dsn: str,
    n: int,
    pairs: list[tuple[int, int]],
    repeat: int,
    peers: list[str],
    logs: str,
    truncate: bool,
    modes: list[str] = ("thread",),
) -> None:
    """smifdb in each of ``modes`` ("thread": --python-in-thread, "workers": warm worker
    processes) against each of ``peers``, same processes and batch (slots), runs alternating."""
    print(f"\nmedian of {repeat} runs of {n} jobs each")
    print(f"{'system':22} {'procs':>5} {'batch':>5} {'jobs/s (steady)':>16} {'wall s':>7}")
    systems: dict[str, Callable[[int, int], dict]] = {
        f"smifdb ({mode})": (
            lambda procs, batch, in_thread=(mode == "thread"): run_smifdb(
                dsn, independent(n), procs, batch, batch, logs, truncate, in_thread
            )
        )
        for mode in modes
    }
    systems |= {
        peer: (lambda procs, batch, run=PEERS[peer]: run(dsn, n, procs, batch)) for peer in peers
    }
    best: dict[str, float] = {}
    for procs, batch in pairs:
        # Alternate the systems run by run: this machine's speed drifts by +-15% over
        # minutes, and back-to-back blocks of runs would hand the drift to one side.
        runs: dict[str, list[dict]] = {name: [] for name in systems}
        for _ in range(repeat):
            for name, run in systems.items():
                runs[name].append(run(procs, batch))
        rates = {name: statistics.median(r["rate"] for r in rs) for name, rs in runs.items()}
        for name, rs in runs.items():
            wall = statistics.median(r["wall"] for r in rs)
            print(f"{name:22} {procs:>5} {batch:>5} {rates[name]:>16,.0f} {wall:>7.2f}")
            best[name] = max(best.get(name, 0), rates[name])
        for mode in modes:
            ours = f"smifdb ({mode})"
            for peer in peers:
                pairwise = sorted(
                    o["rate"] / q["rate"] for o, q in zip(runs[ours], runs[peer], strict=True)
                )
                spread = ", ".join(f"{r:.2f}" for r in pairwise)
                print(
                    f"  {ours} / {peer}: {rates[ours] / rates[peer]:.2f}x  (run pairs: {spread})",
                    flush=True,
                )
    print(f"best at {n} jobs: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in best.items()))
    for mode in modes:
        for peer in peers:
            ratio = best[f"smifdb ({mode})"] / best[peer]
            print(f"  best smifdb ({mode}) / best {peer}: {ratio:.2f}x")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=40_000, help="jobs per independent run")
    p.add_argument("--sizes", help="job counts for the side-by-side runs, e.g. 10000,40000,100000")
    p.add_argument("--skip-pgqueuer", action="store_true", help="same as --peers ''")
    p.add_argument(
        "--peers", default="pgqueuer,procrastinate", help="peers to compare, comma-separated"
    )
    p.add_argument(
        "--modes",
        default="thread,workers",
        help="smifdb's python modes: thread (--python-in-thread), workers (warm processes)",
    )
    p.add_argument("--quick", action="store_true", help="fewer configurations")
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration (median kept)")
    p.add_argument("--configs", help="PROCSxBATCH list for the side-by-side runs, e.g. 2x256,4x64")
    p.add_argument("--no-dags", action="store_true", help="skip DAG shapes and latency")
    p.add_argument("--only-dags", action="store_true", help="only DAG shapes and latency")
    p.add_argument(
        "--truncate",
        action="store_true",
        help="with --dsn: empty smifdb's tables before each run (a new cluster always is)",
    )
    args = p.parse_args()
    n = args.jobs
    truncate = args.dsn is None or args.truncate
    peers = [] if args.skip_pgqueuer else [x for x in args.peers.split(",") if x]
    modes = [x for x in args.modes.split(",") if x]
    logs = tempfile.mkdtemp(prefix="smifdb-bench-logs-")
    with database(args.dsn) as dsn:
        print(machine(dsn))
        print(f"smifdb runners run no-op Python jobs ({NOOP}); slots = batch unless stated\n")

        pairs = [(1, 64), (2, 64)] if args.quick else [(1, 64), (2, 64), (4, 64), (2, 16), (2, 256)]
        if args.configs:
            pairs = [tuple(map(int, c.split("x"))) for c in args.configs.split(",")]
        sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else [n]
        if not args.only_dags:
            print("## Independent jobs, side by side")
            for size in sizes:
                side_by_side(dsn, size, pairs, args.repeat, peers, logs, truncate, modes)

        if args.no_dags:
            return
        print("\n## DAG shapes (2 runners, 64 slots each)")
        shapes = [("chain", chain(2000)), ("fan-out/fan-in", fan(n))]
        if not args.quick:
            shapes.append(("layered random", layered_dag(100_000, 200_000) | {"name": "layered"}))
        latencies = []
        for label, spec in shapes:
            r = run_smifdb(dsn, spec, 2, 64, 64, logs, truncate)
            print(
                f"{label:16} {len(spec['jobs']):>7} jobs  {r['rate']:>10,.0f} jobs/s  wall {r['wall']:.2f} s"
            )
            if label == "chain":  # before the next run empties the tables
                latencies.append(("2 runners", dispatch_latency(dsn, r["workflow"])))
        r = run_smifdb(dsn, chain(2000), 1, 4, 4, logs, truncate)
        latencies.append(("1 runner", dispatch_latency(dsn, r["workflow"])))

        print("\n## Dispatch latency: parent succeeded -> no-op child succeeded (chain of 2000)")
        for label, (p50, p99, count) in latencies:
            print(f"{label + ':':10} p50 {p50:.2f} ms  p99 {p99:.2f} ms  ({count} edges)")
    print(f"\n(job logs in {logs}; pid {os.getpid()})")


if __name__ == "__main__":
    main()
