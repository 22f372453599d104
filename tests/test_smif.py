"""The real smif sample project through smifdb, compared file by file with serial `smif run`.

Needs the smif extra (PIP_CONSTRAINT=constraints/smif.txt pip install ".[test,smif]"); CI
installs it. PYTHONHASHSEED is fixed for both sides: smif writes each decision state from a
Python set, so even two serial `smif run`s differ in row order without it.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from processes import PY, Runners, cli, wait_for

from smifdb.store import modelruns

if os.environ.get("SMIFDB_TEST_REQUIRE_SMIF"):  # CI: a missing extra is a failure
    import smif  # noqa: F401
else:
    pytest.importorskip("smif", reason="the smif extra is not installed")

SMIF = str(Path(PY).parent / "smif")
ENV = {**os.environ, "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("smif") / "sample"
    subprocess.run([SMIF, "setup", "-d", str(folder)], check=True, capture_output=True)
    return folder


@pytest.fixture
def procs(dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runners]:
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # inherited by runners and managers
    r = Runners(dsn, tmp_path)
    yield r
    r.close()


def project(sample: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(sample, folder)
    return folder


def smifdb(dsn: str, *args: str) -> subprocess.CompletedProcess:
    return cli(dsn, *args, env=ENV, timeout=300)


def serial(folder: Path, run: str) -> float:
    started = time.monotonic()
    subprocess.run([SMIF, "run", run, "-d", str(folder)], check=True, capture_output=True, env=ENV)
    return time.monotonic() - started


def assert_same_results(expected: Path, actual: Path) -> int:
    """Every file under results/ exists on both sides with the same bytes."""
    files = sorted(p.relative_to(expected) for p in expected.rglob("*") if p.is_file())
    others = sorted(p.relative_to(actual) for p in actual.rglob("*") if p.is_file())
    assert files == others
    assert files
    match, mismatch, errors = filecmp.cmpfiles(expected, actual, files, shallow=False)
    assert (mismatch, errors) == ([], [])
    return len(match)


def wait_model_run(conn: psycopg.Connection, model_run_id: int, timeout: float = 180) -> str:
    def ended():
        m = modelruns.get(conn, model_run_id)
        return m.status if m.finished else None

    return wait_for(ended, timeout=timeout, what=f"model run {model_run_id}")


def submit(dsn: str, folder: Path, run: str, *extra: str) -> int:
    result = smifdb(dsn, "modelrun", "submit", str(folder), run, *extra)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.parametrize("mode", ["smif step processes", "--in-process"])
def test_shared_project_energy_water_cp_cr_matches_serial_smif(mode, sample, tmp_path, dsn, conn, procs) -> None:
    expected = project(sample, tmp_path, "serial")
    serial(expected, "energy_water_cp_cr")
    folder = project(sample, tmp_path, "smifdb")
    extra = [mode] if mode.startswith("--") else []
    model_run_id = submit(dsn, folder, "energy_water_cp_cr", "--shared-project", *extra)
    procs.start("--slots", "2", name="r1")
    procs.start("--slots", "2", name="r2")
    procs.manager(name="manager")
    assert wait_model_run(conn, model_run_id) == "succeeded"
    (workflow_id,) = conn.execute(
        "SELECT id FROM workflows WHERE model_run_id = %s", [model_run_id]
    ).fetchone()
    jobs, edges = conn.execute(
        "SELECT (SELECT count(*) FROM jobs WHERE workflow_id = %(w)s),"
        " (SELECT count(*) FROM job_edges e JOIN jobs j ON j.id = e.child_id"
        "  WHERE j.workflow_id = %(w)s)",
        {"w": workflow_id},
    ).fetchone()
    assert (jobs, edges) == (8, 11)
    assert assert_same_results(expected / "results", folder / "results") == 21
    # energy_demand's timesteps depend only on its before_model_run: they ran side by side.
    spans = conn.execute(
        "SELECT started_at, finished_at FROM jobs WHERE workflow_id = %s"
        " AND model = 'energy_demand' AND operation = 'simulate' ORDER BY started_at",
        [workflow_id],
    ).fetchall()
    assert len(spans) == 3
    assert spans[1][0] < spans[0][1], "independent timesteps should overlap in time"


def test_shared_project_energy_central_matches_serial_smif_with_the_manager_killed(
    sample, tmp_path, dsn, conn, procs
) -> None:
    expected = project(sample, tmp_path, "serial")
    serial(expected, "energy_central")
    folder = project(sample, tmp_path, "smifdb")
    model_run_id = submit(dsn, folder, "energy_central", "--shared-project")
    procs.start("--slots", "2", name="r1")
    procs.start("--slots", "2", name="r2")
    manager = procs.manager(name="m1")
    # Kill the manager (SIGKILL) as soon as it has submitted bundle 1, then start another.
    wait_for(lambda: modelruns.get(conn, model_run_id).bundles >= 2, what="bundle 1", timeout=120)
    manager.kill()
    manager.wait()
    procs.manager(name="m2")
    assert wait_model_run(conn, model_run_id) == "succeeded"
    reasons = [
        e["reason"] for e in modelruns.events(conn, model_run_id) if e["workflow_id"] is not None
    ]
    assert reasons == [f"bundle {b} submitted" for b in range(4)]
    assert assert_same_results(expected / "results", folder / "results") == 12


def test_shared_project_warm_start_skips_finished_jobs(sample, tmp_path, dsn, conn, procs) -> None:
    folder = project(sample, tmp_path, "warm")
    serial(folder, "energy_water_cp_cr")
    before = {p: p.read_bytes() for p in (folder / "results").rglob("*.csv")}
    model_run_id = submit(dsn, folder, "energy_water_cp_cr", "--warm", "--shared-project")
    procs.start("--slots", "2", name="r1")
    procs.manager(name="manager")
    assert wait_model_run(conn, model_run_id) == "succeeded"
    keys = {
        r[0]
        for r in conn.execute(
            "SELECT j.key FROM jobs j JOIN workflows w ON w.id = j.workflow_id"
            " WHERE w.model_run_id = %s",
            [model_run_id],
        )
    }
    # As `smif run -w`: restart from the last timestep with results; its simulate jobs are
    # complete, so only the models' before_model_run jobs run.
    assert keys == {
        "energy_water_cp_cr_before_model_run_energy_demand",
        "energy_water_cp_cr_before_model_run_water_supply",
    }
    after = {p: p.read_bytes() for p in (folder / "results").rglob("*.csv")}
    assert after == before


def test_between_bundle_dependencies_do_not_crash_like_smif(sample, tmp_path, dsn, conn) -> None:
    """smif 1.3 fails with KeyError: 'operation' when a rule-based decision module meets a
    PREVIOUS dependency; smifdb treats the earlier bundle's node as satisfied."""
    from smifdb.smifrun import SmifModelRun

    folder = project(sample, tmp_path, "rule")
    config = (folder / "config/model_runs/energy_water_cp_cr.yml").read_text()
    config = config.replace("name: energy_water_cp_cr", "name: energy_water_rule")
    config += (
        "- type: rule-based\n  description: reduce emissions\n"
        "  path: planning/energyagent.py\n  classname: EnergyAgent\n"
    )
    (folder / "config/model_runs/energy_water_rule.yml").write_text(config)
    crash = subprocess.run(
        [SMIF, "run", "energy_water_rule", "-d", str(folder)], capture_output=True, text=True
    )
    assert crash.returncode != 0 and "KeyError: 'operation'" in crash.stderr
    # Bundles 0 and 1 (2010, decisions 1 and 2) ran; bundle 2 (2015, decision 3) depends on
    # water_supply of 2010 in decision 2 through decision_links.
    run = SmifModelRun.open(folder, "energy_water_rule")
    history = [{"bundle": 0}, {"bundle": 1}]
    dag = run.next_bundle(history)
    assert dag is not None
    assert {j.key for j in dag.jobs} == {
        "energy_water_rule_simulate_2015_3_energy_demand",
        "energy_water_rule_simulate_2015_3_water_supply",
    }
    assert dag.edges == [
        (
            "energy_water_rule_simulate_2015_3_energy_demand",
            "energy_water_rule_simulate_2015_3_water_supply",
        )
    ]


def test_bad_smif_input_is_refused_with_nothing_written(sample, tmp_path, dsn, conn) -> None:
    folder = project(sample, tmp_path, "bad")
    (folder / "config/model_runs/broken.yml").write_text(
        "name: broken\ntimesteps: [2010]\nsos_model: no_such_sos_model\nscenarios: {}\n"
        "narratives: {}\nstrategies: []\n"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(tmp_path / "missing"), "energy_central"], "does not exist"),
        ([str(empty), "energy_central"], "is not a smif project"),
        ([str(folder), "no_such_run"], "unknown smif model run 'no_such_run'"),
        ([str(folder), "broken"], "smif configuration error in model run 'broken'"),
    ]
    before = conn.execute("SELECT count(*) FROM model_runs").fetchone()
    for args, message in cases:
        result = smifdb(dsn, "modelrun", "submit", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert conn.execute("SELECT count(*) FROM model_runs").fetchone() == before


def test_smif_app_api_starts_and_watches_a_real_model_run(sample, tmp_path, dsn, procs) -> None:
    """The smif app's endpoints drive a real smif model run from start to done."""
    import credentials

    from smifdb.api import create_app

    folder = project(sample, tmp_path, "api")
    procs.start("--slots", "2", name="r1")
    procs.manager(name="manager")
    token = credentials.user_token(dsn, "modeller", role="operator")
    with credentials.client(create_app(dsn, project_dir=folder), token) as client:
        assert client.get("/api/v1/model_runs/energy_central/status").json()["data"] == {
            "status": "unstarted"
        }
        started = client.post("/api/v1/model_runs/energy_central/start", json={"args": {}})
        assert started.status_code == 201, started.text
        again = client.post("/api/v1/model_runs/energy_central/start", json={"args": {}})
        assert again.status_code == 409
        unknown = client.post("/api/v1/model_runs/no_such_run/start", json={"args": {}})
        assert unknown.status_code == 404
        assert "unknown smif model run" in unknown.json()["error"]["message"]

        def done() -> dict | None:
            status = client.get("/api/v1/model_runs/energy_central/status").json()["data"]
            return status if status["status"] in ("done", "failed", "stopped") else None

        status = wait_for(done, timeout=180, what="the model run to end")
        assert status["status"] == "done" and status["bundles"] == 4
        listed = client.get("/api/v1/model_runs/?status=done").json()["data"]
        assert [r["name"] for r in listed] == ["energy_central"]
