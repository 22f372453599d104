"""Runners as real processes: slots, order, SIGKILL, hammering, retries, timeouts, cancel,
graceful drain, and PostgreSQL restarting underneath."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
from processes import PY, Runners, cli, wait_for

import smifdb
from smifdb import db, migrate
from smifdb.pgserver import ThrowawayCluster
from smifdb.runner import Runner, RunnerConfig
from smifdb.store import queue, read
from smifdb.watchdog import Watchdog


def finished(conn: psycopg.Connection, wf: int) -> str | None:
    return read.finished_status(conn, wf)


def job_rows(conn: psycopg.Connection, wf: int) -> dict[str, dict]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    rows = cur.execute(
        "SELECT key, status::text AS status, attempts, started_at, finished_at, exit_code, error,"
        " result, log_tail, lease_owner FROM jobs WHERE workflow_id = %s",
        [wf],
    ).fetchall()
    return {r["key"]: r for r in rows}


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def intervals_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    level = peak = 0
    for _, delta in points:
        level += delta
        peak = max(peak, level)
    return peak


def test_slots_are_honoured(conn, runners, tmp_path) -> None:
    record = tmp_path / "spans"
    code = (
        "import os,time,sys; s=time.time(); time.sleep(0.8); "
        f"open({str(record)!r},'a').write(f'{{s}} {{time.time()}}\\n')"
    )
    wf = smifdb.submit(conn, {"jobs": [{"key": f"j{i}", "command": py(code)} for i in range(6)]})
    proc = runners.start("--slots", "2", "--exit-when-idle")
    assert proc.wait(timeout=60) == 0, runners.output("r0")
    assert finished(conn, wf) == "succeeded"
    spans = [tuple(map(float, line.split())) for line in record.read_text().splitlines()]
    assert len(spans) == 6
    assert intervals_overlap(spans) == 2  # parallel, but never more than the slots


def test_fan_out_fan_in_runs_in_dependency_order(conn, runners) -> None:
    sleep = py("import time; time.sleep(0.5)")
    jobs = [{"key": "a", "command": sleep}]
    jobs += [{"key": f"b{i}", "command": sleep, "after": ["a"]} for i in range(4)]
    jobs += [{"key": "c", "command": sleep, "after": [f"b{i}" for i in range(4)]}]
    wf = smifdb.submit(conn, {"jobs": jobs})
    proc = runners.start("--slots", "4", "--exit-when-idle")
    assert proc.wait(timeout=60) == 0
    rows = job_rows(conn, wf)
    for i in range(4):
        assert rows[f"b{i}"]["started_at"] >= rows["a"]["finished_at"]
        assert rows["c"]["started_at"] >= rows[f"b{i}"]["finished_at"]
    spans = [(rows[f"b{i}"]["started_at"], rows[f"b{i}"]["finished_at"]) for i in range(4)]
    assert intervals_overlap(spans) == 4  # the fan-out ran in parallel
    assert finished(conn, wf) == "succeeded"


def test_sigkilled_runner_loses_no_job(conn, runners, tmp_path) -> None:
    trace = tmp_path / "trace"
    code = (
        f"import os,time; p={str(trace)!r}; a=os.environ['SMIFDB_ATTEMPT'];"
        " open(p,'a').write('start '+a+'\\n'); time.sleep(2); open(p,'a').write('end '+a+'\\n')"
    )
    wf = smifdb.submit(conn, {"jobs": [{"key": "slow", "command": py(code), "max_attempts": 3}]})
    victim = runners.start("--slots", "1", name="victim")
    wait_for(lambda: trace.exists() and "start 1" in trace.read_text(), what="attempt 1")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rescuer = runners.start("--slots", "1", "--exit-when-idle", name="rescuer")
    assert rescuer.wait(timeout=60) == 0, runners.output("rescuer")
    row = job_rows(conn, wf)["slow"]
    assert row["status"] == "succeeded" and row["attempts"] == 2
    succeeded = conn.execute(
        "SELECT actor FROM events WHERE job_id = (SELECT id FROM jobs WHERE key = 'slow')"
        " AND to_status = 'succeeded'"
    ).fetchall()
    assert succeeded == [("rescuer",)]  # recorded exactly once, by the runner that finished it
    # Attempt 1 died with its runner instead of running on unsupervised.
    assert trace.read_text().splitlines() == ["start 1", "start 2", "end 2"]
    # The dead runner's lease was taken back and its claim closed; both claims are in the log.
    assert conn.execute("SELECT count(*) FROM claims WHERE closed_at IS NULL").fetchone() == (0,)
    claims = conn.execute(
        "SELECT attempt, actor FROM smifdb_job_history WHERE workflow_id = %s"
        " AND reason = 'claimed' ORDER BY at",
        [wf],
    ).fetchall()
    assert claims == [(1, "victim"), (2, "rescuer")]


def test_a_sigkilled_runner_takes_its_jobs_grandchildren_with_it(conn, runners, tmp_path):
    """A shell job's child is not the runner's child: the watchdog kills its process group."""
    trace, pidfile = tmp_path / "trace", tmp_path / "model.pid"
    model = f"import time; time.sleep(4); open({str(trace)!r}, 'a').write('model finished')"
    command = f'{PY} -c "{model}" & echo $! > {pidfile}; wait'
    smifdb.submit(conn, {"jobs": [{"key": "model", "command": command}]})
    victim = runners.start("--slots", "1", name="victim")
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the model to start")
    model_pid = int(pidfile.read_text())
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    wait_for(lambda: not Path(f"/proc/{model_pid}").exists(), 10, "the model process to die")
    time.sleep(4.5)
    assert not trace.exists()  # it never finished beside the attempt that will replace it


def test_a_job_is_its_process_group_what_it_leaves_running_is_killed(conn, runners, tmp_path):
    pidfile = tmp_path / "daemon.pid"
    wf = smifdb.submit(
        conn, {"jobs": [{"key": "leaky", "command": f"sleep 1000 & echo $! > {pidfile}"}]}
    )
    proc = runners.start("--slots", "1", "--exit-when-idle")
    assert proc.wait(timeout=60) == 0
    assert finished(conn, wf) == "succeeded"
    wait_for(lambda: not Path(f"/proc/{int(pidfile.read_text())}").exists(), 5, "the leftover")


def _watchdogs(runner: subprocess.Popen) -> set[int]:
    """The runner's live watchdog processes (its children running smifdb.watchdog)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == runner.pid and fields[0] != "Z" and b"smifdb.watchdog" in cmdline:
            found.add(int(stat.parent.name))
    return found


def _model_job(tmp_path: Path, key: str) -> tuple[dict, Path]:
    """A shell job whose real work is its child (not the runner's): its pid goes to a file."""
    pidfile = tmp_path / f"{key}.pid"
    command = f'{PY} -c "import time; time.sleep(60)" & echo $! > {pidfile}; wait'
    return {"key": key, "command": command}, pidfile


def _started(pidfile: Path) -> int:
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what=pidfile.name)
    return int(pidfile.read_text())


def _dies(pid: int, what: str) -> None:
    try:
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 15, what)
    finally:  # not left behind when the test fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_killed_watchdog_is_replaced_and_the_new_one_guards_every_group(conn, runners, tmp_path):
    """The heartbeat starts a new watchdog, told of the groups the first knew; a job started
    later is guarded by the same one."""
    first, first_pid = _model_job(tmp_path, "first")
    smifdb.submit(conn, {"jobs": [first]})
    victim = runners.start("--slots", "2", name="victim")
    model = _started(first_pid)
    (watchdog,) = wait_for(lambda: _watchdogs(victim), what="the watchdog")
    os.kill(watchdog, signal.SIGKILL)
    (revived,) = wait_for(lambda: _watchdogs(victim) - {watchdog}, 10, "a new watchdog")

    second, second_pid = _model_job(tmp_path, "second")
    smifdb.submit(conn, {"jobs": [second]})
    second_model = _started(second_pid)
    assert _watchdogs(victim) == {revived}
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    try:
        _dies(second_model, "the second job's model")
    finally:
        _dies(model, "the first job's model, started before the first watchdog was killed")


def test_a_watchdog_that_cannot_run_is_retried_with_backoff(tmp_path, monkeypatch, caplog):
    """It starts with the environment the runner started with (a job may spoil os.environ);
    one that dies at once anyway is retried after 2 s, 4 s, … rather than at every beat."""
    spoiled = Watchdog()
    monkeypatch.setenv("PYTHONHOME", "/nonexistent")  # what a Python job might do
    broken = Watchdog()  # started in a spoiled environment: its watchdog cannot run
    groups = [subprocess.Popen(["sleep", "30"], start_new_session=True) for _ in range(2)]
    try:
        with caplog.at_level(logging.WARNING, logger="smifdb.runner"):
            spoiled.guard(groups[0].pid)
            broken.guard(groups[1].pid)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:  # heartbeats every 50 ms
                spoiled.revive()
                broken.revive()
                time.sleep(0.05)
        assert caplog.text.count("exited") == 2, caplog.text  # at 0 s and 2 s, not 60 times
        assert "next try in 4 s" in caplog.text
        spoiled.close()  # its watchdog ran all along: it kills the group it was told of
        wait_for(lambda: groups[0].poll() is not None, 10, "the guarded group to be killed")
    finally:
        broken.close()
        for g in groups:
            g.kill()
            g.wait()


def test_a_python_job_forking_without_exec_does_not_keep_the_watchdog_waiting(
    conn, runners, tmp_path, monkeypatch
):
    """A forked copy of the runner (multiprocessing's default on Linux) must not hold the
    watchdog's pipe open: the watchdog acts when the last writer closes it."""
    forker_pid = tmp_path / "forked.pid"
    (tmp_path / "forker.py").write_text(
        "import os, time\n"
        "def fork_and_linger(pidfile):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    open(pidfile, 'w').write(str(pid))\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    model_job, model_pid = _model_job(tmp_path, "model")
    smifdb.submit(conn, {"jobs": [model_job]})
    victim = runners.start("--slots", "2", "--python-allow", "forker", name="victim")
    model = _started(model_pid)
    fork = {"python": "forker:fork_and_linger", "args": {"pidfile": str(forker_pid)}}
    smifdb.submit(conn, {"jobs": [{"key": "fork", **fork}]})  # after the watchdog started
    forked = _started(forker_pid)
    try:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        _dies(model, "the model, while a forked copy of its runner lives on")
    finally:
        os.kill(forked, signal.SIGKILL)


def test_runners_hammering_one_queue_run_each_job_once(conn, runners, tmp_path) -> None:
    ledger = tmp_path / "ledger"
    n = 3000
    jobs = [
        {
            "key": f"j{i}",
            "python": "smifdb.examples:append",
            "args": {"path": str(ledger), "line": f"j{i}"},
        }
        for i in range(n)
    ]
    wf = smifdb.submit(conn, {"jobs": jobs})
    procs = [runners.start("--slots", "8", "--exit-when-idle", name=f"h{i}") for i in range(3)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    lines = ledger.read_text().splitlines()
    assert len(lines) == n and len(set(lines)) == n
    assert finished(conn, wf) == "succeeded"
    per_job = conn.execute(
        "SELECT count(*) FILTER (WHERE to_status = 'running'),"
        "       count(*) FILTER (WHERE to_status = 'succeeded'),"
        "       count(DISTINCT actor) FILTER (WHERE to_status = 'running')"
        " FROM smifdb_job_history WHERE workflow_id = %s AND job_id IS NOT NULL",
        [wf],
    ).fetchone()
    assert per_job == (n, n, 3)  # each job claimed and recorded once; all runners took part
    # Every lease closed by its runner, every finished job counted once.
    assert conn.execute("SELECT count(*) FROM claims WHERE closed_at IS NULL").fetchone() == (0,)
    counted = "SELECT sum(finished) FROM workflow_counts WHERE workflow_id = %s"
    assert conn.execute(counted, [wf]).fetchone() == (n,)


def test_retries_with_backoff(conn, runners) -> None:
    code = "import os,sys; sys.exit(0 if int(os.environ['SMIFDB_ATTEMPT']) >= 3 else 1)"
    wf = smifdb.submit(
        conn,
        {"jobs": [{"key": "flaky", "command": py(code), "max_attempts": 3, "retry_backoff": 0.4}]},
    )
    proc = runners.start("--slots", "1", "--exit-when-idle")
    assert proc.wait(timeout=60) == 0
    row = job_rows(conn, wf)["flaky"]
    assert row["status"] == "succeeded" and row["attempts"] == 3
    claims = [
        r[0]
        for r in conn.execute(
            "SELECT at FROM smifdb_job_history WHERE reason = 'claimed' AND job_id IS NOT NULL"
            " ORDER BY at"
        )
    ]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(claims)]
    assert gaps[0] >= 0.4 * 0.5 and gaps[1] >= 0.8 * 0.5  # backoff doubles, jittered ±50%
    failures = conn.execute(
        "SELECT to_status, reason FROM events WHERE from_status = 'running' AND job_id IS NOT NULL ORDER BY id"
    ).fetchall()
    assert failures == [
        ("ready", "exit status 1"),
        ("ready", "exit status 1"),
        ("succeeded", "exit status 0"),
    ]


def test_final_failure_marks_descendants_upstream_failed(conn, runners) -> None:
    ok = py("pass")
    wf = smifdb.submit(
        conn,
        {
            "jobs": [
                {
                    "key": "bad",
                    "command": py("import sys; print('oops'); sys.exit(3)"),
                    "max_attempts": 2,
                    "retry_backoff": 0,
                },
                {"key": "child", "command": ok, "after": ["bad"]},
                {"key": "grandchild", "command": ok, "after": ["child"]},
                {"key": "other", "command": py("import time; time.sleep(0.5)")},
            ]
        },
    )
    proc = runners.start("--slots", "2", "--exit-when-idle")
    assert proc.wait(timeout=60) == 0
    rows = job_rows(conn, wf)
    assert rows["bad"]["status"] == "failed" and rows["bad"]["attempts"] == 2
    assert rows["bad"]["exit_code"] == 3 and "oops" in rows["bad"]["log_tail"]
    assert rows["child"]["status"] == rows["grandchild"]["status"] == "upstream_failed"
    assert rows["other"]["status"] == "succeeded"  # other branches finish
    assert finished(conn, wf) == "failed"


def test_a_timed_out_job_is_recorded_only_once_its_whole_group_is_gone(conn, runners, tmp_path):
    """A child that ignores SIGTERM lives until the group's SIGKILL: the retry must not start
    before that, and a runner killed meanwhile leaves the group to its watchdog."""
    ticks, pids = tmp_path / "ticks", tmp_path / "pids"
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "while True:\n"
        f"    open({str(ticks)!r}, 'a').write(f\"{{os.environ['SMIFDB_ATTEMPT']}} {{time.time()}}\\n\")\n"
        "    time.sleep(0.05)\n"
    )
    job = {
        "key": "stubborn",
        "command": f"{PY} {stubborn} & wait",
        "timeout": 1,
        "max_attempts": 2,
        "retry_backoff": 0,
    }
    smifdb.submit(conn, {"jobs": [job]})
    proc = runners.start("--slots", "1", name="r0")
    wait_for(lambda: len(pids.read_text().split()) == 2 if pids.exists() else False, 30, "2 tries")
    first, second = (int(p) for p in pids.read_text().split())
    _dies(first, "the first attempt's child, by SIGKILL at the end of the grace")
    by_attempt: dict[str, list[float]] = {}
    for line in ticks.read_text().splitlines():
        attempt, at = line.split()
        by_attempt.setdefault(attempt, []).append(float(at))
    assert max(by_attempt["1"]) < min(by_attempt["2"])  # never both at once
    # The second attempt times out too; the runner is killed while its child still lives.
    time.sleep(1.5)  # past the second timeout: the SIGTERM is ignored, SIGKILL not yet sent
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _dies(second, "the second attempt's child, by the watchdog, its runner gone")


def test_timeout_kills_the_process_group(conn, runners, tmp_path) -> None:
    pidfile = tmp_path / "child.pid"
    wf = smifdb.submit(
        conn,
        {
            "jobs": [
                {"key": "hang", "command": f"sleep 60 & echo $! > {pidfile}; wait", "timeout": 1}
            ]
        },
    )
    start = time.monotonic()
    proc = runners.start("--slots", "1", "--exit-when-idle")
    assert proc.wait(timeout=60) == 0
    assert time.monotonic() - start < 20
    row = job_rows(conn, wf)["hang"]
    assert row["status"] == "failed" and "timed out after 1 s" in row["error"]
    child = int(pidfile.read_text())
    wait_for(lambda: not Path(f"/proc/{child}").exists(), 10, "the grandchild to die")


def test_outcomes_postgresql_would_refuse_fail_alone(conn, runners) -> None:
    """A NUL in a job's output, NaN in its result: PostgreSQL refuses both as text or jsonb.

    The log keeps a replacement character; an unstorable result fails its attempt with the
    reason; the runner and the other outcomes of its batch are unharmed.
    """
    nan_file = 'printf \'{"x": NaN}\' > "$SMIFDB_RESULT_FILE"'
    wf = smifdb.submit(
        conn,
        {
            "jobs": [
                {"key": "binary", "command": "printf 'bin\\000ary'", "max_attempts": 3},
                {"key": "nan-file", "command": nan_file},
                {"key": "nan-value", "python": "json:loads", "args": {"s": "NaN"}},
                {"key": "nul-value", "python": "json:loads", "args": {"s": '"a\\u0000b"'}},
                {"key": "innocent", "command": "true"},
                {"key": "no-folder", "command": "true", "cwd": "/nonexistent/folder"},
                {"key": "child", "command": "true", "after": ["binary"]},
            ]
        },
    )
    proc = runners.start("--slots", "7", "--exit-when-idle", "--python-allow", "json")
    assert proc.wait(timeout=60) == 0, runners.output("r0")
    rows = job_rows(conn, wf)
    assert {k: r["status"] for k, r in rows.items()} == {
        "binary": "succeeded",
        "nan-file": "failed",
        "nan-value": "failed",
        "nul-value": "failed",
        "innocent": "succeeded",
        "no-folder": "failed",
        "child": "succeeded",
    }
    assert (
        rows["no-folder"]["error"] == "cannot start 'true': no working folder /nonexistent/folder"
    )
    assert rows["no-folder"]["log_tail"] == rows["no-folder"]["error"] + "\n"
    assert rows["binary"]["log_tail"] == "bin\ufffdary" and rows["binary"]["attempts"] == 1
    assert "cannot be stored: Out of range float values" in rows["nan-file"]["error"]
    assert "cannot be stored as JSON: Out of range float" in rows["nan-value"]["error"]
    assert "a string in the value holds a NUL character" in rows["nul-value"]["error"]


def test_a_batch_postgresql_refuses_is_recorded_outcome_by_outcome(conn, dsn, tmp_path) -> None:
    """The runner's last line of defence, for an outcome the attempt's own check missed."""
    wf = smifdb.submit(conn, {"jobs": [{"key": k, "command": "true"} for k in ("bad", "good")]})
    runner = Runner(dsn, RunnerConfig(slots=2, name="r1", log_dir=tmp_path))
    runner._connect_main()
    claimed = queue.claim(conn, "r1", 2, lease=60)
    for job in claimed:
        result = float("nan") if job.key == "bad" else {"ok": True}
        runner.pending.append(
            queue.Outcome(job.id, wf, job.attempt, "r1", "succeeded", result=result, key=job.key)
        )
    try:
        assert runner._cycle(0) == 0
    finally:
        runner.conn.close()
    rows = job_rows(conn, wf)
    assert (rows["good"]["status"], rows["good"]["result"]) == ("succeeded", {"ok": True})
    assert rows["bad"]["status"] == "failed" and rows["bad"]["result"] is None
    assert rows["bad"]["error"].startswith("the outcome could not be stored: invalid input")
    assert runner.pending == [] and runner.total == {"succeeded": 1, "failed": 1, "claimed": 0}


def test_cancel_stops_running_jobs(conn, runners, dsn, tmp_path) -> None:
    pidfile = tmp_path / "job.pid"
    wf = smifdb.submit(
        conn,
        {
            "jobs": [
                {"key": "long", "command": f"echo $$ > {pidfile}; exec sleep 60"},
                {"key": "after", "command": "true", "after": ["long"]},
            ]
        },
    )
    # The NOTIFY, not the heartbeat, reacts.
    runners.start("--slots", "1", "--heartbeat", "5", "--dead-after", "30")
    wait_for(pidfile.exists, what="the job to start")
    pid = int(pidfile.read_text())
    t0 = time.monotonic()
    out = subprocess.run(
        [PY, "-m", "smifdb.cli", "--dsn", dsn, "cancel", str(wf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "1 running job(s) are being stopped" in out.stdout
    wait_for(lambda: finished(conn, wf), 10, "the workflow to end")
    assert time.monotonic() - t0 < 4
    assert finished(conn, wf) == "cancelled"
    rows = job_rows(conn, wf)
    assert rows["long"]["status"] == "cancelled" and rows["after"]["status"] == "cancelled"
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "the job process to die")


def test_sigterm_drains_then_releases(conn, runners, tmp_path) -> None:
    wf = smifdb.submit(
        conn,
        {
            "jobs": [
                {"key": "short", "command": py("import time; time.sleep(1)")},
                {"key": "long", "command": py("import time; time.sleep(60)")},
            ]
        },
    )
    proc = runners.start("--slots", "2", "--grace", "2.5")
    wait_for(
        lambda: all(r["status"] == "running" for r in job_rows(conn, wf).values()),
        what="both running",
    )
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - t0 < 10
    rows = job_rows(conn, wf)
    assert rows["short"]["status"] == "succeeded"  # finished within the grace period
    assert rows["long"]["status"] == "ready" and rows["long"]["attempts"] == 0  # handed back
    state = conn.execute("SELECT state::text FROM runners WHERE name = 'r0'").fetchone()[0]
    assert state == "stopped"


def test_a_released_python_call_never_runs_beside_its_rerun(conn, runners, tmp_path, monkeypatch):
    """A thread cannot be stopped: its release is the runner's last write before it exits, so
    the call has stopped ticking before any peer can claim the job again."""
    ticks = tmp_path / "ticks"
    (tmp_path / "ticker.py").write_text(
        "import os, time\n"
        "def tick(path, seconds):\n"
        "    end = time.time() + seconds\n"
        "    while time.time() < end:\n"
        "        with open(path, 'a') as f:\n"
        "            f.write(f\"{os.environ.get('SMIFDB_RUNNER', os.getpid())} {time.time()}\\n\")\n"
        "        time.sleep(0.005)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    call = {"python": "ticker:tick", "args": {"path": str(ticks), "seconds": 3}}
    wf = smifdb.submit(conn, {"jobs": [{"key": "t", **call}]})
    monkeypatch.setenv("SMIFDB_PYTHON_ALLOW", "ticker")
    first = runners.start("--slots", "1", "--grace", "0.2", name="first")
    wait_for(lambda: ticks.exists(), what="the first attempt")
    peer = runners.start("--slots", "1", "--exit-when-idle", name="peer")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0, runners.output("first")
    assert peer.wait(timeout=60) == 0, runners.output("peer")
    assert finished(conn, wf) == "succeeded"
    by_pid: dict[str, list[float]] = {}
    for line in ticks.read_text().splitlines():
        pid, at = line.split()
        by_pid.setdefault(pid, []).append(float(at))
    assert len(by_pid) == 2  # the first attempt, released, and the rerun
    (a, b) = sorted(by_pid.values(), key=min)
    assert max(a) < min(b)  # never both at once


def test_python_jobs_that_will_not_return_do_not_hold_the_runner(conn, dsn, runners, tmp_path):
    """A thread cannot be killed: its attempt is recorded and the runner exits without it.

    sys.exit() in a job fails the attempt (it once ended the slot thread, and the runner waited
    for that slot for ever); SIGTERM releases a long call at the end of the grace and exits;
    `smifdb run` exits once a call past its timeout is recorded failed.
    """
    sleeper = {"python": "smifdb.examples:sleep", "args": {"seconds": 120}}
    wf = smifdb.submit(
        conn, {"jobs": [{"key": "exit", "python": "_thread:exit"}, {"key": "long", **sleeper}]}
    )
    proc = runners.start("--slots", "2", "--grace", "1", "--python-allow", "_thread")
    wait_for(lambda: job_rows(conn, wf)["exit"]["status"] == "failed", what="sys.exit() recorded")
    assert "SystemExit" in job_rows(conn, wf)["exit"]["error"]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, runners.output("r0")
    assert time.monotonic() - t0 < 8
    long = job_rows(conn, wf)["long"]
    assert (long["status"], long["attempts"]) == ("ready", 0)

    spec = tmp_path / "hang.json"
    spec.write_text(json.dumps({"jobs": [{"key": "hang", "timeout": 1, **sleeper}]}))
    t0 = time.monotonic()
    out = cli(dsn, "run", str(spec), "--slots", "1", "--log-dir", str(tmp_path / "logs"))
    assert out.returncode == 1, out.stderr
    assert time.monotonic() - t0 < 20
    assert "timed out after 1 s" in out.stdout


def test_keys_with_one_safe_file_name_keep_their_own_log_and_result(conn, runners, tmp_path):
    code = (
        "import json,os; k=os.environ['SMIFDB_JOB_KEY']; print('I am', k);"
        " json.dump({'who': k}, open(os.environ['SMIFDB_RESULT_FILE'],'w'))"
    )
    keys = ["a b", "a_b", "ключ", "ёжик", "x" * 130, "x" * 131]
    wf = smifdb.submit(conn, {"jobs": [{"key": k, "command": py(code)} for k in keys]})
    proc = runners.start("--slots", "6", "--exit-when-idle")
    assert proc.wait(timeout=60) == 0
    rows = job_rows(conn, wf)
    for key in keys:
        assert rows[key]["result"] == {"who": key}
        assert rows[key]["log_tail"] == f"I am {key}\n"
    logs = sorted(p.name for p in (tmp_path / "logs" / f"workflow-{wf}").glob("*.log"))
    assert len(logs) == 6 and "a_b.1.log" in logs


def test_command_environment_result_and_log(conn, runners) -> None:
    code = (
        "import json,os; print('hello from the job');"
        " keys=['SMIFDB_JOB_KEY','SMIFDB_WORKFLOW_ID','SMIFDB_ATTEMPT','A'];"
        " json.dump({k: os.environ[k] for k in keys}, open(os.environ['SMIFDB_RESULT_FILE'],'w'))"
    )
    wf = smifdb.submit(conn, {"jobs": [{"key": "env", "command": py(code), "env": {"A": "x"}}]})
    proc = runners.start("--slots", "1", "--exit-when-idle")
    assert proc.wait(timeout=60) == 0
    row = job_rows(conn, wf)["env"]
    assert row["status"] == "succeeded" and row["exit_code"] == 0
    assert row["result"] == {
        "SMIFDB_JOB_KEY": "env",
        "SMIFDB_WORKFLOW_ID": str(wf),
        "SMIFDB_ATTEMPT": "1",
        "A": "x",
    }
    assert "hello from the job" in row["log_tail"]


def test_bad_result_file_and_missing_program_fail_clearly(conn, runners) -> None:
    wf = smifdb.submit(
        conn,
        {
            "jobs": [
                {"key": "badjson", "command": "echo '{nope' > $SMIFDB_RESULT_FILE"},
                {"key": "missing", "command": ["/no/such/program"]},
                {"key": "nocwd", "command": "true", "cwd": "/no/such/dir"},
            ]
        },
    )
    proc = runners.start("--slots", "3", "--exit-when-idle")
    assert proc.wait(timeout=60) == 0
    rows = job_rows(conn, wf)
    assert "does not hold JSON" in rows["badjson"]["error"]
    assert "cannot start" in rows["missing"]["error"]
    assert "cannot start" in rows["nocwd"]["error"]


def test_python_jobs(conn, runners) -> None:
    wf = smifdb.submit(
        conn,
        {
            "jobs": [
                {"key": "ok", "python": "smifdb.examples:converge", "args": {"value": 0.0}},
                {"key": "raises", "python": "smifdb.examples:sleep", "args": {"seconds": "x"}},
                {"key": "nomodule", "python": "no_such_module:f"},
                {
                    "key": "slow",
                    "python": "smifdb.examples:sleep",
                    "args": {"seconds": 30},
                    "timeout": 0.5,
                },
            ]
        },
    )
    proc = runners.start("--slots", "4", "--exit-when-idle", "--python-allow", "no_such_module")
    assert proc.wait(timeout=60) == 0
    rows = job_rows(conn, wf)
    assert rows["ok"]["status"] == "succeeded"
    assert rows["ok"]["result"] == {"value": 0.5, "change": 0.5}
    assert rows["raises"]["status"] == "failed" and "TypeError" in rows["raises"]["error"]
    assert "Traceback" in rows["raises"]["log_tail"]
    assert "ModuleNotFoundError" in rows["nomodule"]["error"]
    assert rows["slow"]["status"] == "failed" and "timed out" in rows["slow"]["error"]


def test_runner_survives_postgres_restart(tmp_path) -> None:
    server = ThrowawayCluster()
    dsn = server.start()
    try:
        migrate.upgrade(dsn)
        code = "import time; time.sleep(2)"
        with psycopg.connect(dsn, autocommit=True) as conn:
            wf = smifdb.submit(
                conn, {"jobs": [{"key": f"j{i}", "command": py(code)} for i in range(4)]}
            )
        runners = Runners(dsn, tmp_path)
        try:
            proc = runners.start("--slots", "4")

            def all_running() -> bool:
                with psycopg.connect(dsn) as c:
                    return c.execute(
                        "SELECT count(*) = 4 FROM jobs WHERE status = 'running'"
                    ).fetchone()[0]

            wait_for(all_running, what="all jobs running")
            server.cluster.stop(mode="fast")  # kills every connection of the runner
            time.sleep(4.0)  # the jobs finish while the database is down: results wait in memory
            server.cluster.start()
            with psycopg.connect(dsn, autocommit=True) as conn:
                wait_for(lambda: finished(conn, wf), 60, "the workflow to end after the restart")
                assert finished(conn, wf) == "succeeded"
                rows = job_rows(conn, wf)
                assert all(r["attempts"] == 1 for r in rows.values())  # nothing rerun or lost
            assert proc.poll() is None, "the runner died with the database"
            assert "lost the database connection" in runners.output("r0")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            runners.close()
    finally:
        server.stop()


def test_sigterm_while_the_database_is_down_exits_after_a_bounded_wait(tmp_path) -> None:
    """Outcomes the database cannot take are kept only so long: the job is rescued later."""
    server = ThrowawayCluster()
    dsn = server.start()
    try:
        migrate.upgrade(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            wf = smifdb.submit(conn, {"jobs": [{"key": "j", "command": py("")}]})
        runners = Runners(dsn, tmp_path)
        try:
            proc = runners.start("--slots", "1", "--grace", "1", "--dead-after", "3")
            with psycopg.connect(dsn, autocommit=True) as conn:
                wait_for(lambda: finished(conn, wf), what="the first job")
                smifdb.submit(
                    conn, {"jobs": [{"key": "j", "command": py("import time; time.sleep(1)")}]}
                )
                wait_for(
                    lambda: conn.execute(
                        "SELECT count(*) FROM jobs WHERE status = 'running'"
                    ).fetchone()[0],
                    what="the second job to start",
                )
            server.cluster.stop(mode="fast")
            time.sleep(2)  # the job ends; its outcome waits in memory
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, runners.output("r0")
            assert time.monotonic() - t0 < 25  # 10 s of trying to record, then gone
        finally:
            runners.close()
    finally:
        server.stop()


def test_a_runner_started_while_the_database_is_down_waits_for_it(tmp_path) -> None:
    server = ThrowawayCluster()
    dsn = server.start()
    try:
        migrate.upgrade(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            wf = smifdb.submit(conn, {"jobs": [{"key": "j", "command": py("")}]})
        server.cluster.stop(mode="fast")

        # Told not to wait, it exits at once; a database that refuses is not waited for.
        out = cli(dsn, "runner", "run", "--slots", "1", "--wait-for-database", "0")
        assert out.returncode == 1 and "cannot reach the database" in out.stderr, out.stderr
        runners = Runners(dsn, tmp_path)
        try:
            proc = runners.start("--slots", "1", "--exit-when-idle", "--wait-for-database", "30")
            wait_for(lambda: "waiting for the database" in runners.output("r0"), 10, "a wait")
            assert proc.poll() is None
            server.cluster.start()
            assert proc.wait(timeout=60) == 0, runners.output("r0")
            with psycopg.connect(dsn) as conn:
                assert finished(conn, wf) == "succeeded"
        finally:
            runners.close()
        t0 = time.monotonic()
        refused = cli(
            psycopg.conninfo.make_conninfo(dsn, dbname="nope"), "runner", "run", "--slots", "1"
        )
        assert refused.returncode == 1 and 'database "nope" does not exist' in refused.stderr
        assert time.monotonic() - t0 < 10
        assert "waiting for the database" not in refused.stderr
    finally:
        server.stop()


def test_which_connection_errors_are_worth_waiting_for(dsn, conn) -> None:
    """Real errors of a real server: "not now" is waited for, a refusal is not."""

    def error(**kw) -> psycopg.OperationalError:
        try:
            psycopg.connect(psycopg.conninfo.make_conninfo(dsn, **kw), connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            return exc
        raise AssertionError(f"connected with {kw}")

    role = f"limited_{conn.info.backend_pid}"
    conn.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
    try:
        assert db.worth_waiting_for(error(user=role))  # too many connections for role
    finally:
        conn.execute(f"DROP ROLE {role}")
    assert not db.worth_waiting_for(error(dbname="no_such_database"))
    assert not db.worth_waiting_for(error(user="no_such_role"))
    assert db.worth_waiting_for(error(host="/nonexistent-socket-folder"))


def test_smifdb_run_keeps_going_when_its_connections_are_cut(dsn, conn, tmp_path) -> None:
    spec = tmp_path / "dag.yaml"
    sleep = "import time; time.sleep(3)"
    spec.write_text(
        "jobs:\n"
        + "".join(f"  - {{key: j{i}, command: [{PY!r}, -c, {sleep!r}]}}\n" for i in range(2))
    )
    run = subprocess.Popen(
        [
            PY,
            "-m",
            "smifdb.cli",
            "--dsn",
            dsn,
            "run",
            str(spec),
            "--slots",
            "2",
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(
        lambda: conn.execute("SELECT count(*) = 2 FROM jobs WHERE status = 'running'").fetchone()[
            0
        ],
        what="both jobs running",
    )
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert "SUCCEEDED" in out and "Traceback" not in err
    assert conn.execute("SELECT max(attempts) FROM jobs").fetchone()[0] == 1  # not rerun


def test_cli_run_wait_cancel_and_status(dsn, conn, tmp_path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "name: good\njobs:\n  - {key: a, command: 'echo A'}\n  - {key: b, command: 'echo B', after: [a]}\n"
    )
    out = cli(
        dsn, "run", str(good), "--slots", "2", "--log-dir", str(tmp_path / "logs"), "--poll", "0.2"
    )
    assert out.returncode == 0, out.stderr
    assert "SUCCEEDED" in out.stdout and "2 succeeded" in out.stdout
    wf_good = int(out.stderr.split("submitted workflow ")[1].split()[0])
    assert cli(dsn, "wait", str(wf_good)).returncode == 0

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\njobs:\n  - {key: a, command: 'echo broken; exit 4'}\n")
    out = cli(dsn, "run", str(bad), "--slots", "1", "--log-dir", str(tmp_path / "logs"))
    assert out.returncode == 1
    assert "FAILED" in out.stdout and "exit status 4" in out.stdout and "broken" in out.stdout
    wf_bad = int(out.stderr.split("submitted workflow ")[1].split()[0])
    assert cli(dsn, "wait", str(wf_bad)).returncode == 1

    assert cli(dsn, "wait", "99999").returncode == 2
    assert cli(dsn, "cancel", "99999").returncode == 2
    assert cli(dsn, "cancel", str(wf_good)).returncode == 1  # already finished
    pending = smifdb.submit(conn, {"jobs": [{"key": "x", "command": "true"}]})
    out = cli(dsn, "wait", str(pending), "--timeout", "0.5")
    assert out.returncode == 124
    assert cli(dsn, "cancel", str(pending), "--job", "nope").returncode == 2
    assert cli(dsn, "cancel", str(pending)).returncode == 0
    assert cli(dsn, "wait", str(pending)).returncode == 1  # cancelled

    assert (
        cli(dsn, "runner", "register", "node-1", "--slots", "8", "--host", "10.0.0.5").returncode
        == 0
    )
    status = json.loads(cli(dsn, "runner", "status", "--json").stdout)
    node = next(r for r in status if r["name"] == "node-1")
    assert (node["slots"], node["host"], node["state"], node["busy"]) == (
        8,
        "10.0.0.5",
        "registered",
        0,
    )
    ran = [r for r in status if r["name"].startswith("run-")]
    assert sum(r["jobs_succeeded"] for r in ran) == 2 and sum(r["jobs_failed"] for r in ran) == 1
    claims = dict(
        conn.execute(
            "SELECT actor, count(*) FROM smifdb_job_history WHERE reason = 'claimed' GROUP BY actor"
        )
    )
    assert {r["name"]: r["jobs_claimed"] for r in ran} == claims
    assert "node-1" in cli(dsn, "runner", "status").stdout


def test_runner_name_in_use_is_refused(conn, runners) -> None:
    first = runners.start("--slots", "1", name="twin")
    wait_for(
        lambda: conn.execute(
            "SELECT count(*) FROM runners WHERE name = 'twin' AND state = 'active'"
        ).fetchone()[0]
    )
    second = runners.start("--slots", "1", name="twin")
    assert second.wait(timeout=30) == 2
    assert "in use by a live runner" in runners.output("twin")
    assert first.poll() is None


def test_a_runner_whose_name_was_taken_while_it_was_paused_stops(conn, runners, tmp_path):
    """SIGSTOP past dead_after, a new process takes the name, SIGCONT: the old one must not
    carry on beside it under the same name (its heartbeat once kept both alive)."""
    jobs = [{"key": f"j{i}", "command": "sleep 30", "max_attempts": 3} for i in range(2)]
    smifdb.submit(conn, {"jobs": jobs})
    fast = ("--dead-after", "1", "--heartbeat", "0.3")
    old = runners.start("--slots", "1", *fast, name="dup")
    wait_for(
        lambda: conn.execute("SELECT count(*) FROM jobs WHERE status = 'running'").fetchone()[0]
    )
    old.send_signal(signal.SIGSTOP)
    time.sleep(2)
    new = runners.start("--slots", "2", *fast, name="dup")
    wait_for(
        lambda: (
            conn.execute("SELECT count(*) FROM jobs WHERE status = 'running'").fetchone()[0] == 2
        )
    )
    old.send_signal(signal.SIGCONT)
    assert old.wait(timeout=20) == 1
    assert "was taken over by another process" in runners.output("dup")
    row = conn.execute("SELECT pid, state::text FROM runners WHERE name = 'dup'").fetchone()
    assert row == (new.pid, "active")
    running = conn.execute("SELECT count(*) FROM jobs WHERE status = 'running'").fetchone()[0]
    assert running == 2 and new.poll() is None


def test_a_reconnecting_runner_whose_name_was_taken_hands_back_nothing(conn, dsn, tmp_path):
    """Cut off past dead_after while another process took the name: after reconnecting, the
    jobs leased to the name are the new holder's, not the old process's to release."""
    smifdb.submit(conn, {"jobs": [{"key": "j", "command": "true"}]})
    conn.execute(
        "INSERT INTO runners (name, host, pid, slots, state, last_heartbeat_at)"
        " VALUES ('dup', 'elsewhere', 1, 1, 'active', now())"
    )
    (job,) = queue.claim(conn, "dup", 1, lease=60)  # the new holder's job
    runner = Runner(dsn, RunnerConfig(slots=1, name="dup", log_dir=tmp_path))
    assert runner._db_ready()
    runner.conn.close()
    assert runner.name_taken and runner.stopping.is_set()
    assert job_rows(conn, job.workflow_id)["j"]["status"] == "running"


# -- what a job may do: allowed callables, secrets, private files --------------------------


def _modules(tmp_path: Path) -> Path:
    """Importable modules that leave a file behind when imported, to tell what was imported."""
    folder = tmp_path / "modules"
    (folder / "mypkg").mkdir(parents=True)
    marker = "open(__import__('os').path.join({!r}, __name__ + '.imported'), 'w').close()\n"
    for path in ("mypkg/__init__.py", "mypkg/sub.py", "mypkgevil.py", "evil.py", "envpkg.py"):
        (folder / path).write_text(marker.format(str(tmp_path)) + "def f():\n    return 1\n")
    with open(folder / "mypkg/__init__.py", "a") as f:
        f.write("import os\nfrom os import system\n")  # allowed module, imported names
    return folder


def test_python_jobs_call_only_what_the_runner_allows(conn, dsn, runners, tmp_path, monkeypatch):
    """Prefixes match by dotted module path; a refused callable is never imported and fails
    for good at once (max_attempts 3, one attempt), naming itself and the option to allow it."""
    monkeypatch.setenv("PYTHONPATH", str(_modules(tmp_path)))
    monkeypatch.setenv("SMIFDB_PYTHON_ALLOW", " envpkg ,")
    pwned = tmp_path / "pwned"
    jobs = {
        "system": {"python": "os:system", "args": {"command": f"touch {pwned}"}},
        "through": {"python": "smifdb.examples:os.system", "args": {"command": f"touch {pwned}"}},
        "imported": {"python": "mypkg:system", "args": {"command": f"touch {pwned}"}},
        "via": {"python": "mypkg:os.system", "args": {"command": f"touch {pwned}"}},
        "evil": {"python": "evil:f"},
        "lookalike": {"python": "mypkgevil:f"},
        "top": {"python": "mypkg:f"},
        "sub": {"python": "mypkg.sub:f"},
        "env": {"python": "envpkg:f"},
        "example": {"python": "smifdb.examples:noop"},
    }
    wf = smifdb.submit(
        conn, {"jobs": [{"key": k, "max_attempts": 3, **j} for k, j in jobs.items()]}
    )
    proc = runners.start("--slots", "4", "--exit-when-idle", "--python-allow", "mypkg")
    assert proc.wait(timeout=60) == 0, runners.output("r0")
    rows = job_rows(conn, wf)
    assert {k: (r["status"], r["attempts"]) for k, r in rows.items()} == {
        "system": ("failed", 1),
        "through": ("failed", 1),
        "imported": ("failed", 1),
        "via": ("failed", 1),
        "evil": ("failed", 1),
        "lookalike": ("failed", 1),
        "top": ("succeeded", 1),
        "sub": ("succeeded", 1),
        "env": ("succeeded", 1),
        "example": ("succeeded", 1),
    }
    assert not pwned.exists()
    imported = sorted(p.stem for p in tmp_path.glob("*.imported"))
    assert imported == ["envpkg", "mypkg", "mypkg.sub"]
    error = rows["system"]["error"]
    assert error.startswith("python callable 'os:system' is not allowed: its module is under")
    assert error.endswith("--python-allow os (or SMIFDB_PYTHON_ALLOW=os) (runner r0)")
    assert "it is module os's, not defined under" in rows["through"]["error"]
    assert "it is posix's, not defined under" in rows["imported"]["error"]
    assert "it is module os's" in rows["via"]["error"]
    assert "mypkgevil" in rows["lookalike"]["error"]
    reasons = conn.execute(
        "SELECT reason FROM events e JOIN jobs j ON j.id = e.job_id"
        " WHERE j.workflow_id = %s AND j.key = 'evil' AND e.from_status = 'running'",
        [wf],
    ).fetchall()
    assert reasons == [("callable not allowed",)]

    bad = cli(dsn, "runner", "run", "--slots", "1", "--python-allow", "my pkg")
    assert bad.returncode == 2 and "'my pkg' is not a module prefix" in bad.stderr, bad.stderr


def test_smifdb_run_allows_its_own_specs_callables_in_its_workflow_only(
    conn, dsn, tmp_path, monkeypatch
):
    """The spec's author runs `smifdb run`: its callables run, but the runner it starts claims
    only that workflow, so another workflow naming the same callable is not run by it."""
    monkeypatch.setenv("PYTHONPATH", str(_modules(tmp_path)))
    other = smifdb.submit(conn, {"jobs": [{"key": "other", "python": "evil:f"}]})
    spec = tmp_path / "mine.json"
    spec.write_text(json.dumps({"jobs": [{"key": "mine", "python": "evil:f"}]}))
    out = cli(dsn, "run", str(spec), "--slots", "2", "--log-dir", str(tmp_path / "logs"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert job_rows(conn, other)["other"]["status"] == "ready"
    bad = cli(dsn, "run", str(spec), "--slots", "1", "--python-allow", "-x")
    assert bad.returncode == 2 and "'-x' is not a module prefix" in bad.stderr, bad.stderr
    assert conn.execute("SELECT count(*) FROM workflows").fetchone()[0] == 2  # none submitted


def test_jobs_do_not_inherit_the_runners_secrets(conn, dsn, runners, monkeypatch) -> None:
    secrets = {
        "SMIFDB_DSN": dsn,
        "SMIFDB_TEST_DSN": dsn,
        "SMIFDB_API_TOKEN": "api-token-secret",
        "PGPASSWORD": "hunter2",
        "PGPASSFILE": "/nonexistent/pgpass-secret",
        "PGSERVICEFILE": "/nonexistent/service-secret",
        "SMIFDB_OTHER_TOKEN": "other-token-secret",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HARMLESS", "kept")
    dump = 'env; python3 -c \'import json,os; json.dump(dict(os.environ), open(os.environ["SMIFDB_RESULT_FILE"], "w"))\''
    wf = smifdb.submit(
        conn,
        {
            "jobs": [
                {"key": "plain", "command": dump},
                {"key": "own", "command": dump, "env": {"PGPASSWORD": "the spec's own"}},
            ]
        },
    )
    proc = runners.start("--slots", "2", "--exit-when-idle")
    assert proc.wait(timeout=60) == 0, runners.output("r0")
    rows = job_rows(conn, wf)
    plain, own = rows["plain"], rows["own"]
    assert plain["status"] == own["status"] == "succeeded"
    assert not set(secrets) & set(plain["result"])
    assert plain["result"]["HARMLESS"] == "kept"
    assert own["result"]["PGPASSWORD"] == "the spec's own"
    for value in secrets.values():
        assert value not in plain["log_tail"] and value not in own["log_tail"]


def test_logs_and_results_are_private_to_the_runners_user(conn, runners, tmp_path) -> None:
    write = 'echo out; echo \'{"a": 1}\' > "$SMIFDB_RESULT_FILE"'
    wf = smifdb.submit(conn, {"jobs": [{"key": "j", "command": write}]})
    umask = os.umask(0o022)  # a login shell's: the runner must not depend on a stricter one
    try:
        proc = runners.start("--slots", "1", "--exit-when-idle")
    finally:
        os.umask(umask)
    assert proc.wait(timeout=60) == 0, runners.output("r0")
    assert job_rows(conn, wf)["j"]["result"] == {"a": 1}
    logs = tmp_path / "logs"
    folder = logs / f"workflow-{wf}"
    modes = {p.name: p.stat().st_mode & 0o777 for p in [logs, folder, *folder.iterdir()]}
    assert modes == {"logs": 0o700, folder.name: 0o700, "j.1.log": 0o600, "j.1.result.json": 0o600}


def test_a_job_that_kills_its_runners_fails_after_max_runner_losses(conn, runners) -> None:
    """A poison pill: its shell kills its parent, the runner. Restarted under its own name
    (the startup rescue) or replaced by a peer (the heartbeat's rescue), each runner loses it
    once; the third loss in a row fails it for good, with attempts left, and the rest of the
    workflow runs."""
    jobs = [{"key": "poison", "command": "kill -9 $PPID", "max_attempts": 10, "priority": 9}]
    jobs += [{"key": f"ok{i}", "command": "sleep 0.2"} for i in range(4)]
    wf = smifdb.submit(conn, {"jobs": jobs})
    deaths, last = 0, None
    for name in ["a", "a", "b", "a", "b", "a"]:
        if name == last:
            time.sleep(2.2)  # its dead name is free again after --dead-after
        last = name
        proc = runners.start("--slots", "1", "--exit-when-idle", name=name)
        code = proc.wait(timeout=60)
        if code == 0:
            break
        assert code == -signal.SIGKILL, runners.output(name)
        deaths += 1
    rows = job_rows(conn, wf)
    assert {k: r["status"] for k, r in rows.items()} == {
        "poison": "failed",
        **{f"ok{i}": "succeeded" for i in range(4)},
    }
    assert deaths == rows["poison"]["attempts"] == 3
    error = rows["poison"]["error"]
    assert error.startswith("attempt 3 abandoned: runner ")
    assert "its runner was lost 3 times in a row running it" in error
    assert "--max-runner-losses 3" in error
    reasons = conn.execute(
        "SELECT to_status::text, reason FROM events e JOIN jobs j ON j.id = e.job_id"
        " WHERE j.workflow_id = %s AND j.key = 'poison' AND e.from_status = 'running'"
        " ORDER BY e.id",
        [wf],
    ).fetchall()
    assert [status for status, _ in reasons] == ["ready", "ready", "failed"]
    assert reasons[-1][1] == "failed: runner lost 3 times in a row"
    assert finished(conn, wf) == "failed"


def test_only_runner_losses_in_a_row_count_towards_a_poison_pill() -> None:
    """The count lives in the rescued attempt's error; any other end of an attempt resets it."""

    def rescued(previous: str | None, max_losses: int = 3) -> queue.Outcome:
        outcome = queue.Outcome(
            1, 1, 4, "r", "failed", max_attempts=9, error="attempt 4 abandoned: lease expired"
        )
        queue._count_runner_losses(outcome, previous, max_losses)
        return outcome

    assert rescued(None).error == "attempt 4 abandoned: lease expired"
    assert rescued("exit status 1").error == "attempt 4 abandoned: lease expired"
    assert rescued("ValueError: attempt 3 abandoned: x (runner lost 2 times in a row)").retries
    second = rescued("attempt 3 abandoned: runner a restarted")
    assert second.error == "attempt 4 abandoned: lease expired (runner lost 2 times in a row)"
    assert second.retries
    third = rescued(second.error)
    assert third.final_failure and "lost 3 times in a row" in third.error
    assert rescued(None, max_losses=1).final_failure


# -- every process of a job ends with it; bounded results and logs ------------------------

_DAEMONS = (
    # A setsid'd sleep that keeps the job's output open, and a double-forked daemon in a
    # session of its own: neither is in the job's process group.
    "setsid sleep 1000 & echo $! > {dir}/setsid.pid; " + PY + ' -c "import os, sys, time\n'
    "if os.fork(): sys.exit(0)\n"
    "os.setsid()\n"
    "if os.fork(): os._exit(0)\n"
    "open('{dir}/daemon.pid', 'w').write(str(os.getpid()))\n"
    'time.sleep(1000)"; '
    "while [ ! -s {dir}/daemon.pid ]; do sleep 0.01; done; {then}"
)


def _gone(pid: int) -> bool:
    """Ended: no such process, or a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _daemon_job(tmp_path: Path, key: str, then: str, **extra) -> tuple[dict, list[Path]]:
    folder = tmp_path / key
    folder.mkdir()
    command = _DAEMONS.format(dir=folder, then=then)
    return {"key": key, "command": command, **extra}, [folder / "setsid.pid", folder / "daemon.pid"]


def test_daemons_a_job_started_end_with_it_however_it_ends(conn, runners, tmp_path) -> None:
    jobs, pidfiles = [], {}
    for key, then, extra in [
        ("succeeds", "exit 0", {}),
        ("fails", "exit 3", {}),
        ("times-out", "sleep 1000", {"timeout": 1}),
        ("cancelled", "sleep 1000", {}),
    ]:
        job, pidfiles[key] = _daemon_job(tmp_path, key, then, **extra)
        jobs.append(job)
    wf = smifdb.submit(conn, {"jobs": jobs})
    proc = runners.start("--slots", "4")
    wait_for(lambda: all(p.exists() for p in pidfiles["cancelled"]), what="the daemons")
    out = cli(runners.dsn, "cancel", str(wf), "--job", "cancelled")
    assert out.returncode in (0, 1), out.stderr
    wait_for(lambda: finished(conn, wf), 30, "the workflow to end")
    rows = job_rows(conn, wf)
    assert {k: r["status"] for k, r in rows.items()} == {
        "succeeds": "succeeded",
        "fails": "failed",
        "times-out": "failed",
        "cancelled": "cancelled",
    }
    pids = {(key, p.name): int(p.read_text()) for key, files in pidfiles.items() for p in files}
    try:
        assert [k for k, pid in pids.items() if not _gone(pid)] == []  # none outlived its job
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, runners.output("r0")
    finally:
        _kill(pids.values())


def test_daemons_a_job_started_end_when_its_runner_is_sigkilled(conn, runners, tmp_path):
    job, pidfiles = _daemon_job(tmp_path, "model", "sleep 1000")
    smifdb.submit(conn, {"jobs": [job]})
    victim = runners.start("--slots", "1", name="victim")
    wait_for(lambda: all(p.exists() and p.read_text() for p in pidfiles), what="the daemons")
    wait_for(lambda: _watchdogs(victim), what="the watchdog, told of the job as it starts")
    pids = [int(p.read_text()) for p in pidfiles]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    try:
        for pid in pids:
            wait_for(lambda pid=pid: _gone(pid), 15, f"daemon {pid} to be ended by the watchdog")
    finally:
        _kill(pids)


def _kill(pids) -> None:
    """What a failed test left running."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def test_a_huge_result_file_fails_its_attempt_without_taking_the_runners_memory(
    conn, runners, tmp_path
) -> None:
    """A 2 GB sparse result file (read whole, it took the runner to 5.6 GB): the attempt fails,
    naming the limit, and the runner's peak RSS stays under 150 MiB (measured: about 55)."""
    huge = 'truncate -s 2G "$SMIFDB_RESULT_FILE"'
    fits = 'printf \'{"n": "%s"}\' $(head -c 1000 /dev/zero | tr "\\0" x) > "$SMIFDB_RESULT_FILE"'
    jobs = [{"key": "huge", "command": huge}, {"key": "fits", "command": fits}]
    wf = smifdb.submit(conn, {"jobs": jobs})
    proc = runners.start("--slots", "2")
    wait_for(lambda: finished(conn, wf), 60, "the workflow to end")
    peak = _peak_rss_mib(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, runners.output("r0")
    print(f"runner peak RSS with a 2 GB result file: {peak:.0f} MiB")
    assert peak < 150
    rows = job_rows(conn, wf)
    assert rows["fits"]["status"] == "succeeded" and rows["fits"]["result"] == {"n": "x" * 1000}
    huge_row = rows["huge"]
    assert huge_row["status"] == "failed" and huge_row["result"] is None
    assert huge_row["error"] == (
        f"$SMIFDB_RESULT_FILE holds {2 * 2**30} bytes, more than the runner's --max-result-bytes"
        f" ({16 * 2**20}): write large outputs to files and return their paths"
    )

    wf = smifdb.submit(conn, {"jobs": [jobs[1]]})
    proc = runners.start("--slots", "1", "--exit-when-idle", "--max-result-bytes", "1008")
    assert proc.wait(timeout=60) == 0, runners.output("r1")
    assert (
        "holds 1009 bytes, more than the runner's --max-result-bytes (1008)"
        in (job_rows(conn, wf)["fits"]["error"])
    )


def test_a_job_writing_a_gigabyte_leaves_a_capped_log(conn, runners, tmp_path) -> None:
    """1 GiB to stdout: the log keeps the first bytes, a line saying how much was dropped and
    the last MiB, at most --max-log-bytes in all (the default, 64 MiB); the log tail in the
    database is the output's end; the runner's memory stays bounded."""
    flood = "echo FIRST; yes 0123456789abcdef | head -c 1073741824; echo; echo LAST"
    wf = smifdb.submit(conn, {"jobs": [{"key": "flood", "command": flood}]})
    proc = runners.start("--slots", "1")
    t0 = time.monotonic()
    wait_for(lambda: finished(conn, wf), 120, "the flood to end")
    took = time.monotonic() - t0
    peak = _peak_rss_mib(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, runners.output("r0")
    row = job_rows(conn, wf)["flood"]
    assert row["status"] == "succeeded", row["error"]
    assert row["log_tail"].endswith("\n0123456789abcdef\n0123456789abc\nLAST\n")
    log = tmp_path / "logs" / f"workflow-{wf}" / "flood.1.log"
    size = log.stat().st_size
    assert size <= 64 * 2**20 and log.stat().st_blocks * 512 <= 64 * 2**20 + 2**20
    data = log.read_bytes()
    assert data.startswith(b"FIRST\n0123456789abcdef\n") and data.endswith(b"abc\nLAST\n")
    at = data.index(b"\n[smifdb: ")
    after = data.index(b"]\n", at) + 2
    assert len(data) - after == 2**20  # the tail: the last MiB
    dropped = len("FIRST\n") + 2**30 + len("\nLAST\n") - at - (len(data) - after)
    assert (
        data[at:after]
        == (
            f"\n[smifdb: {dropped} bytes of output dropped here: the log keeps its first and last "
            "bytes, at most --max-log-bytes in all]\n"
        ).encode()
    )
    print(f"1 GiB of output: log {size / 2**20:.1f} MiB, {took:.1f} s, runner peak {peak:.0f} MiB")
    assert peak < 150


def test_modelrun_run_allows_its_decision_package_in_its_model_run(dsn, conn, tmp_path) -> None:
    """The caller's decision module runs in `modelrun run` anyway: the jobs it writes may call
    into its package, and nothing else beyond what the runner allows."""
    (tmp_path / "loopmod.py").write_text(
        "def decide(history):\n"
        "    if history:\n"
        "        return None\n"
        "    return {'jobs': [{'key': 'own', 'python': 'loopmod:work'},\n"
        "                     {'key': 'other', 'python': 'json:dumps', 'args': {'obj': 1}}]}\n"
        "def work():\n"
        "    return {'ran': True}\n"
    )
    args = ["modelrun", "run", str(tmp_path), "mr", "--decide", "loopmod:decide", "--slots", "2"]
    out = cli(dsn, *args, "--log-dir", str(tmp_path / "logs"))
    assert out.returncode == 1, out.stdout + out.stderr
    rows = {
        k: (s, e, r) for k, s, e, r in conn.execute("SELECT key, status, error, result FROM jobs")
    }
    assert rows["own"] == ("succeeded", None, {"ran": True})
    assert rows["other"][0] == "failed"
    assert "python callable 'json:dumps' is not allowed" in rows["other"][1]


def test_max_log_bytes_caps_a_log_at_the_runners_choice(conn, runners, tmp_path) -> None:
    wf = smifdb.submit(conn, {"jobs": [{"key": "j", "command": "seq 1 20000"}]})
    proc = runners.start("--slots", "1", "--exit-when-idle", "--max-log-bytes", "5000")
    assert proc.wait(timeout=60) == 0, runners.output("r0")
    data = (tmp_path / "logs" / f"workflow-{wf}" / "j.1.log").read_bytes()
    assert len(data) <= 5000 and data.startswith(b"1\n2\n3\n") and data.endswith(b"\n20000\n")
    assert b" bytes of output dropped here" in data
    assert job_rows(conn, wf)["j"]["log_tail"].endswith("\n19999\n20000\n")
