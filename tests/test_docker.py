"""Deployment files checked without Docker, SLURM or systemd: docker/compose.yaml, the
Dockerfile, examples/deploy/ and the operations docs. Every smifdb invocation in them is parsed
by the real click CLI, so a renamed command or option fails here, not on a server."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml
from processes import PY, wait_for

from smifdb.cli import main
from smifdb.execute import KILL_GRACE

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "examples" / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SMIFDB_SERVICES = {"manager", "runner-1", "runner-2", "api"}


# -- the CLI ------------------------------------------------------------------------------


def _rest(ctx: click.Context) -> list[str]:
    """A group context's unparsed words: the subcommand's name and its arguments."""
    protected = ctx.__dict__.get("_protected_args")  # click >= 8.2 keeps them apart
    return [*(ctx.protected_args if protected is None else protected), *ctx.args]


def parse_cli(argv: list[str], env: dict[str, str] | None = None) -> tuple[list[str], dict]:
    """Parse ``smifdb ARGV`` as click would, without running it: the command path and the
    leaf command's parameters. Unknown commands or options and bad values raise UsageError.
    ``env`` is the process environment (options with an envvar read it)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({k: v for k, v in saved.items() if not k.startswith("SMIFDB_")})
    os.environ.update(env or {})
    try:
        ctx = main.make_context("smifdb", list(argv))
        path: list[str] = []
        command: click.Command = main
        while isinstance(command, click.Group):
            name, sub, rest = command.resolve_command(ctx, _rest(ctx))
            assert sub is not None and name is not None
            ctx = sub.make_context(name, rest, parent=ctx)
            command = sub
            path.append(name)
        return path, ctx.params
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_parse_cli_catches_mistakes() -> None:
    """The checker itself: it must fail on what a real invocation would reject."""
    assert parse_cli(["runner", "run", "--slots", "4"])[0] == ["runner", "run"]
    with pytest.raises(click.UsageError):
        parse_cli(["runner", "run", "--slot", "4"])  # no such option
    with pytest.raises(click.UsageError):
        parse_cli(["runner", "runn", "--slots", "4"])  # no such command
    with pytest.raises(click.UsageError):
        parse_cli(["runner", "run", "--slots", "x"])  # not a number
    with pytest.raises(click.UsageError):
        parse_cli(["runner", "run"])  # --slots is required
    with pytest.raises(click.UsageError):
        parse_cli(["manager", "run"], env={"SMIFDB_LOG_FORMAT": "yaml"})
    assert parse_cli(["manager", "run"], env={"SMIFDB_LOG_FORMAT": "json"})[1]["log_format"] == (
        "json"
    )


def smifdb_words(command: list[str]) -> list[str] | None:
    """The arguments of smifdb in an argv, or None if the argv does not run smifdb."""
    if command and Path(command[0]).name == "smifdb":
        return command[1:]
    return None


# -- compose.yaml -------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, $$."""

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name, op, default = m.group(2) or m.group(5), m.group(3), m.group(4)
        value = env.get(name)
        if (op == ":-" and not value) or (op == "-" and value is None):
            return default
        assert value is not None, f"${{{name}}} has no default"
        return value

    return _VAR.sub(sub, text)


def resolved(value, env: dict[str, str]):
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [resolved(v, env) for v in value]
    if isinstance(value, dict):
        return {k: resolved(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def compose(raw_compose: dict) -> dict:
    """The compose file as Docker would see it with no variables set."""
    return resolved(raw_compose, {})


def argv(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value)


def healthcheck_argv(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return test[1:] if test[0] == "CMD" else shlex.split(test[1])


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_services_and_order(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", *SMIFDB_SERVICES}
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"  # one-shot: never rerun once it succeeded
    for name in SMIFDB_SERVICES:
        service = services[name]
        assert service["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }, name
        assert service["restart"] in ("always", "unless-stopped"), name
        assert service["init"] is True, name  # something must reap orphaned job processes
        assert not service["healthcheck"].get("disable"), name
        assert {"interval", "timeout", "retries", "start_period"} <= service["healthcheck"].keys()
    declared = set(compose["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in declared, (name, volume)


def test_compose_postgres(compose: dict, conn) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert healthcheck_argv(postgres)[0] == "pg_isready"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    words = argv(postgres["command"])
    assert words[0] == "postgres"
    settings = dict(s.split("=", 1) for flag, s in zip(words[1::2], words[2::2], strict=True))
    assert all(flag == "-c" for flag in words[1::2])
    assert {"max_connections", "shared_buffers", "idle_in_transaction_session_timeout"} <= set(
        settings
    )
    # Every setting is one the server knows (a typo would stop PostgreSQL from starting).
    known = {name for (name,) in conn.execute("SELECT name FROM pg_settings")}
    assert set(settings) <= known, set(settings) - known
    # Connections: enough for the services as configured (see docs/operations.md).
    api_workers = parse_cli(argv(compose["services"]["api"]["command"]))[1]["workers"]
    needed = 2 * 3 + 1 + api_workers * 8 + 10  # runners, manager, API pools, CLI and checks
    assert int(settings["max_connections"]) >= needed


def service_env(compose: dict, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in compose["services"][name].get("environment", {}).items()}


def test_compose_dsn_matches_the_database(compose: dict) -> None:
    pg = compose["services"]["postgres"]["environment"]
    for name in ["migrate", *SMIFDB_SERVICES]:
        dsn = service_env(compose, name)["SMIFDB_DSN"]
        m = re.fullmatch(r"postgresql://(\w+):([^@]+)@postgres:5432/(\w+)", dsn)
        assert m, dsn
        assert m.groups() == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])


def test_compose_smifdb_invocations_are_real_commands(compose: dict, raw_compose: dict) -> None:
    services = compose["services"]
    paths = {}
    for name in ["migrate", *SMIFDB_SERVICES]:
        env = service_env(compose, name)
        paths[name] = parse_cli(argv(services[name]["command"]), env)
        if "test" in services[name]["healthcheck"]:
            check = smifdb_words(healthcheck_argv(services[name]))
            if check is not None:
                parse_cli(check, env)
    assert paths["migrate"][0] == ["db", "upgrade"]
    assert paths["manager"][0] == ["manager", "run"]
    assert paths["api"][0] == ["api", "serve"]
    for name in SMIFDB_SERVICES:
        assert paths[name][1]["log_format"] == "json", name  # read from SMIFDB_LOG_FORMAT
    for name in ("runner-1", "runner-2"):
        path, params = paths[name]
        assert path == ["runner", "run"] and params["name"] == name
        raw = raw_compose["services"][name]["command"]
        assert "${SMIFDB_RUNNER_SLOTS:-4}" in raw and params["slots"] == 4
        # Its health check asks about this runner, allowing several missed heartbeats.
        check_path, check = parse_cli(smifdb_words(healthcheck_argv(services[name])))
        assert check_path == ["runner", "check"] and check["name"] == name
        assert check["max_age"] >= 5 * params["heartbeat"]
        # Docker's SIGKILL must not cut the drain short.
        drain = params["grace"] + KILL_GRACE
        assert seconds(services[name]["stop_grace_period"]) >= drain + 10
    assert paths["manager"][0] == ["manager", "run"]
    assert parse_cli(smifdb_words(healthcheck_argv(services["manager"])))[0] == [
        "runner",
        "status",
    ]


def test_compose_api_port_and_healthcheck(compose: dict) -> None:
    api = compose["services"]["api"]
    params = parse_cli(argv(api["command"]))[1]
    assert params["host"] == "0.0.0.0"
    assert [p.split(":")[-1] for p in api["ports"]] == [str(params["port"])]
    check = healthcheck_argv(api)
    assert check[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{params['port']}/openapi.json" in check[2]


def test_compose_builds_this_dockerfile(compose: dict, dockerfile: list) -> None:
    arg_names = {rest.split("=")[0] for k, rest in dockerfile if k == "ARG"}
    for name in ["migrate", *SMIFDB_SERVICES]:
        build = compose["services"][name]["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile")
        assert set(build.get("args", {})) <= arg_names
        data = [v for v in compose["services"][name]["volumes"] if v.startswith("smifdb-data:")]
        assert data == [f"smifdb-data:{env_of(dockerfile)['SMIFDB_HOME']}"]


# -- running the health checks for real -------------------------------------------------


def run_check(words: list[str], dsn: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "smifdb.cli", *words],
        env={**os.environ, "SMIFDB_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_runner_healthcheck_follows_the_heartbeat(compose: dict, dsn: str, runners) -> None:
    check = smifdb_words(healthcheck_argv(compose["services"]["runner-1"]))
    assert run_check(check, dsn).returncode == 1  # no such runner yet
    proc = runners.start("--slots", "1", name="runner-1")
    wait_for(lambda: run_check(check, dsn).returncode == 0, 30, "a healthy runner")
    proc.send_signal(signal.SIGSTOP)  # alive, but its heartbeat stops
    try:
        fast = [*check[:-1], "1"]  # --max-age 1 instead of 30, to see it go stale
        wait_for(lambda: run_check(fast, dsn).returncode == 1, 30, "a stale heartbeat")
        assert "last heartbeat" in run_check(fast, dsn).stderr
    finally:
        proc.send_signal(signal.SIGCONT)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    stopped = run_check(check, dsn)
    assert stopped.returncode == 1 and "stopped" in stopped.stderr


def test_manager_healthcheck_needs_a_migrated_database(compose: dict, dsn, empty_dsn) -> None:
    check = smifdb_words(healthcheck_argv(compose["services"]["manager"]))
    assert run_check(check, dsn).returncode == 0
    out = run_check(check, empty_dsn)
    assert out.returncode == 1 and "smifdb db upgrade" in out.stderr


def test_api_healthcheck_code_against_a_real_server(compose: dict, dsn: str, tmp_path) -> None:
    check = healthcheck_argv(compose["services"]["api"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = check[2].replace("127.0.0.1:8000/", f"127.0.0.1:{port}/")
    assert code != check[2]
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        api = subprocess.Popen(
            [PY, "-m", "smifdb.cli", "--dsn", dsn, "api", "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        down = subprocess.run([PY, "-c", code], capture_output=True, timeout=30)
        assert down.returncode != 0  # nothing listens yet: the check fails
        wait_for(
            lambda: subprocess.run([PY, "-c", code], capture_output=True).returncode == 0,
            60,
            "the API health check to pass",
        )
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=30)


# -- the Dockerfile -----------------------------------------------------------------------

INSTRUCTIONS = {
    "FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "USER", "WORKDIR", "EXPOSE", "HEALTHCHECK",
    "ENTRYPOINT", "CMD", "LABEL", "VOLUME", "STOPSIGNAL", "SHELL",
}  # fmt: skip


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue  # comment lines are dropped even inside a continuation
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        assert keyword.upper() in INSTRUCTIONS, f"unknown instruction: {current!r}"
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, f"a continuation runs off the end: {current!r}"
    return instructions


def exec_form(rest: str) -> list[str]:
    """The JSON (exec) form: the shell form would not pass signals on to smifdb."""
    try:
        value = json.loads(rest)
    except ValueError:
        raise AssertionError(f"not the JSON form: {rest}") from None
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def env_of(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, rest in instructions:
        if keyword == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(rest))
    return env


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile((DOCKER / "Dockerfile").read_text())


def test_dockerfile_parser_catches_mistakes() -> None:
    assert parse_dockerfile("FROM x\n# c\nRUN a \\\n  # inside\n  b\n") == [
        ("FROM", "x"),
        ("RUN", "a b"),
    ]
    with pytest.raises(AssertionError):
        parse_dockerfile("FROM x\nRUNN a\n")
    with pytest.raises(AssertionError):
        parse_dockerfile("FROM x\nRUN a \\\n")
    with pytest.raises(AssertionError):
        exec_form("smifdb runner run")


def test_dockerfile_base_user_entrypoint(dockerfile: list) -> None:
    keywords = [k for k, _ in dockerfile]
    assert keywords[0] == "FROM" and dockerfile[0][1] == "python:3.11-slim"
    assert keywords.count("FROM") == 1
    users = [rest for k, rest in dockerfile if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    # The user exists: a RUN before USER creates it.
    user = users[-1].split(":")[0]
    useradds = [rest.split("&&")[0] for k, rest in dockerfile if k == "RUN" and "useradd" in rest]
    assert any(re.search(rf"\buseradd\b.*\s{re.escape(user)}\s*$", r) for r in useradds)
    (entrypoint,) = [exec_form(rest) for k, rest in dockerfile if k == "ENTRYPOINT"]
    assert entrypoint == ["smifdb"]
    (cmd,) = [exec_form(rest) for k, rest in dockerfile if k == "CMD"]
    with pytest.raises(click.exceptions.Exit) as exited:  # --help prints and exits 0
        parse_cli(cmd)
    assert exited.value.exit_code == 0


def test_dockerfile_run_lines_are_valid_shell(dockerfile: list) -> None:
    runs = [rest for k, rest in dockerfile if k == "RUN"]
    assert runs
    for script in runs:  # RUN's shell form runs under /bin/sh -c
        out = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert out.returncode == 0, (script, out.stderr)
    assert subprocess.run(["sh", "-n", "-c", "if true; then"], capture_output=True).returncode


def test_dockerfile_healthcheck(dockerfile: list) -> None:
    (check,) = [rest for k, rest in dockerfile if k == "HEALTHCHECK"]
    options, _, command = check.partition("CMD ")
    for option in options.split():
        key, _, value = option.partition("=")
        assert key in ("--interval", "--timeout", "--start-period", "--retries"), option
        assert value.isdigit() if key == "--retries" else seconds(value)
    words = exec_form(command)
    assert parse_cli(smifdb_words(words))[0] == ["runner", "status"]


def dockerignore_includes(rules: list[str], path: str) -> bool:
    """Whether a path (relative to the build context) survives the ignore rules."""
    included = True
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!")
        if any(
            fnmatch.fnmatchcase(c, pattern) or fnmatch.fnmatchcase(c, pattern.removeprefix("**/"))
            for c in candidates
        ):
            included = negate
    return included


def test_dockerfile_copies_what_the_build_needs(dockerfile: list) -> None:
    rules = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: list[str] = []
    for keyword, rest in dockerfile:
        assert keyword != "ADD", "COPY, not ADD"
        if keyword == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            for source in words[:-1]:
                source = source.rstrip("/")
                assert (ROOT / source).exists(), source
                copied.append(source)
    for source in copied:
        files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*")
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if f.is_file() and "__pycache__" not in rel:
                assert dockerignore_includes(rules, rel), f"{rel} is copied but ignored"
    assert not dockerignore_includes(rules, "smifdb/__pycache__/cli.cpython-311.pyc")
    assert not dockerignore_includes(rules, "tests/test_docker.py")

    def is_copied(path: str) -> bool:
        return any(path == c or path.startswith(c + "/") for c in copied)

    # What hatchling reads to build the wheel: pyproject, the readme, packages, force-includes.
    wheel = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"], *wheel["packages"]]
    needed += list(wheel.get("force-include", {}))
    for path in needed:
        assert is_copied(path), f"the build needs {path}"
    # pip installs only extras that exist, with constraint files that are copied.
    runs = " ".join(rest for k, rest in dockerfile if k == "RUN")
    extras = set(re.findall(r"\.\[([\w,-]+)\]", runs))
    assert extras, runs
    known = set(PYPROJECT["project"]["optional-dependencies"])
    for group in extras:
        assert set(group.split(",")) <= known, group
    for constraint in re.findall(r"PIP_(?:BUILD_)?CONSTRAINT=(\S+)", runs):
        assert is_copied(constraint) and (ROOT / constraint).is_file(), constraint
    # The build arg that switches the extra on is declared and used.
    args = {rest.split("=")[0] for k, rest in dockerfile if k == "ARG"}
    assert "SMIF" in args and '"$SMIF"' in runs


def test_dockerfile_env_and_port(dockerfile: list, compose: dict) -> None:
    env = env_of(dockerfile)
    assert env["SMIFDB_HOME"].startswith("/")
    runs = " ".join(rest for k, rest in dockerfile if k == "RUN")
    assert f"chown smifdb:smifdb {env['SMIFDB_HOME']}" in runs  # writable by the user
    exposed = [rest for k, rest in dockerfile if k == "EXPOSE"]
    api_port = parse_cli(argv(compose["services"]["api"]["command"]))[1]["port"]
    assert exposed == [str(api_port)]


# -- examples/deploy ----------------------------------------------------------------------


def shell_commands(script: str) -> list[list[str]]:
    """Commands of a shell script, continuations joined, comments and blank lines dropped."""
    text = re.sub(r"\\\n", " ", script)
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_ARRAY_JOB_ID": "4240",
    "SLURM_ARRAY_TASK_ID": "2",
    "SLURM_CPUS_PER_TASK": "16",
    "HOME": "/home/user",
    "SMIFDB_DSN": "postgresql://smifdb@db/smifdb",
    "SMIFDB_LOG_DIR": "/shared/logs",
}


def shell_expand(word: str, env: dict[str, str]) -> str:
    """$VAR, ${VAR}, ${VAR:-default} and ${VAR:?message}, as bash expands them."""
    pattern = re.compile(r"\$\{(\w+)(?::([-?])((?:[^{}]|\$\{[^}]*\})*))?\}|\$(\w+)")

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(4)
        value = env.get(name, "")
        if m.group(2) == "-" and not value:
            return shell_expand(m.group(3), env)
        assert value, f"${name} is unset"
        return value

    return pattern.sub(sub, word)


def slurm_runner_invocation(env: dict[str, str]) -> tuple[list[str], dict]:
    script = (DEPLOY / "slurm-runner.sh").read_text()
    variables = dict(env)
    invocation = None
    for words in shell_commands(script):
        if re.fullmatch(r"\w+=.*", words[0]) and len(words) == 1:
            name, value = words[0].split("=", 1)
            variables[name] = shell_expand(value, variables)
        elif words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            variables[name] = shell_expand(value, variables)
        elif words[0] == "exec":
            assert smifdb_words(words[1:]) is not None, words
            invocation = [shell_expand(w, variables) for w in words[2:]]
    assert invocation is not None, "the script must exec smifdb, so that signals reach it"
    return parse_cli(invocation, {k: v for k, v in variables.items() if k.startswith("SMIFDB_")})


def test_slurm_script() -> None:
    script = (DEPLOY / "slurm-runner.sh").read_text()
    assert subprocess.run(["bash", "-n", str(DEPLOY / "slurm-runner.sh")]).returncode == 0
    path, params = slurm_runner_invocation(SLURM_ENV)
    assert path == ["runner", "run"]
    assert params["slots"] == 16 and params["exit_when_idle"]
    assert params["name"] == "slurm-4240-2" and params["log_dir"] == "/shared/logs"
    single = {k: v for k, v in SLURM_ENV.items() if "ARRAY" not in k}
    assert slurm_runner_invocation(single)[1]["name"] == "slurm-4242-0"
    # The signal comes early enough, to the runner alone, for the whole drain.
    (signal_option,) = re.findall(r"^#SBATCH --signal=(\S+)$", script, re.M)
    m = re.fullmatch(r"B:(?:TERM|SIGTERM|15)@(\d+)", signal_option)
    assert m, signal_option
    assert int(m.group(1)) >= params["grace"] + KILL_GRACE + 30


def systemd_unit(path: Path) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None and key and _, line
        current[key] = value
    return sections


def systemd_env() -> dict[str, str]:
    env = {}
    for line in (DEPLOY / "smifdb.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def exec_start(unit: dict, instance: str) -> tuple[list[str], dict]:
    words = shlex.split(unit["Service"]["ExecStart"])
    specifiers = {"%i": instance, "%H": "node07", "%%": "%"}
    env = systemd_env()
    expanded = []
    for w in words:
        w = re.sub(r"%[iH%]", lambda m: specifiers[m.group(0)], w)
        w = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env[m.group(1) or m.group(2)], w)
        expanded.append(w)
    args = smifdb_words(expanded)
    assert args is not None, words
    return parse_cli(args, {k: v for k, v in env.items() if k.startswith("SMIFDB_")})


def test_systemd_units() -> None:
    runner = systemd_unit(DEPLOY / "smifdb-runner@.service")
    path, params = exec_start(runner, "3")
    assert path == ["runner", "run"] and params["name"] == "node07-3"
    service = runner["Service"]
    assert service["Restart"] == "always"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # the job processes are not sent SIGTERM at once
    assert seconds(service["TimeoutStopSec"] + "s") >= params["grace"] + KILL_GRACE + 10
    assert "EnvironmentFile" in service and service["User"] != "root"
    for name, command in (("smifdb-manager.service", "manager"), ("smifdb-api.service", "api")):
        unit = systemd_unit(DEPLOY / name)
        assert exec_start(unit, "")[0][0] == command
        assert unit["Service"]["Restart"] == "always"
        assert unit["Service"]["KillSignal"] == "SIGTERM"
    assert systemd_env()["SMIFDB_LOG_FORMAT"] in ("text", "json")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """systemd's own parser: unknown keys or bad values are reported (verify still exits 0)."""
    smifdb_bin = Path(sys.executable).parent / "smifdb"
    assert smifdb_bin.exists()
    names = {"smifdb-runner@.service": "smifdb-runner@1.service"}
    units = []
    for source in sorted(DEPLOY.glob("*.service")):
        text = source.read_text().replace("/opt/smifdb/venv/bin/smifdb", str(smifdb_bin))
        target = tmp_path / names.get(source.name, source.name)
        target.write_text(text)
        units.append(str(target))
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


# -- the docs' shell blocks ---------------------------------------------------------------

DOCS = [ROOT / "README.md", ROOT / "docs" / "operations.md", DOCKER / "README.md"]


def doc_invocations(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line, words after smifdb) of smifdb commands in a markdown file's sh/bash blocks."""
    in_block, language, pending = False, "", ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            in_block, language = not in_block, line.strip()[3:]
            continue
        if not in_block or language not in ("sh", "bash", "shell", "console"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        for i, word in enumerate(words):
            previous = words[i - 1] if i else ""
            program = Path(word).name == "smifdb" and not re.search(r"[=:]", word)
            if program and not previous.startswith("-"):
                rest = []
                for w in words[i + 1 :]:
                    if w in ("|", "||", "&&", ";", "&", ">", "2>"):
                        break
                    rest.append(w)
                yield number, rest


def check_words(words: list[str]) -> None:
    """Lenient: values may be placeholders (WF, KEY, [--opt S]), but every command must exist
    and every --option must belong to the command it is given to."""
    command: click.Command = main
    ctx = click.Context(main, info_name="smifdb")
    words = [w.strip("[]") for w in words if w.strip("[]")]
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--") or (word.startswith("-") and len(word) == 2):
            name = word.split("=", 1)[0]
            option = next((p for p in command.params if name in p.opts + p.secondary_opts), None)
            if option is None and name != "--help":
                raise AssertionError(f"{' '.join(ctx.command_path.split()[1:])}: no {name}")
            takes_value = option is not None and not getattr(option, "is_flag", False)
            i += 2 if takes_value and "=" not in word else 1
            continue
        if isinstance(command, click.Group):
            sub = command.get_command(ctx, word)
            if sub is None:
                raise AssertionError(f"no command {word!r} in {ctx.command_path!r}")
            command = sub
            ctx = click.Context(sub, info_name=word, parent=ctx)
        i += 1


def test_check_words_catches_mistakes() -> None:
    check_words(["--dsn", "$DSN", "wait", "WF", "[--timeout", "S]"])
    with pytest.raises(AssertionError):
        check_words(["runner", "run", "--slot", "4"])
    with pytest.raises(AssertionError):
        check_words(["runners", "status"])
    with pytest.raises(AssertionError):
        check_words(["wait", "WF", "--slots", "4"])  # an option of another command


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_doc_commands_exist(doc: Path) -> None:
    found = list(doc_invocations(doc))
    assert found, f"no smifdb commands found in {doc}"
    for line, words in found:
        try:
            check_words(words)
        except AssertionError as exc:
            raise AssertionError(f"{doc.name}:{line}: smifdb {' '.join(words)}: {exc}") from None
