"""The real smif sample project through smifdb, compared file by file with serial `smif run`.

By default a model run is a snapshot in the database: its runners and managers here run in a
private mount namespace with an empty tmpfs over the submitter's project folder, so they cannot
read it, and its results come back with `smifdb modelrun export`. The shared-folder mode
(`--shared-project`) keeps its own tests.

Needs the smif extra (PIP_CONSTRAINT=constraints/smif.txt PIP_BUILD_CONSTRAINT=constraints/smif.txt
pip install ".[test,smif]"); CI
installs it. PYTHONHASHSEED is fixed for both sides: smif writes each decision state from a
Python set, so even two serial `smif run`s differ in row order without it.
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from credentials import user_token
from processes import PY, Runners, cli, hide, require_namespaces, wait_for
from test_http_runners import api_serve, http_runner, socket_folder

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
    monkeypatch.setenv("SMIFDB_HOME", str(tmp_path / "home"))
    r = Runners(dsn, tmp_path)
    yield r
    r.close()


class Elsewhere(Runners):
    """Runners and managers that cannot see ``hidden`` (the submitter's project folder): each
    starts in a mount namespace of its own with an empty tmpfs mounted over it, and each is a
    machine of its own (its SMIFDB_HOME: cache, attempt folders, manager mirror)."""

    def __init__(self, dsn: str, tmp: Path, hidden: Path) -> None:
        super().__init__(dsn, tmp)
        self.hidden = hidden

    def spawn(self, *args: str, log_name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{log_name}.log", "ab")  # noqa: SIM115 - closed with the process
        home = self.tmp / "machines" / log_name
        home.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [*hide(self.hidden), PY, "-m", "smifdb.cli", "--dsn", self.dsn, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**ENV, "SMIFDB_HOME": str(home)},
        )
        self.procs.append(proc)
        return proc

    def home(self, name: str) -> Path:
        return self.tmp / "machines" / name


@pytest.fixture
def elsewhere(
    dsn: str, sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, Elsewhere]]:
    """(the submitter's copy of the sample project, processes that cannot see it)."""
    require_namespaces(tmp_path)
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    monkeypatch.setenv("SMIFDB_HOME", str(tmp_path / "submitter"))
    folder = project(sample, tmp_path, "submitted")
    r = Elsewhere(dsn, tmp_path, folder)
    yield folder, r
    r.close()


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: what "never written" compares."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def export(dsn: str, model_run_id: int, dest: Path) -> Path:
    result = smifdb(dsn, "modelrun", "export", str(model_run_id), str(dest))
    assert result.returncode == 0, result.stderr
    return dest


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

    status = wait_for(ended, timeout=timeout, what=f"model run {model_run_id}")
    if status != "succeeded":  # say why, in the assertion that follows
        rows = conn.execute(
            "SELECT j.key, j.error, j.log_tail FROM jobs j JOIN workflows w"
            " ON w.id = j.workflow_id WHERE w.model_run_id = %s AND j.error IS NOT NULL",
            [model_run_id],
        ).fetchall()
        status += f" ({modelruns.get(conn, model_run_id).error}; jobs: {rows[:3]})"
    return status


def submit(dsn: str, folder: Path, run: str, *extra: str) -> int:
    result = smifdb(dsn, "modelrun", "submit", str(folder), run, *extra)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.parametrize("mode", ["smif step processes", "--in-process"])
def test_shared_project_energy_water_cp_cr_matches_serial_smif(
    mode, sample, tmp_path, dsn, conn, procs
) -> None:
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


class _Resumable(list):
    """The first k bundles of a History, with its stored decider states (a plain list has
    none, so next_bundle replays the loop over it)."""

    def __init__(self, history: modelruns.History, k: int) -> None:
        super().__init__(history[:k])
        self.decider_state = history.decider_state


def decider_states(conn, model_run_id: int) -> list[bool]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT decider_state IS NOT NULL FROM workflows WHERE model_run_id = %s"
            " ORDER BY bundle",
            [model_run_id],
        )
    ]


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
    # Bundles 1-3 were decided by resuming the decision module from the state stored with the
    # bundle before (one step each), not by replaying the loop; both give the same bundles.
    assert decider_states(conn, model_run_id) == [True] * 4
    from smifdb.smifrun import SmifModelRun

    history = modelruns.History(conn, model_run_id, 4)
    run = SmifModelRun.open(folder, "energy_central")
    for k in range(1, 5):
        resumed = run.next_bundle(_Resumable(history, k))
        replayed = run.next_bundle(history[:k])
        assert (resumed is None) == (replayed is None) == (k == 4)
        if resumed is not None:
            assert resumed.name == replayed.name
            assert resumed.jobs == replayed.jobs


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
    assert list(dag.edges) == [
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
            "status": "unstarted",
            "output": "",
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


# -- snapshot model runs: no shared folder ------------------------------------------------


def test_energy_water_cp_cr_runs_where_the_project_folder_is_not(
    sample, tmp_path, dsn, conn, elsewhere
) -> None:
    folder, procs = elsewhere
    expected = project(sample, tmp_path, "serial")
    serial(expected, "energy_water_cp_cr")
    before = tree(folder)
    model_run_id = submit(dsn, folder, "energy_water_cp_cr")
    procs.start("--slots", "2", name="r1")
    procs.start("--slots", "2", name="r2")
    procs.manager(name="manager")
    assert wait_model_run(conn, model_run_id) == "succeeded"
    kinds = conn.execute(
        "SELECT array_agg(DISTINCT j.kind::text) FROM jobs j JOIN workflows w"
        " ON w.id = j.workflow_id WHERE w.model_run_id = %s",
        [model_run_id],
    ).fetchone()[0]
    assert kinds == ["smif"]
    # Each job's outputs are what it wrote (its model and decision iteration), stored once:
    # never the results of others or of its own earlier timesteps it was given to read.
    outputs = conn.execute(
        "SELECT j.model, j.decision, o.path FROM job_outputs o JOIN jobs j ON j.id = o.job_id"
        " JOIN workflows w ON w.id = j.workflow_id WHERE w.model_run_id = %s",
        [model_run_id],
    ).fetchall()
    assert len(outputs) == len({path for _, _, path in outputs}) == 18  # and 3 decision states
    states = conn.execute(
        "SELECT count(*) FROM model_run_files WHERE model_run_id = %s AND path LIKE 'results/%%'",
        [model_run_id],
    ).fetchone()[0]
    assert states == 3
    for model, decision, path in outputs:
        iteration = "none" if decision is None else decision
        assert path.startswith(f"results/energy_water_cp_cr/{model}/decision_{iteration}/")
    dest = export(dsn, model_run_id, tmp_path / "export")
    assert assert_same_results(expected / "results", dest) == 21
    assert tree(folder) == before, "the submitter's folder was written"
    assert not (folder / "results").exists() or not any((folder / "results").rglob("*.csv"))
    # Each runner materialised the project once, however many of its jobs ran.
    for name in ("r1", "r2"):
        projects = list((procs.home(name) / "cache" / "projects").glob(f"{model_run_id}-*"))
        assert len(projects) <= 1, projects


def test_energy_water_cp_cr_through_http_runners_alone(
    sample, tmp_path, dsn, conn, elsewhere
) -> None:
    """Runners that reach only the API (no DSN, the database's socket folder and the project
    hidden) run a smif model run to the same results as serial smif."""
    folder, procs = elsewhere
    expected = project(sample, tmp_path, "serial")
    serial(expected, "energy_water_cp_cr")
    model_run_id = submit(dsn, folder, "energy_water_cp_cr")
    url, api = api_serve(dsn, tmp_path)
    token = user_token(dsn, "node", role="runner")
    hidden = [folder, *socket_folder(dsn)]
    runners = [http_runner(url, token, tmp_path, f"h{i}", hidden, "--slots", "2") for i in (1, 2)]
    procs.procs += [*runners, api]
    procs.manager(name="manager")
    assert wait_model_run(conn, model_run_id) == "succeeded"
    owners = conn.execute(
        "SELECT DISTINCT e.claimed_by FROM events e JOIN workflows w ON w.id = e.workflow_id"
        " WHERE w.model_run_id = %s AND e.to_status = 'succeeded' AND e.job_id IS NOT NULL",
        [model_run_id],
    ).fetchall()
    assert owners and {r[0] for r in owners} <= {"node/h1", "node/h2"}, owners
    dest = export(dsn, model_run_id, tmp_path / "export")
    assert assert_same_results(expected / "results", dest) == 21


def test_energy_central_runs_where_the_project_folder_is_not_with_the_manager_killed(
    sample, tmp_path, dsn, conn, elsewhere
) -> None:
    folder, procs = elsewhere
    expected = project(sample, tmp_path, "serial")
    serial(expected, "energy_central")
    model_run_id = submit(dsn, folder, "energy_central")
    procs.start("--slots", "2", name="r1")
    procs.start("--slots", "2", name="r2")
    manager = procs.manager(name="m1")
    wait_for(lambda: modelruns.get(conn, model_run_id).bundles >= 2, what="bundle 1", timeout=120)
    manager.kill()
    manager.wait()
    procs.manager(name="m2")  # another machine: its mirror starts empty
    assert wait_model_run(conn, model_run_id) == "succeeded"
    reasons = [
        e["reason"] for e in modelruns.events(conn, model_run_id) if e["workflow_id"] is not None
    ]
    assert reasons == [f"bundle {b} submitted" for b in range(4)]
    states = conn.execute(
        "SELECT count(*) FROM model_run_files WHERE model_run_id = %s"
        " AND path LIKE 'results/%%/state_%%'",
        [model_run_id],
    ).fetchone()[0]
    assert states > 0, "the decision states the manager wrote were not stored"
    assert decider_states(conn, model_run_id) == [True] * 4
    dest = export(dsn, model_run_id, tmp_path / "export")
    assert assert_same_results(expected / "results", dest) == 12


def test_warm_start_from_the_store(sample, tmp_path, dsn, conn, elsewhere) -> None:
    folder, procs = elsewhere
    expected = project(sample, tmp_path, "serial")
    serial(expected, "energy_water_cp_cr")
    first = submit(dsn, folder, "energy_water_cp_cr")
    procs.start("--slots", "2", name="r1")
    procs.manager(name="manager")
    assert wait_model_run(conn, first) == "succeeded"
    blobs_before = conn.execute("SELECT count(*) FROM blobs").fetchone()[0]
    second = submit(dsn, folder, "energy_water_cp_cr", "--warm")
    # An unchanged project uploads nothing again; its results are the first run's blobs.
    assert conn.execute("SELECT count(*) FROM blobs").fetchone()[0] == blobs_before
    assert wait_model_run(conn, second) == "succeeded"
    keys = {
        r[0]
        for r in conn.execute(
            "SELECT j.key FROM jobs j JOIN workflows w ON w.id = j.workflow_id"
            " WHERE w.model_run_id = %s",
            [second],
        )
    }
    assert keys == {
        "energy_water_cp_cr_before_model_run_energy_demand",
        "energy_water_cp_cr_before_model_run_water_supply",
    }
    dest = export(dsn, second, tmp_path / "export")
    assert assert_same_results(expected / "results", dest) == 21


def test_a_runner_killed_while_it_materialises_a_smif_job_is_rescued(
    sample, tmp_path, dsn, conn, elsewhere
) -> None:
    folder, procs = elsewhere
    # A big data file makes materialising take long enough to be caught in the act.
    (folder / "data" / "big.bin").write_bytes(os.urandom(96 << 20))
    expected = project(sample, tmp_path, "serial")
    serial(expected, "energy_water_cp_cr")
    model_run_id = submit(dsn, folder, "energy_water_cp_cr")
    victim = procs.start("--slots", "2", name="victim")
    cache = procs.home("victim") / "cache"

    def downloading() -> bool:
        return any(cache.rglob("*.part")) if cache.is_dir() else False

    wait_for(downloading, what="the runner to download the snapshot", timeout=120)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    running = conn.execute(
        "SELECT count(*) FROM jobs j JOIN workflows w ON w.id = j.workflow_id"
        " WHERE w.model_run_id = %s AND j.status = 'running'",
        [model_run_id],
    ).fetchone()[0]
    assert running >= 1, "the runner was killed before it claimed a job"
    procs.start("--slots", "2", name="r2")
    procs.manager(name="manager")
    assert wait_model_run(conn, model_run_id) == "succeeded"
    rescued = conn.execute(
        "SELECT count(*) FROM events e JOIN jobs j ON j.id = e.job_id"
        " JOIN workflows w ON w.id = j.workflow_id"
        " WHERE w.model_run_id = %s AND e.reason LIKE '%%rescued%%'",
        [model_run_id],
    ).fetchone()[0]
    assert rescued >= 1
    dest = export(dsn, model_run_id, tmp_path / "export")
    assert assert_same_results(expected / "results", dest) == 21


def test_bad_export_and_snapshot_input_exit_2(sample, tmp_path, dsn, conn, procs) -> None:
    folder = project(sample, tmp_path, "bad-export")
    unknown = smifdb(dsn, "modelrun", "export", "no_such_run", str(tmp_path / "out"))
    assert unknown.returncode == 2 and "no model run 'no_such_run'" in unknown.stderr
    assert not (tmp_path / "out").exists()
    shared = submit(dsn, folder, "energy_central", "--shared-project")
    refused = smifdb(dsn, "modelrun", "export", str(shared), str(tmp_path / "out"))
    assert refused.returncode == 2 and "ran with --shared-project" in refused.stderr
    smifdb(dsn, "modelrun", "cancel", str(shared))
    snap = submit(dsn, folder, "energy_central")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    not_empty = smifdb(dsn, "modelrun", "export", str(snap), str(full))
    assert not_empty.returncode == 2 and "is not empty" in not_empty.stderr
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    in_process = smifdb(
        dsn, "modelrun", "submit", str(folder), "energy_water_cp_cr", "--in-process"
    )
    assert in_process.returncode == 2 and "needs --shared-project" in in_process.stderr
    (folder / "models" / "outside").symlink_to(tmp_path)
    before = conn.execute("SELECT count(*) FROM model_runs").fetchone()
    link = smifdb(dsn, "modelrun", "submit", str(folder), "energy_water_cp_cr")
    assert link.returncode == 2 and "symbolic link out of the project" in link.stderr
    assert "Traceback" not in link.stderr + in_process.stderr + not_empty.stderr
    assert conn.execute("SELECT count(*) FROM model_runs").fetchone() == before


def test_a_runner_cache_under_its_cap_drops_the_older_project(
    sample, tmp_path, dsn, conn, procs
) -> None:
    """Projects of 4.5 MB under --cache-max-bytes 4M: the first one's folder, and the objects
    only it linked, go when the second's is made; the second's, held by each job that uses
    it, stays though it alone exceeds the cap, and its run completes."""
    bigs = {}
    for name in ("first", "second"):
        folder = project(sample, tmp_path, name)
        data = os.urandom(4 << 20)
        (folder / "data" / "big.bin").write_bytes(data)
        bigs[name] = (folder, hashlib.sha256(data).hexdigest())
    cache = tmp_path / "home" / "cache"
    procs.start("--slots", "2", "--cache-max-bytes", "4M", name="r1")  # < one project
    procs.manager(name="manager")

    def projects() -> list[str]:
        return sorted(p.name.split("-")[0] for p in (cache / "projects").glob("[!.]*"))

    def has(sha256: str) -> bool:
        return (cache / "objects" / sha256[:2] / sha256).exists()

    one = submit(dsn, bigs["first"][0], "energy_water_cp_cr")
    assert wait_model_run(conn, one) == "succeeded"
    assert projects() == [str(one)] and has(bigs["first"][1])
    two = submit(dsn, bigs["second"][0], "energy_water_cp_cr")
    assert wait_model_run(conn, two) == "succeeded"
    assert projects() == [str(two)]
    assert not has(bigs["first"][1]) and has(bigs["second"][1])
    assert not list((cache / "projects").glob(".*-*")), "a folder set aside was left"


def test_a_cancelled_smif_job_is_killed_in_its_own_process_and_the_runner_carries_on(
    sample, tmp_path, dsn, conn, procs
) -> None:
    """smif jobs run in processes forked from a zygote warmed up for their model run: a
    cancel kills the job's own process (not the zygote, not the runner) at once."""
    folder = project(sample, tmp_path, "slow")
    model = folder / "models" / "water_supply.py"
    mark = tmp_path / "water_supply.pid"
    model.write_text(
        model.read_text().replace(
            "        current_interventions = data.get_current_interventions()\n",
            "        import os, time\n"
            f"        open({str(mark)!r}, 'w').write(f'{{os.getpid()}} {{os.getppid()}}')\n"
            "        time.sleep(120)\n"
            "        current_interventions = data.get_current_interventions()\n",
            1,
        )
    )
    model_run_id = submit(dsn, folder, "energy_water_cp_cr")
    runner = procs.start("--slots", "2", name="r1")
    procs.manager(name="manager")
    wait_for(lambda: mark.exists() and mark.read_text(), 120, "the slow step to start")
    pid, parent = map(int, mark.read_text().split())
    assert parent not in (runner.pid, pid) and runner.pid != pid  # a zygote's child
    t0 = time.monotonic()
    workflow = conn.execute(
        "SELECT id FROM workflows WHERE model_run_id = %s", [model_run_id]
    ).fetchone()[0]
    assert smifdb(dsn, "cancel", str(workflow)).returncode == 0
    assert wait_model_run(conn, model_run_id, 60).startswith("cancelled")
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "the step's process to end")
    assert time.monotonic() - t0 < 15
    assert Path(f"/proc/{parent}").exists() and runner.poll() is None  # zygote and runner
