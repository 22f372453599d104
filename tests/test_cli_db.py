"""The `smifdb db` commands and the embedded default database, through the real console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from smifdb import migrate


def smifdb(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smifdb.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def home_env():
    home = Path(tempfile.mkdtemp(prefix="smifdb-home-"))
    home.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "SMIFDB_DSN"}
    env["SMIFDB_HOME"] = str(home / "smifdb")
    yield env, home
    subprocess.run([sys.executable, "-m", "smifdb.cli", "db", "stop"], env=env, capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


def test_embedded_default_lifecycle(home_env) -> None:
    env, home = home_env
    status = json.loads(smifdb("db", "status", "--json", env=env, cwd=home).stdout)
    assert status["running"] is False and status["initialised"] is False

    spec = home / "dag.yaml"
    spec.write_text(
        "jobs:\n  - {key: a, command: 'true'}\n  - {key: b, command: 'true', after: [a]}"
    )
    first = smifdb("submit", str(spec), env=env, cwd=home)  # starts, initialises and migrates
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "1"

    current = smifdb("db", "current", env=env, cwd=home)
    assert current.stdout.split()[0] == migrate.head()

    url = smifdb("db", "url", env=env, cwd=home).stdout.strip()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2
    # The secret is not in the DSN (which `ps` and logs show) but in the passfile it names.
    params = conninfo_to_dict(url)
    assert "password" not in params
    passfile = Path(params["passfile"])
    assert Path(env["SMIFDB_HOME"]) in passfile.parents
    assert passfile.stat().st_mode & 0o777 == 0o600
    assert passfile.parent.stat().st_mode & 0o777 == 0o700
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(make_conninfo(url, passfile=os.devnull)).close()
    psql = shutil.which("psql")
    if psql:  # the documented way in, word for word
        url_cmd = f"{sys.executable} -m smifdb.cli db url"
        shell = f'"{psql}" "$({url_cmd})" -w -Atc "SELECT count(*) FROM jobs"'
        out = subprocess.run(["sh", "-c", shell], env=env, cwd=home, capture_output=True, text=True)
        assert (out.returncode, out.stdout.strip()) == (0, "2"), out.stderr

    second = smifdb("submit", str(spec), env=env, cwd=home)  # reuses the running server
    assert second.stdout.strip() == "2"

    assert smifdb("db", "stop", env=env, cwd=home).stdout.strip() == "stopped"
    stopped = json.loads(smifdb("db", "status", "--json", env=env, cwd=home).stdout)
    assert stopped["running"] is False
    restarted = smifdb("db", "start", env=env, cwd=home)
    assert restarted.returncode == 0 and restarted.stdout.strip() == url
    with psycopg.connect(url) as conn:  # data survived the restart
        assert conn.execute("SELECT count(*) FROM workflows").fetchone()[0] == 2


def test_migration_commands_on_explicit_dsn(empty_dsn: str, tmp_path: Path) -> None:
    env = {**os.environ, "SMIFDB_DSN": empty_dsn}
    assert smifdb("db", "current", env=env, cwd=tmp_path).stdout.startswith("base")
    up = smifdb("db", "upgrade", env=env, cwd=tmp_path)
    assert up.returncode == 0 and migrate.head() in up.stdout
    down = smifdb("db", "downgrade", "base", env=env, cwd=tmp_path)
    assert down.returncode == 0 and "base" in down.stdout
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT to_regclass('jobs')").fetchone()[0] is None
    again = smifdb("--dsn", empty_dsn, "db", "upgrade", env=os.environ.copy(), cwd=tmp_path)
    assert again.returncode == 0


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "SMIFDB_DSN": f"postgresql://nobody@/x?host={tmp_path}&port=1"}
    spec = tmp_path / "dag.yaml"
    spec.write_text("jobs: [{key: a, command: 'true'}]\n")
    result = smifdb("submit", str(spec), env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot reach the database" in result.stderr and "Traceback" not in result.stderr
