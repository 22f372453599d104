"""The manager and generic decision loops, with real runner and manager processes."""

from __future__ import annotations

import signal
import textwrap
import time
from pathlib import Path

import psycopg
import pytest
from processes import cli, wait_for

from smifdb.examples import CONVERGE_TARGETS
from smifdb.manager import Manager, ManagerConfig
from smifdb.store import modelruns


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


def counts(conn: psycopg.Connection) -> tuple[int, int, int]:
    return conn.execute(
        "SELECT (SELECT count(*) FROM model_runs), (SELECT count(*) FROM workflows),"
        " (SELECT count(*) FROM events)"
    ).fetchone()


def model_run_status(conn: psycopg.Connection, model_run_id: int) -> str | None:
    row = conn.execute(
        "SELECT status::text FROM model_runs WHERE id = %s AND finished_at IS NOT NULL",
        [model_run_id],
    ).fetchone()
    return row[0] if row else None


def bundle_submissions(conn: psycopg.Connection, model_run_id: int) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT reason FROM events WHERE model_run_id = %s AND reason LIKE 'bundle %%'"
            " ORDER BY id",
            [model_run_id],
        )
    ]


# A decision loop slow enough to kill things in the middle of: each bundle runs two jobs
# that sleep, and the loop ends after SLOW_BUNDLES bundles.
SLOW_BUNDLES = 8
SLOW = f"""
def decide(history):
    if len(history) == {SLOW_BUNDLES}:
        return None
    done = sum(1 for b in history for j in b["jobs"].values() if j["status"] == "succeeded")
    return {{"jobs": [
        {{"key": f"step-{{i}}", "python": "smifdb.examples:sleep", "args": {{"seconds": 0.3}}}}
        for i in range(2)
    ] + [{{"key": "count", "python": "smifdb.examples:noop", "after": ["step-0", "step-1"]}}]}}
"""


def test_generic_decision_loop_runs_to_convergence(dsn, conn, tmp_path) -> None:
    result = cli(
        dsn,
        "modelrun",
        "run",
        str(tmp_path),
        "converge",
        "--decide",
        "smifdb.examples:converge_decision",
        "--slots",
        "3",
        "--log-dir",
        str(tmp_path / "logs"),
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "SUCCEEDED" in result.stdout
    model_run = modelruns.get(conn, "converge")
    assert model_run.status == "succeeded" and model_run.kind == "python"
    history = modelruns.history(conn, model_run.id)
    # Each bundle halves the distance to the target: east (4.0) needs 9 steps below 0.01.
    assert len(history) == model_run.bundles == 9
    last = history[-1]["results"]
    for region, target in CONVERGE_TARGETS.items():
        assert abs(last[region]["value"] - target) < 0.01
    # The three regions of a bundle are independent jobs of one workflow.
    assert all(len(b["jobs"]) == 3 for b in history)
    reasons = [e["reason"] for e in modelruns.events(conn, model_run.id)]
    assert reasons[0] == "submitted" and reasons[-1] == "decision loop ended after 9 bundle(s)"
    # What deciders are given: read as indexed, each bundle once.
    lazy = modelruns.History(conn, model_run.id, model_run.bundles)
    assert len(lazy) == 9 and lazy._read == {}
    assert lazy[-1] == history[-1] and set(lazy._read) == {8}
    assert lazy[2:4] == history[2:4] and set(lazy._read) == {2, 3, 8}
    assert lazy == history and list(lazy) == history and len(lazy._read) == 9
    with pytest.raises(IndexError):
        lazy[9]
    assert lazy.decider_state(8) is None  # a python decider keeps its progress in its history


def test_killed_managers_submit_every_bundle_once(dsn, conn, procs, tmp_path) -> None:
    write_module(tmp_path, "slow_loop", SLOW)
    result = cli(dsn, "modelrun", "submit", str(tmp_path), "slow", "--decide", "slow_loop:decide")
    assert result.returncode == 0, result.stderr
    model_run_id = int(result.stdout.strip())
    procs.start("--slots", "4", name="runner")
    # Two managers at all times; SIGKILL one of them every 0.4-0.7 s and start another.
    managers = [procs.manager(name=f"m{i}") for i in range(2)]
    kills = 0
    deadline = time.monotonic() + 90
    while model_run_status(conn, model_run_id) is None and time.monotonic() < deadline:
        time.sleep(0.4 + 0.1 * (kills % 4))
        victim = managers.pop(0)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        kills += 1
        managers.append(procs.manager(name=f"m{kills + 1}"))
    assert model_run_status(conn, model_run_id) == "succeeded"
    assert kills >= 5
    submissions = bundle_submissions(conn, model_run_id)
    assert submissions == [f"bundle {b} submitted" for b in range(SLOW_BUNDLES)]
    bundles = [
        r[0]
        for r in conn.execute(
            "SELECT bundle FROM workflows WHERE model_run_id = %s ORDER BY bundle", [model_run_id]
        )
    ]
    assert bundles == list(range(SLOW_BUNDLES))


def test_a_bundle_cannot_be_submitted_twice(dsn, conn, tmp_path) -> None:
    write_module(tmp_path, "slow_loop", SLOW)
    submitted = cli(dsn, "modelrun", "submit", str(tmp_path), "x", "--decide", "slow_loop:decide")
    assert submitted.returncode == 0, submitted.stderr
    model_run = modelruns.get(conn, "x")
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO workflows (name, model_run_id, bundle, job_count)"
            " VALUES ('again', %s, 0, 1)",
            [model_run.id],
        )


def test_manager_waits_for_the_fragment_then_fails_the_run_with_the_reason(
    dsn, conn, procs, tmp_path
) -> None:
    write_module(
        tmp_path,
        "flaky",
        """
        def raises_later(history):
            if len(history) == 2:
                raise RuntimeError("the optimiser diverged")
            return {"jobs": [{"key": "a", "python": "smifdb.examples:noop"}]}

        def invalid_later(history):
            if len(history) == 1:
                return {"jobs": [{"key": "a", "after": ["nope"], "python": "x:y"}]}
            return {"jobs": [{"key": "a", "python": "smifdb.examples:noop"}]}

        def job_fails(history):
            return {"jobs": [{"key": "bad", "command": "exit 3"}]}
        """,
    )
    ids = {}
    for fn in ("raises_later", "invalid_later", "job_fails"):
        result = cli(dsn, "modelrun", "submit", str(tmp_path), fn, "--decide", f"flaky:{fn}")
        assert result.returncode == 0, result.stderr
        ids[fn] = int(result.stdout)
    procs.start("--slots", "2", name="runner")
    procs.manager(name="manager")
    for model_run_id in ids.values():
        wait_for(lambda m=model_run_id: model_run_status(conn, m), what="model runs to end")
    failures = {fn: modelruns.get(conn, m) for fn, m in ids.items()}
    assert {m.status for m in failures.values()} == {"failed"}
    assert "RuntimeError: the optimiser diverged (deciding bundle 2)" in (
        failures["raises_later"].error
    )
    assert failures["raises_later"].bundles == 2
    assert "invalid DAG for bundle 1" in failures["invalid_later"].error
    assert "unknown job 'nope'" in failures["invalid_later"].error
    job_fails_workflow = conn.execute(
        "SELECT id FROM workflows WHERE model_run_id = %s", [ids["job_fails"]]
    ).fetchone()[0]
    assert failures["job_fails"].error == f"bundle 0 (workflow {job_fails_workflow}) failed"
    # The reason is in the audit log, not only on the row.
    events = modelruns.events(conn, ids["raises_later"])
    assert events[-1]["to_status"] == "failed"
    assert "the optimiser diverged" in events[-1]["reason"]


def test_bad_input_is_refused_with_nothing_written(dsn, conn, tmp_path) -> None:
    write_module(
        tmp_path,
        "bad",
        """
        def raises(history):
            raise ValueError("no data for 2050")

        def invalid(history):
            return {"jobs": []}

        def nothing(history):
            return None

        not_callable = 3
        """,
    )
    before = counts(conn)
    cases = [
        ([str(tmp_path / "missing"), "r", "--decide", "bad:raises"], "does not exist"),
        ([str(tmp_path), "r", "--decide", "bad:raises"], "ValueError: no data for 2050"),
        ([str(tmp_path), "r", "--decide", "bad:invalid"], "'jobs' must be a non-empty list"),
        ([str(tmp_path), "r", "--decide", "bad:nothing"], "gave no first bundle"),
        ([str(tmp_path), "r", "--decide", "bad:missing"], "cannot load decision entry point"),
        ([str(tmp_path), "r", "--decide", "bad:not_callable"], "is not callable"),
        ([str(tmp_path), "r", "--decide", "not an entry"], "must look like module:function"),
        ([str(tmp_path), "r", "--decide", "nomodule_xyz:f"], "No module named 'nomodule_xyz'"),
    ]
    for args, message in cases:
        result = cli(dsn, "modelrun", "submit", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    for args in (["status", "no-such-run"], ["cancel", "12345"]):
        result = cli(dsn, "modelrun", *args)
        assert result.returncode == 2 and "no model run" in result.stderr
    assert counts(conn) == before


def test_one_live_run_per_name_and_cancel(dsn, conn, tmp_path) -> None:
    write_module(tmp_path, "slow_loop", SLOW)
    args = ["modelrun", "submit", str(tmp_path), "dup", "--decide", "slow_loop:decide"]
    assert cli(dsn, *args).returncode == 0
    again = cli(dsn, *args)
    assert again.returncode == 2 and "already running" in again.stderr
    result = cli(dsn, "modelrun", "cancel", "dup")
    assert result.returncode == 0, result.stderr
    model_run = modelruns.get(conn, "dup")
    assert model_run.status == "cancelled"
    statuses = conn.execute(
        "SELECT DISTINCT j.status::text FROM jobs j JOIN workflows w ON w.id = j.workflow_id"
        " WHERE w.model_run_id = %s",
        [model_run.id],
    ).fetchall()
    assert statuses == [("cancelled",)]
    # A manager leaves a cancelled run alone; the name is free again.
    Manager(dsn, ManagerConfig(housekeeping=False)).step(conn)
    assert modelruns.get(conn, model_run.id).bundles == 1
    assert cli(dsn, *args).returncode == 0
    status = cli(dsn, "modelrun", "status", "--json")
    assert status.returncode == 0 and '"dup"' in status.stdout
