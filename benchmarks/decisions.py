"""Does deciding bundle k cost more as k grows? The manager's cost per bundle of a decision loop.

    python benchmarks/decisions.py [--dsn DSN] [--bundles 200] [--jobs-per-bundle 50] [--skip-smif]

On one database (a new local cluster with durable commits unless --dsn is given):

- a generic loop of --bundles bundles (`smifdb modelrun run --decide`) of --jobs-per-bundle
  no-op jobs,
  with a decider that reads the last bundle (``history[-1]``) and one that reads every bundle
  (``for b in history``: what every decider paid before the history was read lazily). A
  bundle's cost is the manager's transaction that decides and submits it: from its start
  (the workflow's ``submitted_at``, ``now()``) to the bundle's "submitted" event
  (``clock_timestamp()``, the transaction's last statement but the commit);
- smif's energy_central (the sample project of ``smif setup``; needs the smif extra), as a
  snapshot run through ``smifdb modelrun run``, per bundle as above; then, in this process on
  a --shared-project copy once it has finished, ``next_bundle`` for each k resumed from the
  stored state against the loop replayed from the start (k steps).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psycopg
from common import database, machine, parser

from smifdb.store import modelruns

DECIDERS = """
N = {bundles}
JOBS = {jobs}


def job(history):
    return {{"jobs": [
        {{"key": "step" if i == 0 else f"step-{{i}}", "python": "smifdb.examples:noop"}}
        for i in range(JOBS)
    ]}}


def last_only(history):
    if len(history) == N:
        return None
    if history:
        assert history[-1]["jobs"]["step"]["status"] == "succeeded"
    return job(history)


def every_bundle(history):
    if len(history) == N:
        return None
    assert all(b["jobs"]["step"]["status"] == "succeeded" for b in history)
    return job(history)
"""

_BUNDLE_COSTS = """
SELECT w.bundle, extract(epoch FROM e.at - w.submitted_at) * 1000
FROM workflows w
JOIN events e ON e.model_run_id = w.model_run_id AND e.workflow_id = w.id
             AND e.reason = 'bundle ' || w.bundle || ' submitted'
WHERE w.model_run_id = %s ORDER BY w.bundle
"""


def smifdb(dsn: str, *args: str, env: dict | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "smifdb.cli", "--dsn", dsn, *args],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise SystemExit(f"smifdb {' '.join(args)} failed:\n{out.stderr}{out.stdout}")
    return out.stdout


def costs(dsn: str, name: str) -> list[float]:
    with psycopg.connect(dsn) as conn:
        model_run = modelruns.get(conn, name)
        assert model_run.status == "succeeded", model_run
        return [ms for _, ms in conn.execute(_BUNDLE_COSTS, [model_run.id])]


def summary(ms: list[float]) -> str:
    tenth = max(1, len(ms) // 10)
    first, last = ms[1 : 1 + tenth], ms[-tenth:]
    return (
        f"bundles 1-{tenth}: median {statistics.median(first):6.1f} ms;"
        f" last {tenth}: median {statistics.median(last):6.1f} ms"
        f" (ratio {statistics.median(last) / statistics.median(first):.2f})"
    )


def generic(dsn: str, bundles: int, jobs: int, work: Path) -> None:
    (work / "loop.py").write_text(textwrap.dedent(DECIDERS.format(bundles=bundles, jobs=jobs)))
    print(f"\n## generic loop, {bundles} bundles of {jobs} no-op job(s)")
    for decider in ("last_only", "every_bundle"):
        t0 = time.perf_counter()
        smifdb(
            dsn, "modelrun", "run", str(work), f"loop-{decider}", "--decide",
            f"loop:{decider}", "--slots", "2", "--log-dir", str(work / "logs"),
        )  # fmt: skip
        ms = costs(dsn, f"loop-{decider}")
        print(
            f"{decider:13} {summary(ms)}; whole run {time.perf_counter() - t0:5.1f} s",
            flush=True,
        )


def smif(dsn: str, work: Path) -> None:
    from smifdb.smifrun import SmifModelRun

    env = {**os.environ, "PYTHONHASHSEED": "0", "SMIFDB_HOME": str(work / "home")}
    smif_cli = str(Path(sys.executable).parent / "smif")
    sample = work / "sample"
    subprocess.run([smif_cli, "setup", "-d", str(sample)], check=True, capture_output=True)
    print("\n## smif energy_central (4 bundles)")
    shutil.copytree(sample, work / "snapshot")
    smifdb(dsn, "modelrun", "run", str(work / "snapshot"), "energy_central", "--slots", "2",
           "--log-dir", str(work / "logs"), env=env)  # fmt: skip
    print(
        "snapshot run, per bundle (ms):",
        ", ".join(f"{m:.0f}" for m in costs(dsn, "energy_central")),
    )
    shared = work / "shared"
    shutil.copytree(sample, shared)
    smifdb(dsn, "modelrun", "run", str(shared), "energy_central", "--shared-project", "--slots",
           "2", "--log-dir", str(work / "logs"), env=env)  # fmt: skip
    with psycopg.connect(dsn) as conn:
        model_run = modelruns.get(conn, "energy_central")
        history = modelruns.History(conn, model_run.id, model_run.bundles)
        run = SmifModelRun.open(shared, "energy_central")
        print("next_bundle(k) in this process, resumed vs replayed (median of 5, ms):")
        for k in range(1, model_run.bundles + 1):
            resumed, replayed = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                run.next_bundle(Resumable(history, k))
                resumed.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                run.next_bundle(history[:k])  # a plain list: no stored state, so a replay
                replayed.append((time.perf_counter() - t0) * 1000)
            print(
                f"  k={k}: resumed {statistics.median(resumed):6.1f}"
                f"   replayed {statistics.median(replayed):6.1f}"
            )


class Resumable(list):
    def __init__(self, history: modelruns.History, k: int) -> None:
        super().__init__(history[:k])
        self.decider_state = history.decider_state


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--bundles", type=int, default=200)
    p.add_argument("--jobs-per-bundle", type=int, default=50)
    p.add_argument("--skip-smif", action="store_true")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smifdb-bench-decisions-"))
    with database(args.dsn) as dsn:
        print(machine(dsn))
        generic(dsn, args.bundles, args.jobs_per_bundle, work)
        if not args.skip_smif:
            smif(dsn, work)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
