"""The README's main job: the demo DAG runs to the end through `smifdb run`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"


def test_demo_dag_runs_in_parallel_and_in_order(dsn: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "smifdb.cli",
            "--dsn",
            dsn,
            "run",
            str(DEMO),
            "--slots",
            "4",
            "--log-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "SUCCEEDED" in out.stdout and "10 succeeded" in out.stdout
    with psycopg.connect(dsn) as conn:
        rows = dict(
            conn.execute("SELECT key, result FROM jobs WHERE status = 'succeeded'").fetchall()
        )
        assert rows["energy_demand_2015"]["sector"] == "energy_demand"
        late = conn.execute(
            "SELECT min(c.started_at) >= max(p.finished_at) FROM jobs c, jobs p"
            " WHERE c.key = 'energy_supply' AND p.key LIKE 'energy_demand_%'"
        ).fetchone()[0]
        assert late  # the fan-in waited for every branch
        work, span = conn.execute(
            "SELECT sum(extract(epoch FROM finished_at - started_at)),"
            " extract(epoch FROM max(finished_at) - min(started_at)) FROM jobs"
        ).fetchone()
        assert work / span > 1.5  # branches really ran side by side
