"""Runners over HTTP against direct runners, side by side on one database.

    python benchmarks/http_runners.py [--dsn DSN] [--jobs 20000] [--configs 1x64,2x256]
                                      [--many 200] [--many-jobs 20000] [--repeat 3]
                                      [--api-workers 1]

1. No-op jobs through direct runners and through HTTP runners (`runner run --api`, one API
   process), alternating run by run, same processes, slots and batch: the steady-state rate
   between the 10% and the 90% completion, from the events table (as throughput.py).
2. ``--many`` HTTP runners (threads in a few host processes, one Runner object and one HTTP
   client each, as separate `runner run` processes would have) against one API process with
   its pool of 8 connections and one listener: throughput, the runner-side latency of every
   claiming request (p50, p99), and the PostgreSQL sessions in use (sampled every 0.1 s).
3. Dispatch latency through HTTP runners: parent succeeded -> no-op child succeeded over a
   chain, as throughput.py measures it for direct runners.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import throughput as tp
from common import database, machine, parser

import smifdb
from smifdb import db
from smifdb.store import auth

HERE = Path(__file__).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiProcess:
    """`smifdb api serve` on a free port, with a runner token for the benchmark's runners."""

    def __init__(self, dsn: str, logs: str, workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(logs) / f"api-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smifdb.cli",
                "--dsn",
                dsn,
                "api",
                "serve",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--workers",
                str(workers),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError("the API did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def runner_token(dsn: str) -> str:
    name = f"bench-{time.monotonic_ns()}"
    with db.connect(dsn) as conn:
        auth.add_user(conn, name, secrets_password(), role="runner")
        return auth.create_api_token(conn, name, name="bench", seconds=None)[1]


def secrets_password() -> str:
    import secrets

    return secrets.token_urlsafe(16)


def spawn_http_runners(
    url: str, token: str, runners: int, slots: int, batch: int, logs: str
) -> list:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMIFDB_", "PG"))}
    env["SMIFDB_API_TOKEN"] = token
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smifdb.cli",
                "runner",
                "run",
                "--api",
                url,
                "--name",
                f"h{i}-{time.monotonic_ns()}",
                "--slots",
                str(slots),
                "--batch",
                str(batch),
                "--exit-when-idle",
                "--log-level",
                "warning",
                "--log-dir",
                logs,
                "--cache-dir",
                str(Path(logs) / f"cache-{i}"),
                "--python-in-thread",  # as the direct runners of throughput.py
            ],
            env=env,
        )
        for i in range(runners)
    ]


def run_http(dsn: str, url: str, token: str, spec: dict, procs: int, batch: int, logs: str) -> dict:
    tp.start_clean(dsn, tp.SMIFDB_TABLES, truncate=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        wf = smifdb.submit(conn, spec)
        conn.execute("ANALYZE jobs, ready_jobs")
    t0 = time.perf_counter()
    for p in spawn_http_runners(url, token, procs, batch, batch, logs):
        p.wait()
    wall = time.perf_counter() - t0
    with psycopg.connect(dsn) as conn:
        status = conn.execute("SELECT status::text FROM workflows WHERE id = %s", [wf]).fetchone()
    assert status[0] == "succeeded", status
    rate = tp.steady_rate(tp.completion_times(dsn, tp._SMIFDB_DONE, [wf]))
    return {"workflow": wf, "rate": rate, "wall": wall}


def side_by_side(
    dsn: str, url: str, token: str, n: int, pairs: list, repeat: int, logs: str
) -> None:
    print(f"\n## No-op jobs, direct against HTTP runners (median of {repeat} runs of {n} each)")
    print(f"{'runners':8} {'procs':>5} {'batch':>5} {'jobs/s (steady)':>16} {'wall s':>7}")
    for procs, batch in pairs:
        direct, http = [], []
        for _ in range(repeat):  # alternating, so the machine's drift is shared
            direct.append(tp.run_smifdb(dsn, tp.independent(n), procs, batch, batch, logs, True))
            http.append(run_http(dsn, url, token, tp.independent(n), procs, batch, logs))
        for label, runs in (("direct", direct), ("http", http)):
            rate = statistics.median(r["rate"] for r in runs)
            wall = statistics.median(r["wall"] for r in runs)
            print(f"{label:8} {procs:>5} {batch:>5} {rate:>16,.0f} {wall:>7.2f}")
        pairwise = sorted(h["rate"] / d["rate"] for d, h in zip(direct, http, strict=True))
        print(
            f"{'':20} http/direct {statistics.median(pairwise):.2f}x"
            f"  (run pairs: {', '.join(f'{r:.2f}' for r in pairwise)})",
            flush=True,
        )


# -- many runners ----------------------------------------------------------------------------


def host(url: str, count: int, slots: int, out: str, logs: str) -> None:
    """``count`` HTTP runners as threads of this process; each claiming request's latency is
    written to ``out`` when all have exited."""
    from smifdb.runner import Runner, RunnerConfig
    from smifdb.transport import http

    latencies: list[float] = []
    lock = threading.Lock()

    class TimedApi(http.Api):
        def call(self, op, body, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return super().call(op, body, **kwargs)
            finally:
                if op in ("cycle", "batch") and body.get("claim"):
                    with lock:
                        latencies.append(time.perf_counter() - start)

    def one(i: int) -> None:
        api = TimedApi([url], http.Token())
        config = RunnerConfig(
            slots=slots,
            name=f"m{os.getpid()}-{i}",
            log_dir=Path(logs) / "many",
            cache_dir=Path(logs) / "many-cache",
            poll=30.0,
            exit_when_idle=True,
            python_in_thread=True,
        )
        Runner(None, config, transport=http.HttpTransport(api), data=http.HttpData(api)).run()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(out).write_text(json.dumps(latencies))


def sessions(dsn: str, stop: threading.Event, seen: list[int]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.wait(0.1):
            seen.append(
                conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()[0]
            )


def many(dsn: str, url: str, token: str, runners: int, n: int, logs: str) -> None:
    hosts = min(8, runners)
    per = [runners // hosts + (1 if i < runners % hosts else 0) for i in range(hosts)]
    tp.start_clean(dsn, tp.SMIFDB_TABLES, truncate=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        wf = smifdb.submit(conn, tp.independent(n))
        conn.execute("ANALYZE jobs, ready_jobs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMIFDB_", "PG"))}
    env["SMIFDB_API_TOKEN"] = token
    stop, seen = threading.Event(), []
    sampler = threading.Thread(target=sessions, args=(dsn, stop, seen))
    sampler.start()
    outs = [Path(logs) / f"latency-{i}.json" for i in range(hosts)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE), "host", url, str(k), "1", str(out), logs], env=env
        )
        for k, out in zip(per, outs, strict=True)
    ]
    for p in procs:
        p.wait()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    with psycopg.connect(dsn) as conn:
        status = conn.execute("SELECT status::text FROM workflows WHERE id = %s", [wf]).fetchone()
    assert status[0] == "succeeded", status
    rate = tp.steady_rate(tp.completion_times(dsn, tp._SMIFDB_DONE, [wf]))
    claims = sorted(x * 1000 for out in outs for x in json.loads(out.read_text()))
    p99 = claims[min(len(claims) - 1, int(len(claims) * 0.99))]
    print(f"\n## {runners} HTTP runners (1 slot each, {hosts} host processes), one API process")
    print(
        f"{n} jobs: {rate:,.0f} jobs/s steady, wall {wall:.1f} s;"
        f" claiming requests {len(claims)}: p50 {statistics.median(claims):.1f} ms,"
        f" p99 {p99:.1f} ms; PostgreSQL sessions (besides the sampler) max {max(seen)},"
        f" median {statistics.median(seen):.0f}"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "host":
        url, count, slots, out, logs = sys.argv[2:7]
        host(url, int(count), int(slots), out, logs)
        return
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--configs", default="1x64,2x256", help="PROCSxBATCH list")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--many", type=int, default=200, help="HTTP runners against one API")
    p.add_argument("--many-jobs", type=int, default=20_000)
    p.add_argument("--chain", type=int, default=1000)
    p.add_argument("--api-workers", type=int, default=1, help="uvicorn workers of the API")
    args = p.parse_args()
    logs = tempfile.mkdtemp(prefix="smifdb-bench-http-")
    pairs = [tuple(map(int, c.split("x"))) for c in args.configs.split(",")]
    with database(args.dsn) as dsn:
        print(machine(dsn))
        api = ApiProcess(dsn, logs, args.api_workers)
        try:
            token = runner_token(dsn)
            side_by_side(dsn, api.url, token, args.jobs, pairs, args.repeat, logs)
            if args.many:
                many(dsn, api.url, token, args.many, args.many_jobs, logs)
            print(f"\n## Dispatch latency through HTTP runners (chain of {args.chain})")
            for procs in (1, 2):
                r = run_http(dsn, api.url, token, tp.chain(args.chain), procs, 4, logs)
                p50, p99, count = tp.dispatch_latency(dsn, r["workflow"])
                print(f"{procs} runner(s): p50 {p50:.2f} ms  p99 {p99:.2f} ms  ({count} edges)")
        finally:
            api.close()
    print(f"\n(logs in {logs})")


if __name__ == "__main__":
    main()
