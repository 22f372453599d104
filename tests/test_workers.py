"""Python jobs in warm worker processes (smifdb.workers): a stopped job's worker is killed and
its slot is free at once; a job that ends its own process fails only its attempt."""

from __future__ import annotations

import time

import pytest
from processes import wait_for
from test_runner import finished, job_rows

import smifdb
from smifdb.store import control

CRASHES = """
import ctypes, os, time

def die():
    os._exit(3)

def segfault():
    ctypes.string_at(0)

def whoami():
    return os.getpid()

def nap(seconds):
    time.sleep(seconds)
    return os.getpid()
"""


@pytest.fixture
def crashes(tmp_path, monkeypatch):
    (tmp_path / "crashes.py").write_text(CRASHES)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("SMIFDB_PYTHON_ALLOW", "crashes")


def _gap(rows: dict, first: str, then: str) -> float:
    return (rows[then]["started_at"] - rows[first]["finished_at"]).total_seconds()


def test_a_python_job_past_its_timeout_frees_its_slot_at_once(conn, runners, crashes) -> None:
    hang = {"python": "crashes:nap", "args": {"seconds": 120}, "timeout": 1}
    spec = {"jobs": [{"key": "hang", **hang}, {"key": "next", "python": "crashes:whoami"}]}
    wf = smifdb.submit(conn, spec)
    t0 = time.monotonic()
    proc = runners.start("--slots", "1", "--exit-when-idle", "--batch", "1")
    assert proc.wait(timeout=60) == 0, runners.output("r0")
    rows = job_rows(conn, wf)
    assert rows["hang"]["status"] == "failed" and "timed out after 1 s" in rows["hang"]["error"]
    assert rows["next"]["status"] == "succeeded"
    assert _gap(rows, "hang", "next") < 2  # its slot was free at once
    assert time.monotonic() - t0 < 20
    assert finished(conn, wf) == "failed"


def test_a_cancelled_python_job_frees_its_slot_for_the_next(conn, runners, crashes) -> None:
    long = {"python": "crashes:nap", "args": {"seconds": 120}}
    wf = smifdb.submit(conn, {"jobs": [{"key": "long", **long}]})
    proc = runners.start("--slots", "1", name="one")
    wait_for(lambda: job_rows(conn, wf)["long"]["status"] == "running", what="the long job")
    control.cancel(conn, wf, actor="test", job_key="long")
    wait_for(lambda: job_rows(conn, wf)["long"]["status"] == "cancelled", 20, "the cancel")
    second = smifdb.submit(conn, {"jobs": [{"key": "n", "python": "crashes:whoami"}]})
    wait_for(lambda: finished(conn, second) == "succeeded", 20, "the next job on its slot")
    assert proc.poll() is None  # the runner carries on
    cancelled_at = job_rows(conn, wf)["long"]["finished_at"]
    assert (job_rows(conn, second)["n"]["started_at"] - cancelled_at).total_seconds() < 10


@pytest.mark.parametrize(
    ("callable_", "says"),
    [("crashes:die", "exited with status 3"), ("crashes:segfault", "died of SIGSEGV")],
)
def test_a_job_that_ends_its_process_fails_only_its_attempt(
    conn, runners, crashes, callable_, says
) -> None:
    wf = smifdb.submit(
        conn,
        {
            "jobs": [
                {"key": "crash", "python": callable_},
                {"key": "after", "python": "crashes:whoami", "after": []},
                {"key": "later", "python": "crashes:whoami", "after": ["crash"]},
            ]
        },
    )
    proc = runners.start("--slots", "1", "--batch", "1", "--exit-when-idle")
    assert proc.wait(timeout=60) == 0, runners.output("r0")
    rows = job_rows(conn, wf)
    assert rows["crash"]["status"] == "failed" and says in rows["crash"]["error"], rows["crash"]
    assert rows["after"]["status"] == "succeeded"
    assert rows["later"]["status"] == "upstream_failed"
    assert rows["after"]["result"] != proc.pid  # not in the runner's own process


def test_warm_workers_are_reused_and_recycled(conn, runners, crashes) -> None:
    jobs = [{"key": f"j{i}", "python": "crashes:whoami"} for i in range(6)]
    wf = smifdb.submit(conn, {"jobs": jobs})
    proc = runners.start(
        "--slots", "1", "--batch", "1", "--worker-max-jobs", "2", "--exit-when-idle"
    )
    assert proc.wait(timeout=60) == 0, runners.output("r0")
    pids = [r["result"] for r in job_rows(conn, wf).values()]
    assert len(set(pids)) == 3, pids  # two jobs a worker, then a new one
    assert proc.pid not in pids


def test_a_main_module_that_cannot_be_imported_again_is_a_clear_refusal(tmp_path) -> None:
    """Workers import the parent's main module again: code read from stdin cannot be."""
    import subprocess

    from processes import PY

    code = "from smifdb.workers import WorkerPool\nWorkerPool(())\n"
    out = subprocess.run([PY, "-"], input=code, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "--python-in-thread" in out.stderr, out.stderr
    script = tmp_path / "guarded.py"
    script.write_text(
        "from smifdb.workers import WorkerPool\n"
        "if __name__ == '__main__':\n"
        "    pool = WorkerPool(('smifdb.examples',))\n"
        "    worker = pool.take()\n"
        "    print(worker.call('smifdb.examples:sleep', {'seconds': 0}).value)\n"
        "    pool.close()\n"
    )
    out = subprocess.run([PY, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stderr
