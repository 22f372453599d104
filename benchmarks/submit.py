"""How long does submitting a 100,000-job, 200,000-edge DAG take?

    python benchmarks/submit.py [--dsn DSN] [--jobs 100000] [--edges 200000]

Times the Python API (validation + one COPY transaction) and the CLI on a JSON file
(process start, parse, validation, write), on one database with durable commits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import psycopg
from common import database, layered_dag, machine, parser

import smifdb
from smifdb.spec import parse
from smifdb.store.submit import submit_dag


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--edges", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    spec = layered_dag(args.jobs, args.edges)
    with database(args.dsn) as dsn:
        print(machine(dsn))
        print(f"DAG: {args.jobs} jobs, {args.edges} edges")
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(spec, f)
        for run in range(args.repeat):
            t0 = time.perf_counter()
            dag = parse(spec)
            t1 = time.perf_counter()
            with psycopg.connect(dsn, autocommit=True) as conn:
                submit_dag(conn, dag, actor="benchmark")
            t2 = time.perf_counter()
            print(
                f"api  run {run}: validate {t1 - t0:5.2f} s  write {t2 - t1:5.2f} s"
                f"  total {t2 - t0:5.2f} s"
            )
        for run in range(args.repeat):
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "smifdb.cli", "--dsn", dsn, "submit", f.name],
                capture_output=True,
                text=True,
                check=True,
            )
            t1 = time.perf_counter()
            print(f"cli  run {run}: total {t1 - t0:5.2f} s  (workflow {out.stdout.strip()})")
        os.unlink(f.name)
        assert smifdb.__version__


if __name__ == "__main__":
    main()
