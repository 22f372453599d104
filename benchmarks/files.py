"""Jobs/s of no-op command jobs with files against the same jobs without, in one run.

    python benchmarks/files.py [--dsn DSN] [--jobs 2000] [--runners 2] [--slots 8] [--repeat 3]

Each job with files runs in a private folder of its own: the workflow's one small input
(``data/in.txt``, 1 kB: fetched once per runner's cache, then a hard link per job) is
materialised into it, the command writes one small output (``out.txt``, its key: a blob of
its own per job) and the output is stored with its success. The jobs without files run the
same shell command in the spec's folder, writing to /dev/null. Both run on the same database,
by the same number of runner processes, alternating run by run (this machine's speed drifts),
and the rate is the steady one of benchmarks/throughput.py: completions between the 10% and
the 90% mark, from the events log.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import psycopg
from common import database, machine, parser
from throughput import SMIFDB_TABLES, completion_times, spawn_runners, start_clean, steady_rate

import smifdb
from smifdb.spec import parse, with_base_dir

_DONE = """
SELECT extract(epoch FROM at)::float FROM events
WHERE workflow_id = %s AND job_id IS NOT NULL AND to_status = 'succeeded'
"""
TABLES = f"{SMIFDB_TABLES}, job_outputs, workflow_files, blob_chunks, blobs"


def spec(n: int, files: bool) -> dict:
    if not files:
        command = 'cat /dev/null && echo "$SMIFDB_JOB_KEY" > /dev/null'
        return {
            "name": f"plain-{n}",
            "jobs": [{"key": f"j{i}", "command": command} for i in range(n)],
        }
    command = 'cat data/in.txt > /dev/null && echo "$SMIFDB_JOB_KEY" > out.txt'
    job = {"command": command, "outputs": ["out.txt"]}
    return {
        "name": f"files-{n}",
        "files": ["data"],
        "jobs": [{"key": f"j{i}", **job} for i in range(n)],
    }


def run(dsn: str, n: int, files: bool, runners: int, slots: int, tmp: Path, truncate: bool) -> dict:
    start_clean(dsn, TABLES, truncate)
    base = tmp / "spec"
    (base / "data").mkdir(parents=True, exist_ok=True)
    (base / "data" / "in.txt").write_bytes(b"x" * 1024)
    with psycopg.connect(dsn, autocommit=True) as conn:
        wf = smifdb.submit(conn, with_base_dir(parse(spec(n, files)), base), base=base)
        conn.execute("ANALYZE jobs, ready_jobs")
    t0 = time.perf_counter()
    procs = spawn_runners(
        dsn,
        runners,
        slots,
        None,
        str(tmp / "logs"),
        lambda i: ["--cache-dir", str(tmp / f"cache-{i}")],
    )
    for p in procs:
        p.wait()
    wall = time.perf_counter() - t0
    with psycopg.connect(dsn) as conn:
        status = conn.execute("SELECT status::text FROM workflows WHERE id = %s", [wf]).fetchone()
        assert status[0] == "succeeded", status
        if files:
            stored = conn.execute("SELECT count(*) FROM job_outputs").fetchone()[0]
            assert stored == n, stored
    return {"rate": steady_rate(completion_times(dsn, _DONE, [wf])), "wall": wall}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=2000, help="jobs per run")
    p.add_argument("--runners", type=int, default=2, help="runner processes")
    p.add_argument("--slots", type=int, default=8, help="slots per runner")
    p.add_argument("--repeat", type=int, default=3, help="runs of each (median kept)")
    p.add_argument("--truncate", action="store_true", help="with --dsn: empty smifdb's tables")
    args = p.parse_args()
    truncate = args.dsn is None or args.truncate
    with database(args.dsn) as dsn, tempfile.TemporaryDirectory(prefix="smifdb-bench-") as tmp:
        print(machine(dsn))
        print(
            f"{args.jobs} no-op command jobs, {args.runners} runners x {args.slots} slots, "
            f"median of {args.repeat} runs\n"
        )
        results: dict[bool, list[dict]] = {False: [], True: []}
        for i in range(args.repeat):
            for files in (False, True) if i % 2 == 0 else (True, False):
                results[files].append(
                    run(dsn, args.jobs, files, args.runners, args.slots, Path(tmp), truncate)
                )
        print(f"{'jobs':28} {'jobs/s (steady)':>16} {'wall s':>7}")
        rates = {}
        for files, label in ((False, "without files"), (True, "1 input + 1 output each")):
            rates[files] = statistics.median(r["rate"] for r in results[files])
            wall = statistics.median(r["wall"] for r in results[files])
            print(f"{label:28} {rates[files]:>16,.0f} {wall:>7.2f}")
        print(f"\nwith files: {rates[True] / rates[False]:.2f}x the rate without")


if __name__ == "__main__":
    main()
