"""How long do validating, submitting and draining a large layered DAG take?

    python benchmarks/submit.py [--dsn DSN --truncate] [--jobs 1000000] [--edges 2000000]
                                [--repeat 2] [--cli] [--drain 2x256]

On one database (a new local cluster with durable commits unless --dsn is given):

- validation (``smifdb.spec.parse`` of the spec as plain data): time and the peak memory it
  adds to the process (the spec itself is not counted);
- the write (``submit_dag``: one transaction of four COPYs) side by side with its bound, a bare
  COPY of the same rows, rendered beforehand, into tables made ``LIKE`` smifdb's with the same
  indexes, checks and storage settings but no foreign keys, in one transaction; and the whole
  of ``smifdb.submit`` (validation and write, each job written as soon as it is checked). The
  three alternate, each from emptied tables and a fresh checkpoint;
- with --cli, the CLI on a JSON file (process start, parse JSON, validate, write);
- with --drain RUNNERSxSLOTS, the layered DAG drained by no-op runners against as many
  independent no-op jobs, in the same session (throughput.py's steady-state rate).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import psycopg
from common import database, layered_dag, machine, parser
from throughput import SMIFDB_TABLES, independent, run_smifdb

import smifdb
from smifdb.spec import parse
from smifdb.store.submit import render_copies, submit_dag

BARE = {"jobs": "bare_jobs", "job_edges": "bare_job_edges", "ready_jobs": "bare_ready_jobs"}
BARE["events"] = "bare_events"


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def reset_peak() -> None:
    """Start VmHWM (ru_maxrss) again from the current RSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def validate(spec: dict) -> tuple[object, float, float]:
    """The Dag, the seconds parse took, and the megabytes its peak added."""
    reset_peak()
    before = rss_mb()
    t0 = time.perf_counter()
    dag = parse(spec)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dag, seconds, peak - before


def make_bare_tables(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table, bare in BARE.items():
            conn.execute(f"DROP TABLE IF EXISTS {bare}")
            conn.execute(f"CREATE TABLE {bare} (LIKE {table} INCLUDING ALL)")
            options = conn.execute(
                "SELECT reloptions FROM pg_class WHERE oid = %s::regclass", [table]
            ).fetchone()[0]
            if options:
                conn.execute(f"ALTER TABLE {bare} SET ({', '.join(options)})")


def pre_render(dag) -> list[tuple[str, bytes]]:
    """The rows submit_dag writes, as its COPY text, retargeted at the bare tables."""
    ids = range(1, len(dag.jobs) + 1)
    copies = []
    for statement, lines in render_copies(dag, ids, 1, "benchmark"):
        table = statement.split()[1]
        copies.append((statement.replace(f"COPY {table} ", f"COPY {BARE[table]} ", 1), lines))
    return [(st, "".join(lines).encode()) for st, lines in copies]


def clean(dsn: str, truncate: bool) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(BARE.values())}")
        if truncate:
            conn.execute(f"TRUNCATE {SMIFDB_TABLES} CASCADE")
        conn.execute("CHECKPOINT")


def bare_copy(dsn: str, copies: list[tuple[str, bytes]]) -> float:
    t0 = time.perf_counter()
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        for statement, data in copies:
            with cur.copy(statement) as copy:
                view = memoryview(data)
                for start in range(0, len(view), 1 << 20):
                    copy.write(view[start : start + (1 << 20)])
        conn.commit()
    return time.perf_counter() - t0


def smifdb_write(dsn: str, dag) -> float:
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        submit_dag(conn, dag, actor="benchmark")
    return time.perf_counter() - t0


def smifdb_submit(dsn: str, spec: dict) -> float:
    """``smifdb.submit``: each job written as soon as it is checked (smifdb.spec.Checking)."""
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        smifdb.submit(conn, spec)
    return time.perf_counter() - t0


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=1_000_000)
    p.add_argument("--edges", type=int, default=2_000_000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--cli", action="store_true", help="time the CLI on a JSON file too")
    p.add_argument("--drain", metavar="RUNNERSxSLOTS", help="drain the DAG and independent jobs")
    p.add_argument("--truncate", action="store_true", help="with --dsn: empty smifdb's tables")
    args = p.parse_args()
    truncate = args.dsn is None or args.truncate
    t0 = time.perf_counter()
    spec = layered_dag(args.jobs, args.edges) | {"name": "layered"}
    built = time.perf_counter() - t0
    with database(args.dsn) as dsn:
        print(machine(dsn))
        print(f"DAG: {args.jobs:,} jobs, {args.edges:,} edges (spec built in {built:.1f} s)")
        for run in range(args.repeat):
            dag, seconds, peak = validate(spec)
            print(f"validate run {run}: {seconds:6.2f} s, peak +{peak:,.0f} MB")
        make_bare_tables(dsn)
        t0 = time.perf_counter()
        copies = pre_render(dag)
        print(
            f"rendered the bare COPY's {sum(len(d) for _, d in copies) / 1e6:,.0f} MB"
            f" in {time.perf_counter() - t0:.1f} s (not timed below)"
        )
        for run in range(args.repeat):
            clean(dsn, truncate)
            bare = bare_copy(dsn, copies)
            clean(dsn, truncate)
            write = smifdb_write(dsn, dag)
            clean(dsn, truncate)
            whole = smifdb_submit(dsn, spec)
            print(
                f"write run {run}: bare COPY {bare:6.2f} s   submit_dag {write:6.2f} s"
                f"   ratio {write / bare:.2f}x   validate + write {seconds + write:6.2f} s"
                f"   smifdb.submit (checked as written) {whole:6.2f} s"
                f" ({whole / bare:.2f}x the bare COPY)"
            )
        del copies
        if args.cli:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(spec, f)
            clean(dsn, truncate)
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "smifdb.cli", "--dsn", dsn, "submit", f.name],
                capture_output=True,
                text=True,
                check=True,
            )
            print(f"cli: total {time.perf_counter() - t0:6.2f} s  (workflow {out.stdout.strip()})")
            os.unlink(f.name)
        if args.drain:
            runners, slots = map(int, args.drain.split("x"))
            logs = tempfile.mkdtemp(prefix="smifdb-bench-logs-")
            flat = independent(args.jobs)
            for label, shape in (("independent", flat), ("layered", spec)) * args.repeat:
                r = run_smifdb(dsn, shape, runners, slots, slots, logs, truncate)
                print(
                    f"drain {label:12} {runners}x{slots}: {r['rate']:>9,.0f} jobs/s"
                    f"  wall {r['wall']:6.1f} s"
                )


if __name__ == "__main__":
    main()
