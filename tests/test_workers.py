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


def test_a_worker_past_its_memory_bound_is_replaced_at_its_next_check(
    conn, runners, crashes
) -> None:
    jobs = [{"key": f"j{i:02d}", "python": "crashes:whoami"} for i in range(40)]
    wf = smifdb.submit(conn, {"jobs": jobs})
    proc = runners.start(
        "--slots", "1", "--batch", "1", "--worker-max-memory", "1M", "--exit-when-idle"
    )
    assert proc.wait(timeout=90) == 0, runners.output("r0")
    rows = job_rows(conn, wf)
    pids = [rows[f"j{i:02d}"]["result"] for i in range(40)]  # in claim order
    # Every worker is past 1 MiB: each is read after its 16th job, and replaced.
    assert [len(set(pids[k : k + 16])) for k in (0, 16, 32)] == [1, 1, 1], pids
    assert len(set(pids)) == 3


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


ZYGOTE_SCRIPT = """
import json, os, sys, threading, time
from smifdb.workers import Child, WorkerDied, WorkerPool

SETUP = {"cwd": sys.argv[1], "log": os.path.join(sys.argv[1], "job.log"), "environ": {}}


def call(child, target, **args):
    try:
        return child.call(target, args, SETUP).value
    except WorkerDied as exc:
        return "died: " + str(exc)


if __name__ == "__main__":
    pool = WorkerPool(("crashes",))
    key = ("project", "run")
    zygote = lambda: pool.zygote_child(key, "crashes:warm", {"mark": "once"})
    out = {"runner": os.getpid()}
    out["children"] = [call(zygote(), "crashes:whoami") for _ in range(3)]
    out["exit"] = call(zygote(), "crashes:die")
    out["segfault"] = call(zygote(), "crashes:segfault")
    child = zygote()
    threading.Timer(1.0, child.kill).start()
    started = time.monotonic()
    out["killed"] = call(child, "crashes:nap", seconds=120)
    out["kill_took"] = time.monotonic() - started
    out["after"] = call(zygote(), "crashes:whoami")
    out["is_child"] = isinstance(child, Child)
    # Past MAX_ZYGOTES (2) zygotes, one whose job still runs is not closed (that would end it).
    busy, napping = zygote(), []
    nap = threading.Thread(target=lambda: napping.append(call(busy, "crashes:nap", seconds=2)))
    nap.start()
    time.sleep(0.5)
    others = [pool.zygote_child((f"other{i}",), "crashes:warm", {"mark": i}) for i in range(3)]
    out["others"] = [call(c, "crashes:whoami")["warmed"] for c in others]
    nap.join()
    out["napped"], out["zygotes"] = napping, [len(pool._zygotes)]
    call(pool.zygote_child(("last",), "crashes:warm", {"mark": "last"}), "crashes:whoami")
    out["zygotes"].append(len(pool._zygotes))  # those with no job running were let go
    failing = pool.zygote_child(("other",), "crashes:cannot_warm", {})
    out["fallback"] = [type(failing).__name__, call(failing, "crashes:whoami")["warmed"]]
    pool.close()
    print(json.dumps(out))
"""

ZYGOTE_JOBS = """
import ctypes, os, time

WARMED = []

def warm(mark):
    WARMED.append(mark)

def cannot_warm():
    raise RuntimeError("no project here")

def whoami():
    return {"pid": os.getpid(), "parent": os.getppid(), "warmed": WARMED}

def die():
    os._exit(3)

def segfault():
    ctypes.string_at(0)

def nap(seconds):
    time.sleep(seconds)
"""


def test_jobs_forked_from_a_warm_zygote_each_get_a_process_of_their_own(tmp_path) -> None:
    """What smif jobs run in: a zygote warmed up once forks a process per job, which can end
    or be killed without harm to the zygote or the next job; a zygote that cannot warm up
    leaves its jobs to plain workers."""
    import json
    import os
    import subprocess

    from processes import PY

    (tmp_path / "crashes.py").write_text(ZYGOTE_JOBS)
    (tmp_path / "zygotes.py").write_text(ZYGOTE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [PY, str(tmp_path / "zygotes.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    children = out["children"]
    assert len({c["pid"] for c in children}) == 3  # a process each
    zygotes = {c["parent"] for c in children}
    assert len(zygotes) == 1 and out["runner"] not in zygotes  # ... forked by one zygote
    assert all(c["warmed"] == ["once"] for c in children)  # ... warmed up once, before them
    assert out["exit"] == "died: its worker process exited with status 3"
    assert out["segfault"] == "died: its worker process died of SIGSEGV"
    assert out["killed"] == "died: its worker was killed to stop it"
    assert out["kill_took"] < 5
    assert out["after"]["parent"] in zygotes and out["after"]["warmed"] == ["once"]
    assert out["is_child"] is True
    assert out["napped"] == [None]  # not ended by the zygotes made while it ran
    assert out["others"] == [[0], [1], [2]]
    assert out["zygotes"] == [4, 2]  # more while their jobs ran, then back to MAX_ZYGOTES
    assert out["fallback"] == ["Worker", []]  # not warmed, but run
