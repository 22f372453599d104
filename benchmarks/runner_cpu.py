"""Where a runner's time goes: jobs/s, and CPU per job of PostgreSQL and of the runners.

    python benchmarks/runner_cpu.py [--dsn DSN] [--jobs 100000] [--runners 2] [--slots 256]
                                    [--repeat 3]

Runs smifdb's CLI runners on independent no-op Python jobs, each run from emptied tables and a
fresh checkpoint. Prints the steady rate (10% to 90% of completions, from the events), the CPU
of every PostgreSQL process on this machine over the run (backends, WAL writer, autovacuum,
checkpointer: from /proc, so use a machine with nothing else running PostgreSQL), and the
runners' CPU (their rusage, start-up included), each per job. Linux only.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import psycopg
from common import database, machine, parser
from throughput import SMIFDB_TABLES, completion_times, independent, start_clean, steady_rate

import smifdb

_DONE = """
SELECT extract(epoch FROM at)::float FROM events
WHERE workflow_id = %s AND job_id IS NOT NULL AND to_status = 'succeeded'
"""


def postgres_cpu() -> float:
    """Seconds of CPU used by every postgres process alive now, and by its reaped children."""
    total = 0
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                data = f.read()
        except OSError:
            continue
        if data[data.index("(") + 1 : data.rindex(")")].startswith("postgres"):
            fields = data.rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def run(dsn: str, jobs: int, runners: int, slots: int, truncate: bool) -> str:
    start_clean(dsn, SMIFDB_TABLES, truncate)
    with psycopg.connect(dsn, autocommit=True) as conn:
        wf = smifdb.submit(conn, independent(jobs))
        conn.execute("ANALYZE jobs, ready_jobs")
    pg0 = postgres_cpu()
    command = [sys.executable, "-m", "smifdb.cli", "--dsn", dsn, "runner", "run"]
    options = ["--slots", str(slots), "--exit-when-idle", "--log-level", "warning"]
    options += ["--poll", "0.5", "--log-dir", f"/tmp/smifdb-cpu-logs-{os.getpid()}"]
    procs = [
        subprocess.Popen([*command, "--name", f"cpu-{i}-{time.monotonic_ns()}", *options])
        for i in range(runners)
    ]
    client = 0.0
    for p in procs:
        _, _, usage = os.wait4(p.pid, 0)
        client += usage.ru_utime + usage.ru_stime
    pg = postgres_cpu() - pg0
    rate = steady_rate(completion_times(dsn, _DONE, [wf]))
    return (
        f"{runners} x {slots}: {rate:>7,.0f} jobs/s  PostgreSQL {pg / jobs * 1e6:5.1f} us/job"
        f"  runners {client / jobs * 1e6:5.1f} us/job (start-up included)"
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--runners", type=int, default=2)
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--truncate", action="store_true", help="with --dsn: empty smifdb's tables")
    args = p.parse_args()
    with database(args.dsn) as dsn:
        print(machine(dsn))
        for _ in range(args.repeat):
            print(run(dsn, args.jobs, args.runners, args.slots, args.dsn is None or args.truncate))


if __name__ == "__main__":
    main()
