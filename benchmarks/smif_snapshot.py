"""smif model runs through smifdb against serial `smif run`, on the sample project.

    python benchmarks/smif_snapshot.py [--dsn DSN] [--durable] [--run energy_water_cp_cr]
                                       [--runs 2] [--slots 2] [--modes snapshot,shared]

One database (a new local cluster like the tests' own, fsync off, unless --durable or --dsn
is given: the blob store's uploads then wait for fsync) and smif's sample
project (`smif setup`). Each round runs `smifdb modelrun run PROJECT RUN --slots N` once per
mode, alternating, each on a fresh copy of the project and a fresh SMIFDB_HOME (an empty
runner cache and manager mirror: what a new machine pays):

- snapshot (the default): submit uploads the project, the runner materialises it in its cache,
  each job's results are stored as its outputs and the next jobs' folders get them from there,
  the manager replays the decision loop in its mirror;
- shared: `--shared-project`, jobs run `smif step` in the project folder itself;
- processes: the snapshot, its jobs as `smif step` processes (`--smif-processes`) instead of
  processes forked from a zygote warmed up for the model run.

Printed per run: wall time of the command, and the model run's makespan (first job start to
last job end) and job time (sum of job durations) from the database; then the best of each
mode and the snapshot's overhead over shared. A serial `smif run` of another copy, per round,
is the reference. Needs the smif extra.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from common import DURABLE, database, machine, parser

from smifdb import migrate
from smifdb.pgserver import ThrowawayCluster
from smifdb.store import modelruns

MODES = {"snapshot": [], "shared": ["--shared-project"], "processes": ["--smif-processes"]}


@contextlib.contextmanager
def test_like_database(dsn: str | None, durable: bool) -> Iterator[str]:
    """``dsn``, or a new cluster as tests/conftest.py makes one (``durable``: fsync on)."""
    if dsn or durable:
        with database(dsn) if dsn else ThrowawayCluster(settings=DURABLE) as ready:
            migrate.ensure_current(ready)
            yield ready
        return
    with ThrowawayCluster() as fresh:
        migrate.ensure_current(fresh)
        yield fresh


def smif_bin() -> str:
    found = Path(sys.executable).parent / "smif"
    return str(found) if found.exists() else "smif"


def run_mode(dsn: str, sample: Path, tmp: Path, tag: str, run: str, slots: int, extra: list):
    folder = tmp / f"project-{tag}"
    shutil.copytree(sample, folder)
    env = {**os.environ, "PYTHONHASHSEED": "0", "SMIFDB_HOME": str(tmp / f"home-{tag}")}
    argv = [sys.executable, "-m", "smifdb.cli", "--dsn", dsn, "modelrun", "run", str(folder)]
    started = time.perf_counter()
    done = subprocess.run(
        [*argv, run, "--slots", str(slots), *extra], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{tag}: smifdb modelrun run failed:\n{done.stderr[-2000:]}")
    with psycopg.connect(dsn) as conn:
        model_run_id = conn.execute("SELECT max(id) FROM model_runs").fetchone()[0]
        work, makespan = modelruns.work_and_makespan(conn, model_run_id)
    return wall, makespan, work


def serial(sample: Path, tmp: Path, tag: str, run: str) -> float:
    folder = tmp / f"serial-{tag}"
    shutil.copytree(sample, folder)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    started = time.perf_counter()
    subprocess.run(
        [smif_bin(), "run", run, "-d", str(folder)], check=True, env=env, capture_output=True
    )
    return time.perf_counter() - started


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--run", default="energy_water_cp_cr", help="the sample's model run")
    p.add_argument("--runs", type=int, default=2, help="rounds (each runs every mode once)")
    p.add_argument("--slots", type=int, default=2, help="runner slots")
    p.add_argument("--durable", action="store_true", help="a new cluster with fsync on")
    p.add_argument("--modes", default="snapshot,shared", help=f"of {', '.join(MODES)}")
    args = p.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    with (
        test_like_database(args.dsn, args.durable) as dsn,
        tempfile.TemporaryDirectory(prefix="smifdb-bench-") as tmp,
    ):
        print(machine(dsn))
        tmp_path = Path(tmp)
        sample = tmp_path / "sample"
        subprocess.run([smif_bin(), "setup", "-d", str(sample)], check=True, capture_output=True)
        print(f"{args.run}, --slots {args.slots}, {args.runs} round(s), modes alternating:")
        best: dict[str, tuple[float, float, float]] = {}
        for i in range(args.runs):
            print(
                f"  serial smif run        wall {serial(sample, tmp_path, str(i), args.run):6.2f} s"
            )
            order = modes if i % 2 == 0 else list(reversed(modes))
            for mode in order:
                wall, makespan, work = run_mode(
                    dsn, sample, tmp_path, f"{mode}-{i}", args.run, args.slots, MODES[mode]
                )
                print(
                    f"  {mode:<22} wall {wall:6.2f} s  makespan {makespan or 0:6.2f} s"
                    f"  job time {work:6.2f} s"
                )
                old = best.get(mode)
                best[mode] = (wall, makespan or 0, work) if old is None or wall < old[0] else old
        print("best of each (by wall):")
        for mode, (wall, makespan, work) in best.items():
            print(
                f"  {mode:<22} wall {wall:6.2f} s  makespan {makespan:6.2f} s  job time {work:6.2f} s"
            )
        if "snapshot" in best and "shared" in best:
            (sw, sm, sj), (hw, hm, hj) = best["snapshot"], best["shared"]
            print(
                f"  snapshot overhead: wall {sw - hw:+.2f} s ({sw / hw:.2f}x), makespan "
                f"{sm - hm:+.2f} s, job time {sj - hj:+.2f} s"
            )


if __name__ == "__main__":
    main()
