"""Runners that reach only the API (--api URL and a token of role runner): real processes in a
mount namespace where the database's socket folder and the submitter's folder are empty."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from credentials import user_token
from processes import FAST, PY, ApiServer, free_port, hide, require_namespaces, wait_for
from psycopg import conninfo
from test_files import finish, jobs, stored, submit, write_spec

from smifdb import migrate
from smifdb.api import POOL_SIZE
from smifdb.pgserver import ThrowawayCluster
from smifdb.store.queue import ClaimedJob, Outcome
from smifdb.transport import http, outcomes_wire, successes_from

FAN = {
    "name": "fan",
    "files": ["data"],
    "jobs": [
        {
            "key": "split",
            "command": "mkdir -p out && cp data/in.txt out/part.txt",
            "outputs": ["out/*"],
        },
        *(
            {
                "key": f"w{i}",
                "command": f"mkdir -p out && (cat split/out/part.txt; echo {i}) > out/r.txt",
                "after": ["split"],
                "inputs": ["split"],
                "outputs": ["out/*"],
            }
            for i in range(4)
        ),
        {
            "key": "join",
            "command": "cat w0/out/r.txt w1/out/r.txt w2/out/r.txt w3/out/r.txt",
            "after": [f"w{i}" for i in range(4)],
            "inputs": [f"w{i}" for i in range(4)],
        },
    ],
}


def api_serve(dsn: str, tmp: Path, port: int | None = None) -> tuple[str, subprocess.Popen]:
    port = port or free_port()
    log = open(tmp / "api.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [PY, "-m", "smifdb.cli", "--dsn", dsn, "api", "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, what="the API to listen")
    return url, proc


def http_runner(url: str, token: str, tmp: Path, name: str, hidden: list[Path], *args: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMIFDB_", "PG"))}
    env["SMIFDB_API_TOKEN"] = token
    env["HOME"] = str(tmp / name / "home")  # a machine of its own, and no SMIFDB_HOME
    prefix: list[str] = []
    for folder in hidden:
        prefix += hide(folder)
    log = open(tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [
            *prefix,
            PY,
            "-m",
            "smifdb.cli",
            "runner",
            "run",
            "--api",
            url,
            "--name",
            name,
            "--cache-dir",
            str(tmp / name / "cache"),
            "--log-dir",
            str(tmp / name / "logs"),
            *FAST,
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp,
    )


def socket_folder(dsn: str) -> list[Path]:
    host = conninfo.conninfo_to_dict(dsn).get("host") or ""
    return [Path(host)] if host.startswith("/") else []


def test_http_runners_run_a_fan_out_fan_in_dag_with_files_without_the_database(
    dsn, conn, tmp_path
) -> None:
    require_namespaces(tmp_path)
    submitter = tmp_path / "submitter"
    (submitter / "data").mkdir(parents=True)
    (submitter / "data" / "in.txt").write_text("payload\n")
    wf = submit(dsn, write_spec(submitter, FAN))
    url, api = api_serve(dsn, tmp_path)
    token = user_token(dsn, "node", role="runner")
    work = tmp_path / "machines"
    work.mkdir()
    hidden = [submitter, *socket_folder(dsn)]
    runners = [http_runner(url, token, work, f"h{i}", hidden, "--slots", "2") for i in range(2)]
    try:
        assert finish(conn, wf, 90) == "succeeded", (work / "h0.log").read_text()
        rows = jobs(conn, wf)
        assert rows["join"]["log_tail"].splitlines() == [
            line for i in range(4) for line in ("payload", str(i))
        ]
        assert all(r["attempts"] == 1 for r in rows.values())
        assert sorted(stored(conn, wf)) == ["split", "w0", "w1", "w2", "w3"]
        names = {r[0] for r in conn.execute("SELECT name FROM runners")}
        assert names == {"node/h0", "node/h1"}
        # No runner process connected to PostgreSQL: every session is the API's.
        apps = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT application_name FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            )
        }
        assert not any("runner" in a for a in apps), apps
    finally:
        for p in runners:
            p.terminate()
        for p in runners:
            p.wait(30)
        api.kill()
        api.wait()
    for p in runners:
        assert p.returncode == 0


def test_a_runner_token_is_needed(dsn, tmp_path) -> None:
    url, api = api_serve(dsn, tmp_path)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMIFDB_")}
        bad = subprocess.run(
            [PY, "-m", "smifdb.cli", "runner", "run", "--api", url, "--slots", "1"],
            capture_output=True,
            text=True,
            env={**env, "SMIFDB_API_TOKEN": "nope"},
            timeout=60,
        )
        assert bad.returncode == 2 and "refused" in bad.stderr, bad.stderr
        admin = user_token(dsn, "boss", role="admin")
        wrong = subprocess.run(
            [PY, "-m", "smifdb.cli", "runner", "run", "--api", url, "--slots", "1"],
            capture_output=True,
            text=True,
            env={**env, "SMIFDB_API_TOKEN": admin},
            timeout=60,
        )
        assert wrong.returncode == 2 and "runner" in wrong.stderr, wrong.stderr
        none = subprocess.run(
            [PY, "-m", "smifdb.cli", "runner", "run", "--api", url, "--slots", "1"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert none.returncode == 2 and "SMIFDB_API_TOKEN" in none.stderr, none.stderr
    finally:
        api.kill()
        api.wait()


def slow_jobs(n: int, seconds: float) -> dict:
    return {
        "name": "slow",
        "jobs": [
            {"key": f"j{i}", "command": f"sleep {seconds}", "max_attempts": 3} for i in range(n)
        ],
    }


def running_under(conn, owner: str, n: int) -> bool:
    return (
        conn.execute(
            "SELECT count(*) FROM jobs WHERE status = 'running' AND lease_owner = %s", [owner]
        ).fetchone()[0]
        == n
    )


def test_sigkill_of_an_http_runner_mid_job_rescues_its_jobs(dsn, conn, tmp_path) -> None:
    wf = submit(dsn, write_spec(tmp_path / "spec", slow_jobs(2, 3)))
    url, api = api_serve(dsn, tmp_path)
    token = user_token(dsn, "node", role="runner")
    doomed = http_runner(url, token, tmp_path, "h0", [], "--slots", "2")
    other = None
    try:
        wait_for(lambda: running_under(conn, "node/h0", 2), 60, "both jobs on h0")
        doomed.kill()
        doomed.wait()
        other = http_runner(url, token, tmp_path, "h1", [], "--slots", "2")
        assert finish(conn, wf, 90) == "succeeded", (tmp_path / "h1.log").read_text()
        rows = jobs(conn, wf)
        assert all(r["status"] == "succeeded" and r["attempts"] == 2 for r in rows.values())
        assert "rescued" in (tmp_path / "h1.log").read_text()
    finally:
        for p in (doomed, other):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        api.kill()
        api.wait()


def test_a_revoked_token_stops_its_runner_and_its_jobs_are_rescued(dsn, conn, tmp_path) -> None:
    from smifdb import db
    from smifdb.store import auth

    wf = submit(dsn, write_spec(tmp_path / "spec", slow_jobs(1, 4)))
    url, api = api_serve(dsn, tmp_path)
    revoked = user_token(dsn, "gone", role="runner")
    kept = user_token(dsn, "kept", role="runner")
    victim = http_runner(url, revoked, tmp_path, "v", [], "--slots", "1")
    rescuer = None
    try:
        wait_for(lambda: running_under(conn, "gone/v", 1), 60, "the job on the revoked runner")
        with db.connect(dsn) as c:
            for row in auth.api_tokens(c, "gone"):
                auth.revoke_api_token(c, row["id"])
        rescuer = http_runner(url, kept, tmp_path, "k", [], "--slots", "1")
        assert victim.wait(30) == 1  # refused for --dead-after: it stops
        assert finish(conn, wf, 90) == "succeeded"
        row = jobs(conn, wf)["j0"]
        assert row["attempts"] == 2
        owner = conn.execute(
            "SELECT lease_owner FROM jobs WHERE workflow_id = %s", [wf]
        ).fetchone()[0]
        assert owner in (None, "kept/k")
        log = (tmp_path / "v.log").read_text()
        assert "refused the runner's token (401)" in log and "stopping" in log, log
    finally:
        for p in (victim, rescuer):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        api.kill()
        api.wait()


def test_the_api_killed_and_restarted_mid_run_loses_nothing(dsn, conn, tmp_path) -> None:
    wf = submit(dsn, write_spec(tmp_path / "spec", slow_jobs(4, 3)))
    port = free_port()
    url, api = api_serve(dsn, tmp_path, port)
    token = user_token(dsn, "node", role="runner")
    runner = http_runner(url, token, tmp_path, "h0", [], "--slots", "4")
    try:
        wait_for(lambda: running_under(conn, "node/h0", 4), 60, "all jobs running")
        api.kill()  # SIGKILL, mid-run: the jobs finish while no API answers
        api.wait()

        time.sleep(4)
        _, api = api_serve(dsn, tmp_path, port)
        assert finish(conn, wf, 90) == "succeeded", (tmp_path / "h0.log").read_text()
        rows = jobs(conn, wf)
        assert all(r["attempts"] == 1 for r in rows.values())  # nothing rerun or lost
        assert runner.poll() is None, "the runner died with the API"
        assert "lost the API connection" in (tmp_path / "h0.log").read_text()
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        api.kill()
        api.wait()


def runner_requests(url: str) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("smifdb_api_runner_requests_total{"):
            op = line.split('op="', 1)[1].split('"', 1)[0]
            found[op] = float(line.rsplit(" ", 1)[1])
    return found


def test_idle_http_runners_add_no_connections_and_claim_nothing(dsn, conn, tmp_path) -> None:
    """30 idle HTTP runners: PostgreSQL sees the API's sessions only, and while nothing is
    ready they send no claim or other query, only heartbeats and long polls."""
    url, api = api_serve(dsn, tmp_path)
    token = user_token(dsn, "node", role="runner")
    others = (
        "SELECT application_name FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    # The API's pool and its one listening connection, once a runner has waited.
    idle = ("--slots", "1", "--heartbeat", "1", "--dead-after", "5", "--poll", "30")
    first = http_runner(url, token, tmp_path, "r0", [], *idle)
    procs = [first]
    try:
        wait_for(lambda: runner_requests(url).get("wait", 0) >= 2, 60, "a first wait")
        time.sleep(2)
        procs += [http_runner(url, token, tmp_path, f"r{i}", [], *idle) for i in range(1, 30)]
        wait_for(
            lambda: (
                conn.execute("SELECT count(*) FROM runners WHERE state = 'active'").fetchone()[0]
                == 30
            ),
            120,
            "30 runners",
        )
        time.sleep(3)  # each has claimed nothing, settled, and waits
        # Only the API's bounded pool and its one listener: nothing per runner.
        sessions = [row[0] for row in conn.execute(others)]
        assert set(sessions) <= {"smifdb api", "smifdb api wakeup"}, sessions
        assert len(sessions) <= POOL_SIZE + 1, sessions
        assert all(p.poll() is None for p in procs)
        start = runner_requests(url)
        time.sleep(5)
        end = runner_requests(url)
        grew = {op: end.get(op, 0) - start.get(op, 0) for op in end}
        idle_ops = {"heartbeat", "wait", "rescue"}
        assert {op for op, n in grew.items() if n} <= idle_ops, grew
        assert grew.get("heartbeat", 0) >= 30  # each runner still beats
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        api.kill()
        api.wait()


def test_postgres_restarted_under_http_runners_loses_nothing(tmp_path) -> None:
    """The database stops mid-run: the API answers 5xx, the runners keep their outcomes and
    wait; once it is back every job is recorded once, in its first attempt."""
    server = ThrowawayCluster()
    dsn = server.start()
    try:
        migrate.upgrade(dsn)
        wf = submit(dsn, write_spec(tmp_path / "spec", slow_jobs(4, 3)))
        url, api = api_serve(dsn, tmp_path)
        token = user_token(dsn, "node", role="runner")
        runner = http_runner(url, token, tmp_path, "h0", [], "--slots", "4")
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                wait_for(lambda: running_under(conn, "node/h0", 4), 60, "all jobs running")
            server.cluster.stop(mode="fast")  # every session of the API ends
            time.sleep(5)  # the jobs finish while the database is down
            server.cluster.start()
            with psycopg.connect(dsn, autocommit=True) as conn:
                assert finish(conn, wf, 90) == "succeeded", (tmp_path / "h0.log").read_text()
                assert all(r["attempts"] == 1 for r in jobs(conn, wf).values())
            assert runner.poll() is None, "the runner died with the database"
        finally:
            for p in (runner, api):
                p.kill()
                p.wait()
    finally:
        server.stop()


def test_a_runner_with_two_urls_fails_over_when_one_api_dies(dsn, conn, tmp_path) -> None:
    wf = submit(dsn, write_spec(tmp_path / "spec", slow_jobs(6, 2)))
    first, api1 = api_serve(dsn, tmp_path)
    second, api2 = api_serve(dsn, tmp_path)
    token = user_token(dsn, "node", role="runner")
    runner = http_runner(url := f"{first},{second}", token, tmp_path, "h0", [], "--slots", "3")
    try:
        wait_for(lambda: running_under(conn, "node/h0", 3), 60, "three jobs running")
        api1.kill()  # the runner's first URL refuses connections from now on
        api1.wait()
        assert finish(conn, wf, 90) == "succeeded", (tmp_path / "h0.log").read_text()
        assert all(r["attempts"] == 1 for r in jobs(conn, wf).values())
        assert runner.poll() is None, url
        assert runner_requests(second).get("batch", 0) > 0  # its outcomes went to the second
    finally:
        for p in (runner, api2):
            p.kill()
            p.wait()


def channel(url: str, token: str) -> tuple[http.HttpChannel, str]:
    api = http.Api([url], http.Token(value=token))
    ch = http.HttpChannel(api)
    name, _ = ch.register("r", host="h", pid=1, slots=8, dead_after=30.0, max_losses=3)
    return ch, name


def succeeded(job: ClaimedJob, owner: str, **change) -> Outcome:
    return replace(
        Outcome(
            job.id,
            job.workflow_id,
            job.attempt,
            owner,
            "succeeded",
            claimed_at=job.claimed_at,
            claim_id=job.claim_id,
        ),
        **change,
    )


def test_batches_of_grouped_successes_are_fenced_by_owner_attempt_and_claim(
    dsn, conn, tmp_path
) -> None:
    """The compact form runners send (plain successes grouped by claim, claimed jobs as rows)
    records exactly what `cycle` would: only the caller's own leases, only the attempt and
    claim they name, each once."""
    wf = submit(
        dsn,
        write_spec(
            tmp_path / "spec",
            {
                "jobs": [
                    {"key": f"j{i}", "python": "smifdb.examples:noop", "args": {"i": i}}
                    for i in range(5)
                ]
            },
        ),
    )
    url, api = api_serve(dsn, tmp_path)
    try:
        mine, me = channel(url, user_token(dsn, "node", role="runner"))
        theirs, them = channel(url, user_token(dsn, "other", role="runner"))
        claimed = mine.cycle(me, [], claim_n=5).claimed
        assert mine.api.batches and len(claimed) == 5
        rows = conn.execute(
            "SELECT id, key, payload, attempts, started_at FROM jobs WHERE workflow_id = %s", [wf]
        ).fetchall()
        held = {job.id: (job.key, job.payload, job.attempt, job.claimed_at) for job in claimed}
        assert held == {r[0]: r[1:] for r in rows}  # the rows decode to what the database holds
        assert all(job.claim_id is not None and job.workflow_id == wf for job in claimed)
        assert theirs.cycle(them, [succeeded(j, me) for j in claimed]).recorded == []
        a, b, c, d, e = sorted(claimed, key=lambda j: j.id)
        later = a.claimed_at + timedelta(seconds=1)
        report = mine.cycle(
            me,
            [
                succeeded(a, me, attempt=2),  # not the attempt leased
                succeeded(b, me, claimed_at=later),  # not the claim leased: its own group
                succeeded(c, me),
                succeeded(d, me),
                succeeded(e, me, exit_code=0),  # not plain: sent as an object beside them
            ],
        )
        assert sorted(report.recorded) == [c.id, d.id, e.id]
        assert mine.cycle(me, [succeeded(c, me), succeeded(d, me)]).recorded == []
        status = {k: r["status"] for k, r in jobs(conn, wf).items()}
        assert status == {"j0": "running", "j1": "running", "j2": "succeeded",
                          "j3": "succeeded", "j4": "succeeded"}  # fmt: skip
    finally:
        api.kill()
        api.wait()


def test_a_runner_speaks_cycle_to_an_api_without_batch(dsn, conn, tmp_path) -> None:
    """An API of an earlier version answers `batch` with 404: the runner sends `cycle`."""
    from smifdb.api import create_app

    wf = submit(
        dsn,
        write_spec(
            tmp_path / "spec",
            {"jobs": [{"key": f"j{i}", "python": "smifdb.examples:noop"} for i in range(3)]},
        ),
    )
    app = create_app(dsn)
    app.router.routes = [r for r in app.router.routes if not r.path.endswith("/batch")]
    server = ApiServer(app)
    try:
        ch, name = channel(server.url, user_token(dsn, "node", role="runner"))
        claimed = ch.cycle(name, [], claim_n=3).claimed
        assert not ch.api.batches and len(claimed) == 3
        report = ch.cycle(name, [succeeded(j, name) for j in claimed])
        assert sorted(report.recorded) == sorted(j.id for j in claimed)
        assert finish(conn, wf, 30) == "succeeded"
    finally:
        server.stop()


def test_grouped_successes_are_checked_before_anything_is_written() -> None:
    now = datetime.now(UTC)
    outcome = Outcome(1, 2, 1, "u/r", "succeeded", reason="returned", claimed_at=now, claim_id=7)
    groups, plain, rest = outcomes_wire(
        [
            outcome,
            replace(outcome, job_id=3),
            replace(outcome, job_id=4, log_tail="x"),
            replace(outcome, job_id=5, reason=None),
        ]
    )
    assert [o.job_id for o in plain] == [1, 3, 5] and [o.job_id for o in rest] == [4]
    assert len(groups) == 2
    back = successes_from(json.loads(json.dumps(groups)), "u/r", 10)
    assert back == plain
    good = groups[0]
    for bad in (
        "nope",
        [{**good, "extra": 1}],
        [{**good, "jobs": [1]}],  # lengths differ
        [{**good, "jobs": [1, True]}],
        [{**good, "attempts": [1, -1]}],
        [{**good, "workflows": [2, 2**63]}],
        [{**good, "claimed_at": "yesterday"}],
        [{**good, "claimed_at": now.replace(tzinfo=None).isoformat()}],
        [{**good, "claim_id": "7"}],
        [{**good, "reason": 1}],
    ):
        with pytest.raises(ValueError):
            successes_from(bad, "u/r", 10)
    with pytest.raises(ValueError, match="at most 1"):
        successes_from(groups, "u/r", 1)
