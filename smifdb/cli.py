"""The ``smifdb`` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click
import psycopg

from smifdb import __version__, db, errors, logs, snapshot, store, workers
from smifdb.execute import (
    DEFAULT_PYTHON_ALLOW,
    MAX_LOG_BYTES,
    MAX_RESULT_BYTES,
    check_allow_entry,
)
from smifdb.kinds import python as python_kind
from smifdb.manager import Manager, ManagerConfig, submit_model_run
from smifdb.pgserver import Cluster, ServerError, default_home
from smifdb.progress import ModelRunProgress, ProgressPrinter, model_run_summary, summary
from smifdb.runner import Runner, RunnerConfig, default_name
from smifdb.spec import Dag, load_file, load_text, parse, source_files, with_base_dir
from smifdb.store import FINISHED_CHANNEL, auth, control, jobfiles, modelruns, read
from smifdb.store import prune as retention
from smifdb.store import runners as runner_rows
from smifdb.store import views as view_rows
from smifdb.store.blobs import MAX_FILE_BYTES_ENV
from smifdb.store.submit import put_files, submit_dag
from smifdb.tables import Column, seconds, table, timestamp
from smifdb.workers import DEFAULT_MAX_JOBS


class Seconds(click.FloatRange):
    """A finite number of seconds in a range: click's FloatRange lets nan and inf through."""

    def __init__(self, low: float, high: float = 30 * 86400) -> None:
        super().__init__(low, high)

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return seconds


class Bytes(click.ParamType):
    """A size in bytes: 1048576, 512K, 20M, 4G or 1T (powers of 1024)."""

    name = "bytes"

    def __init__(self, low: int = 1) -> None:
        self.low = low
        self._UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in self._UNITS else ""
        number = text[: len(text) - len(unit)]
        if not number.isdigit() or int(number) * self._UNITS[unit] < self.low:
            self.fail(f"{value!r} is not a size of at least {self.low} bytes (e.g. 512M)")
        return int(number) * self._UNITS[unit]


class BadInput(click.ClickException):
    """Input the user can fix: exit status 2, like a usage error."""

    exit_code = 2


class SmifdbGroup(click.Group):
    """Turns smifdb's own errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except errors.Error as exc:  # the store's and the spec's: one clear line, exit 2
            raise BadInput(str(exc)) from exc
        except (ServerError, store.SchemaError) as exc:
            raise click.ClickException(str(exc)) from exc
        except psycopg.OperationalError as exc:
            raise click.ClickException(f"cannot reach the database: {exc}".strip()) from exc
        except psycopg.errors.InsufficientPrivilege as exc:
            # A login without the grants this command needs (docs/operations.md, "Roles").
            raise click.ClickException(
                f"the database refused: {exc.diag.message_primary or exc}; this command needs a "
                "role with more grants (smifdb_runner to run jobs, smifdb_admin to change them)"
            ) from exc


@click.group(cls=SmifdbGroup)
@click.option(
    "--dsn",
    envvar="SMIFDB_DSN",
    help="PostgreSQL connection string. Default: the embedded local database.",
)
@click.version_option(__version__, prog_name="smifdb")
@click.pass_context
def main(ctx: click.Context, dsn: str | None) -> None:
    """smifdb: run smif model runs and DAGs of jobs through a PostgreSQL queue."""
    ctx.obj = {"dsn": dsn}


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, default=str, indent=2))


def _dsn(ctx: click.Context, *, migrate_embedded: bool = True) -> str:
    if ctx.obj["dsn"]:
        try:
            psycopg.conninfo.conninfo_to_dict(ctx.obj["dsn"])
        except psycopg.ProgrammingError as exc:
            raise BadInput(f"--dsn (or SMIFDB_DSN) is not a connection string: {exc}") from exc
    return db.resolve_dsn(ctx.obj["dsn"], migrate_embedded=migrate_embedded)


# -- db ---------------------------------------------------------------------------------


@main.group("db")
def db_group() -> None:
    """Schema migrations and the embedded database."""


def _migrate():
    from smifdb import migrate  # alembic and SQLAlchemy load only for these commands

    return migrate


@db_group.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Migrate the schema up to REVISION (default: head)."""
    dsn = _dsn(ctx, migrate_embedded=False)
    migrate = _migrate()
    migrate.upgrade(dsn, revision)
    click.echo(f"schema at {migrate.current(dsn)}")


@db_group.command("downgrade")
@click.argument("revision", default="-1")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Migrate the schema down to REVISION (default: one step; 'base' removes everything)."""
    dsn = _dsn(ctx, migrate_embedded=False)
    migrate = _migrate()
    migrate.downgrade(dsn, revision)
    click.echo(f"schema at {migrate.current(dsn) or 'base'}")


@db_group.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the schema revision of the database (and whether it is the newest)."""
    migrate = _migrate()
    current = migrate.current(_dsn(ctx, migrate_embedded=False))
    head = migrate.head()
    note = "(head)" if current == head else f"(head is {head}: run `smifdb db upgrade`)"
    click.echo(f"{current or 'base'} {note}")


@db_group.command("start")
def db_start() -> None:
    """Start the embedded database (initialising and migrating it on first use)."""
    dsn = Cluster.embedded().start()
    _migrate().ensure_current(dsn)
    click.echo(dsn)


@db_group.command("stop")
def db_stop() -> None:
    """Stop the embedded database."""
    stopped = Cluster.embedded().stop()
    click.echo("stopped" if stopped else "not running")


@db_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def db_status(as_json: bool) -> None:
    """Show whether the embedded database runs, where its data lives, and its DSN."""
    status = Cluster.embedded().status()
    if as_json:
        _print_json(status)
        return
    for key, value in status.items():
        click.echo(f"{key:12} {value}")


@db_group.command("url")
@click.pass_context
def db_url(ctx: click.Context) -> None:
    """Print the DSN in use, starting the embedded database if needed: psql "$(smifdb db url)"."""
    click.echo(_dsn(ctx))


# -- workflows --------------------------------------------------------------------------


def _read_dag(file: str, name: str | None) -> tuple[Dag, list[tuple[Path, str]]]:
    """A spec file's jobs run in the file's folder unless they say otherwise (like make), or
    in a private folder if they have files; its ``files:`` are taken from its folder (the
    current one for standard input), each checked here, before anything is written."""
    if file == "-":
        dag, base = parse(load_text(sys.stdin.read(), "standard input"), name=name), Path.cwd()
    else:
        base = Path(file).resolve().parent
        dag = with_base_dir(parse(load_file(file), name=name), base)
    return dag, source_files(dag, base) if dag.files else []


def _submit(conn: psycopg.Connection, dag: Dag, sources: list, max_file_bytes: int) -> int:
    """Upload a spec's files (those stored already are not sent again), then write its
    workflow and their names in one transaction."""
    entries = put_files(conn, sources, max_bytes=max_file_bytes) if sources else []
    return submit_dag(conn, dag, actor=store.actor_name("cli"), files=entries)


@main.command("submit")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--name", help="Workflow name (default: the spec's 'name').")
@click.option(
    "--max-file-bytes",
    type=Bytes(),
    envvar=MAX_FILE_BYTES_ENV,
    default="4G",
    show_default=True,
    help=f"A file of the spec's 'files:' larger than this is refused (also ${MAX_FILE_BYTES_ENV}).",
)
@click.pass_context
def submit_cmd(ctx: click.Context, file: str, name: str | None, max_file_bytes: int) -> None:
    """Validate a YAML or JSON DAG FILE and submit it, with the files its 'files:' names;
    print the new workflow id."""
    dag, sources = _read_dag(file, name)
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        workflow_id = _submit(conn, dag, sources, max_file_bytes)
    ready = sum(1 for j in dag.jobs if not j.after)
    click.echo(
        f"submitted workflow {workflow_id} {dag.name!r}: {len(dag.jobs)} jobs, "
        f"{dag.edge_count} edges, {ready} ready",
        err=True,
    )
    click.echo(workflow_id)


# -- running ----------------------------------------------------------------------------


def _log_dir(value: str | None) -> Path:
    """The job log folder, created now: a folder that cannot be made is the user's to fix,
    and must be found before anything is submitted."""
    return _private_dir(value, "logs", "log folder")


def _private_dir(value: str | None, default: str, what: str) -> Path:
    """A runner's folder (``default`` under SMIFDB_HOME), made now and private to its user."""
    path = Path(value).resolve() if value else default_home() / default
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create the {what} {path}: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write to the {what} {path}")
    return path


def _setup_logging(level: str, fmt: str = "text") -> None:
    logs.configure(level, fmt)


def _stack(f, options: list):
    """Apply click decorators so they appear in --help in list order."""
    for option in reversed(options):
        f = option(f)
    return f


def _log_options(f):
    """--log-level and --log-format: the same on every long-running process."""
    options = [
        click.option(
            "--log-level",
            type=click.Choice(logs.LEVELS),
            default="info",
            show_default=True,
            envvar="SMIFDB_LOG_LEVEL",
            help="Least severe log lines written (on standard error).",
        ),
        click.option(
            "--log-format",
            type=click.Choice(logs.FORMATS),
            default="text",
            show_default=True,
            envvar="SMIFDB_LOG_FORMAT",
            help="Log lines as text, or as one JSON object per line (ts, level, logger, msg, "
            "and fields such as workflow_id, job_key, attempt, runner, status).",
        ),
    ]
    return _stack(f, options)


def _runner_options(f):
    options = [
        click.option(
            "--slots", type=click.IntRange(1, 10_000), required=True, help="Jobs to run at once."
        ),
        click.option(
            "--log-dir",
            type=click.Path(file_okay=False),
            help="Where job logs go (default: $SMIFDB_HOME/logs).",
        ),
        click.option(
            "--batch",
            type=click.IntRange(1, 100_000),
            help="Most jobs per claim (default: all free slots).",
        ),
        click.option(
            "--grace",
            type=Seconds(0),
            default=30.0,
            show_default=True,
            help="Seconds running jobs get to finish after SIGTERM/SIGINT.",
        ),
        click.option(
            "--poll",
            type=Seconds(0.01),
            default=2.0,
            show_default=True,
            help="Seconds between polls when no notification arrives.",
        ),
        click.option(
            "--no-listen",
            "no_listen",
            is_flag=True,
            help="Poll only (every --poll): no LISTEN, no session state and no server-side "
            "prepared statements, for a PgBouncer in transaction pooling mode.",
        ),
        click.option(
            "--heartbeat",
            type=Seconds(0.05),
            default=2.0,
            show_default=True,
            help="Seconds between heartbeats.",
        ),
        click.option(
            "--dead-after",
            type=Seconds(0.1),
            default=30.0,
            show_default=True,
            help="A runner silent this long is dead and its jobs are rescued.",
        ),
        click.option(
            "--lease",
            type=Seconds(1),
            default=300.0,
            show_default=True,
            help="Seconds a claim holds a job before the runner must renew it.",
        ),
        click.option(
            "--max-runner-losses",
            type=click.IntRange(1, 1000),
            default=3,
            show_default=True,
            help="A job whose attempts end with their runner lost this many times in a row "
            "fails, instead of going to the next runner (it may be what kills them).",
        ),
        click.option(
            "--max-result-bytes",
            type=click.IntRange(1, 200 * 2**20),
            default=MAX_RESULT_BYTES,
            show_default=True,
            help="A command job's $SMIFDB_RESULT_FILE larger than this fails its attempt.",
        ),
        click.option(
            "--max-log-bytes",
            type=click.IntRange(4096),
            default=MAX_LOG_BYTES,
            show_default=True,
            help="Most bytes of a command job's output kept in its log file: past it, the "
            "first and the last bytes, with a line saying how much was dropped between.",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(file_okay=False),
            envvar="SMIFDB_CACHE_DIR",
            help="The runner's cache of stored files, and the folders of jobs with files "
            "(default: $SMIFDB_HOME/cache; also $SMIFDB_CACHE_DIR). Runners of one machine may "
            "share it.",
        ),
        click.option(
            "--cache-max-bytes",
            type=Bytes(2**20),
            default="20G",
            show_default=True,
            help="Past this, the least recently used files leave the cache.",
        ),
        click.option(
            "--max-file-bytes",
            type=Bytes(),
            envvar="SMIFDB_MAX_FILE_BYTES",
            default="4G",
            show_default=True,
            help="A job's output file larger than this fails its attempt (also "
            "$SMIFDB_MAX_FILE_BYTES).",
        ),
        click.option(
            "--python-allow",
            "python_allow",
            metavar="PREFIX",
            multiple=True,
            help="Let python jobs call functions of this module and the modules under it "
            "(repeatable; also $SMIFDB_PYTHON_ALLOW, comma-separated). Always allowed: "
            + ", ".join(DEFAULT_PYTHON_ALLOW)
            + ".",
        ),
        click.option(
            "--python-in-thread",
            is_flag=True,
            help="Call python jobs in the runner's own threads, not in worker processes: "
            "faster for trusted no-op jobs, but a timeout or cancel cannot stop such a call, "
            "and a job that crashes its process takes the runner with it.",
        ),
        click.option(
            "--preload",
            metavar="MODULE",
            multiple=True,
            help="Import this module once in the zygote python jobs' worker processes are "
            "forked from (repeatable), so no job pays for importing it.",
        ),
        click.option(
            "--smif-processes",
            is_flag=True,
            help="Run smif jobs as `smif step` processes, each starting Python and importing "
            "smif (about a second), instead of in new workers forked from the warm zygote.",
        ),
        click.option(
            "--worker-max-jobs",
            type=click.IntRange(1),
            default=DEFAULT_MAX_JOBS,
            show_default=True,
            help="A python job's worker process is replaced after this many jobs.",
        ),
        click.option(
            "--worker-max-memory",
            type=Bytes(2**20),
            default="1G",
            show_default=True,
            help="...or once its resident memory is past this (read every 16th job).",
        ),
    ]
    return _stack(f, options)


def _python_allow(given: tuple[str, ...]) -> tuple[str, ...]:
    """The runner's allow list: the built-in prefixes, $SMIFDB_PYTHON_ALLOW, the options."""
    from_env = [e.strip() for e in os.environ.get("SMIFDB_PYTHON_ALLOW", "").split(",")]
    entries = [*DEFAULT_PYTHON_ALLOW, *filter(None, from_env), *given]
    try:
        return tuple(dict.fromkeys(check_allow_entry(e) for e in entries))
    except ValueError as exc:
        raise BadInput(f"--python-allow / SMIFDB_PYTHON_ALLOW: {exc}") from exc


_wait_for_database = click.option(
    "--wait-for-database",
    type=Seconds(0),
    default=60.0,
    show_default=True,
    help="At start, seconds to wait for a database that is down or starting up (0: fail at "
    "once). A database that refuses the connection fails at once.",
)


def _check_database(dsn: str, wait: float) -> None:
    """The first connection of a long-lived process: reachable (within ``wait``) and migrated."""
    with db.connect_patiently(dsn, wait) as conn:
        store.check_schema(conn)


def _check_timing(kw: dict) -> None:
    """Options that are each valid but together would let live jobs be rescued and run twice."""
    heartbeat = kw["heartbeat"]
    for option, value, why in (
        ("--lease", kw["lease"], "leases are renewed only at heartbeats"),
        ("--dead-after", kw["dead_after"], "a live runner must not look dead between beats"),
    ):
        if value <= 2 * heartbeat:
            raise BadInput(
                f"{option} ({value:g} s) must be more than twice --heartbeat ({heartbeat:g} s): "
                f"{why}"
            )


def _runner_config(name: str | None, allow: tuple[str, ...] = (), **kw) -> RunnerConfig:
    """``allow``: callables or prefixes allowed beyond the options, for this runner's scope."""
    _check_timing(kw)
    config = RunnerConfig(
        python_allow=_python_allow(kw["python_allow"]) + allow,
        max_runner_losses=kw["max_runner_losses"],
        max_result_bytes=kw["max_result_bytes"],
        max_log_bytes=kw["max_log_bytes"],
        cache_dir=_private_dir(kw["cache_dir"], "cache", "cache folder"),
        cache_max_bytes=kw["cache_max_bytes"],
        max_file_bytes=kw["max_file_bytes"],
        slots=kw["slots"],
        log_dir=_log_dir(kw["log_dir"]),
        batch=kw["batch"],
        grace=kw["grace"],
        poll=kw["poll"],
        listen=not kw.get("no_listen", False),
        heartbeat=kw["heartbeat"],
        dead_after=kw["dead_after"],
        lease=kw["lease"],
        exit_when_idle=kw.get("exit_when_idle", False),
        workflow_id=kw.get("workflow_id"),
        model_run_id=kw.get("model_run_id"),
        python_in_thread=kw["python_in_thread"],
        preload=tuple(kw["preload"]),
        worker_max_jobs=kw["worker_max_jobs"],
        worker_max_memory=kw["worker_max_memory"],
        smif_processes=kw["smif_processes"],
    )
    if name:
        config.name = name
    return config


@main.group("runner")
def runner_group() -> None:
    """Runners: processes that claim and execute jobs."""


@runner_group.command("run")
@click.option("--name", help="Unique runner name (default: HOST-PID).")
@_runner_options
@click.option(
    "--exit-when-idle",
    is_flag=True,
    help="Exit 0 once nothing is waiting, ready or running anywhere.",
)
@click.option(
    "--api",
    "api_urls",
    metavar="URL[,URL…]",
    help="Reach the queue through these API processes instead of the database (no DSN "
    "needed): tried in turn, failing over. The token comes from $SMIFDB_API_TOKEN or "
    "--token-file and must be of role runner.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    help="File holding the runner's API token (read again if the API refuses it).",
)
@_wait_for_database
@_log_options
@click.pass_context
def runner_run(
    ctx: click.Context,
    name: str | None,
    log_level: str,
    log_format: str,
    api_urls: str | None,
    token_file: str | None,
    **kw,
) -> None:
    """Claim ready jobs and run them, until stopped (SIGTERM/SIGINT drain gracefully)."""
    if name is not None:
        runner_rows.check_name(name)
    if token_file and not api_urls:
        raise BadInput("--token-file is for a runner with --api")
    _setup_logging(log_level, log_format)
    if api_urls:
        if ctx.get_parameter_source("poll") is click.core.ParameterSource.DEFAULT:
            kw["poll"] = 30.0  # the API's wait answers when work is ready: polls are a fallback
        config = _runner_config(name, **kw)
        runner = _http_runner(api_urls, token_file, config, kw["wait_for_database"])
    else:
        config = _runner_config(name, **kw)
        dsn = _dsn(ctx)
        _check_database(dsn, kw["wait_for_database"])
        runner = Runner(dsn, config)
    runner.install_signal_handlers()
    code = runner.run()  # RunnerNameInUse, like every smifdb.errors.Error: exit 2
    _exit(code, runner)


def _http_runner(urls: str, token_file: str | None, config: RunnerConfig, wait: float) -> Runner:
    """A runner that reaches only the API: checked reachable (within ``wait``) and its token
    accepted before it starts."""
    from smifdb.transport import http

    token = http.Token(file=Path(token_file) if token_file else None)
    api = http.Api([u for u in urls.split(",") if u.strip()], token)
    http.check(api, wait)
    return Runner(None, config, transport=http.HttpTransport(api), data=http.HttpData(api))


def _exit(code: int, runner: Runner) -> None:
    """Exit now if a stopped Python job still holds a thread (it cannot be interrupted)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if runner.busy:
        os._exit(code)
    sys.exit(code)


@runner_group.command("register")
@click.argument("name")
@click.option("--slots", type=click.IntRange(1, 10_000), required=True)
@click.option("--host", help="Machine the runner will run on.")
@click.pass_context
def runner_register(ctx: click.Context, name: str, slots: int, host: str | None) -> None:
    """Record a runner ahead of time (it becomes active when `runner run --name NAME` starts)."""
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        runner_rows.register(conn, name, slots, host)
    click.echo(f"registered runner {name!r} with {slots} slot(s)")


@runner_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--dead-after", type=Seconds(0.1), default=30.0, show_default=True)
@click.pass_context
def runner_status(ctx: click.Context, as_json: bool, dead_after: float) -> None:
    """List runners: slots, busy slots, last heartbeat, jobs done and failed."""
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        rows = runner_rows.status(conn, dead_after)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        click.echo("no runners")
        return
    header = (
        f"{'name':24} {'host':16} {'state':10} {'busy':>9} {'heartbeat':>10} {'claimed':>8}"
        f" {'done':>8} {'failed':>7}"
    )
    click.echo(header)
    for r in rows:
        age = "never" if r["heartbeat_age"] is None else f"{r['heartbeat_age']:.0f}s ago"
        click.echo(
            f"{r['name'][:24]:24} {(r['host'] or '-')[:16]:16} {r['state']:10} "
            f"{r['busy']:>4}/{r['slots']:<4} {age:>10} {r['jobs_claimed']:>8}"
            f" {r['jobs_succeeded']:>8} {r['jobs_failed']:>7}"
        )


@runner_group.command("check")
@click.argument("name")
@click.option(
    "--max-age",
    type=Seconds(0.1),
    default=30.0,
    show_default=True,
    help="Most seconds since the runner's last heartbeat.",
)
@click.pass_context
def runner_check(ctx: click.Context, name: str, max_age: float) -> None:
    """Exit 0 if runner NAME is active or draining with a fresh heartbeat, else 1.

    For health checks (Docker, systemd, monitoring): its heartbeat thread and its database
    connection both work, which a live process alone does not show.
    """
    with db.connect(_dsn(ctx), connect_timeout=10) as conn:
        store.check_schema(conn)
        row = next((r for r in runner_rows.status(conn, max_age) if r["name"] == name), None)
    if row is None:
        click.echo(f"no runner named {name!r}", err=True)
        sys.exit(1)
    age = row["heartbeat_age"]
    alive = row["state"] in ("active", "draining") and age is not None and age <= max_age
    seen = "never" if age is None else f"{age:.1f}s ago"
    click.echo(f"runner {name} {row['state']}, last heartbeat {seen}", err=not alive)
    sys.exit(0 if alive else 1)


def _workflow_arg(conn, workflow_id: int) -> None:
    if read.progress(conn, workflow_id) is None:
        raise BadInput(f"no workflow {workflow_id}")


@main.command("wait")
@click.argument("workflow_id", type=int)
@click.option("--timeout", type=Seconds(0), help="Give up after this many seconds (exit 124).")
@click.pass_context
def wait_cmd(ctx: click.Context, workflow_id: int, timeout: float | None) -> None:
    """Block until WORKFLOW_ID ends: exit 0 if it succeeded, 1 if it failed or was cancelled."""
    dsn = _dsn(ctx)
    deadline = None if timeout is None else time.monotonic() + timeout
    with db.connect(dsn) as conn, db.connect(dsn) as listener:
        store.check_schema(conn)
        _workflow_arg(conn, workflow_id)
        store.listen(listener, FINISHED_CHANNEL)
        printer = ProgressPrinter(conn, workflow_id)
        try:
            while True:
                p = printer.tick(force=True)
                if p is not None and p.finished:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    printer.close()
                    click.echo(f"timed out waiting for workflow {workflow_id}", err=True)
                    sys.exit(124)
                left = 1.0 if deadline is None else min(1.0, max(deadline - time.monotonic(), 0))
                for _ in listener.notifies(timeout=left, stop_after=1):
                    pass
        finally:
            printer.close()
        click.echo(summary(conn, workflow_id))
        sys.exit(0 if read.finished_status(conn, workflow_id) == "succeeded" else 1)


_OUTPUT_COLUMNS: list[Column] = [
    ("JOB", lambda r: r["job"]),
    ("PATH", lambda r: r["path"]),
    ("SIZE", lambda r: r["size"]),
    ("SHA256", lambda r: r["sha256"]),
]


@main.command("outputs")
@click.argument("workflow_id", type=int)
@click.option("--job", "keys", metavar="KEY", multiple=True, help="Only this job's (repeatable).")
@click.option(
    "--export",
    "dest",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write each file to DEST/<job key>/<path> instead of listing them.",
)
@click.option("--force", is_flag=True, help="With --export: write into DEST even if not empty.")
@click.option("--json", "as_json", is_flag=True, help="List as JSON lines.")
@click.pass_context
def outputs_cmd(
    ctx: click.Context,
    workflow_id: int,
    keys: tuple[str, ...],
    dest: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """List the stored outputs of workflow WORKFLOW_ID's jobs (job, path, size, sha256), or
    --export them. Each exported file is verified against its hash and appears whole."""
    if dest is not None:
        if dest.exists() and not dest.is_dir():
            raise BadInput(f"{dest} exists and is not a folder")
        if dest.is_dir() and any(dest.iterdir()) and not force:
            raise BadInput(f"{dest} is not empty: give an empty or new folder, or --force")
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        if read.get_workflow(conn, workflow_id) is None:
            raise BadInput(f"no workflow {workflow_id}")
        if keys and (unknown := jobfiles.unknown_keys(conn, workflow_id, keys)):
            raise BadInput(f"workflow {workflow_id} has no job {', '.join(map(repr, unknown))}")
        found = jobfiles.iter_outputs(conn, workflow_id, keys or None)
        if dest is not None:
            count = snapshot.export_outputs(conn, found, dest)
            click.echo(f"exported {count} file(s) of workflow {workflow_id} to {dest}", err=True)
            return
        rows = (
            {"job": key, "path": e.path, "size": e.size, "sha256": e.sha256} for key, e in found
        )
        if as_json:
            for row in rows:
                click.echo(json.dumps(row))
            return
        listed = list(rows)
        click.echo(table(listed, _OUTPUT_COLUMNS) if listed else "no outputs")


@main.command("cancel")
@click.argument("workflow_id", type=int)
@click.option("--job", "job_key", help="Cancel only this job (and everything downstream of it).")
@click.pass_context
def cancel_cmd(ctx: click.Context, workflow_id: int, job_key: str | None) -> None:
    """Cancel a workflow (or one job): waiting and ready jobs at once, running ones by their runner."""
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        report = control.cancel(conn, workflow_id, actor=store.actor_name("cli"), job_key=job_key)
    if report.already_finished:
        click.echo(
            f"workflow {workflow_id} already finished ({report.workflow_status}); nothing to cancel"
        )
        sys.exit(1)
    click.echo(
        f"cancelled {report.cancelled} job(s); {report.terminating} running job(s) are being "
        f"stopped by their runners; workflow {workflow_id} is {report.workflow_status}"
    )


@main.command("run")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--name", "workflow_name", help="Workflow name (default: the spec's 'name').")
@_runner_options
@click.pass_context
def run_cmd(ctx: click.Context, file: str, workflow_name: str | None, **kw) -> None:
    """Submit a DAG and run it to completion on this machine, with a progress bar.

    Exit 0 only if every job succeeded.
    """
    _setup_logging("warning")
    _check_timing(kw)
    _python_allow(kw["python_allow"])  # before submitting
    dag, sources = _read_dag(file, workflow_name)
    # The spec's author runs it: its own callables run, in its workflow only (the runner
    # claims nothing else), as exact names; other workflows' jobs never reach this runner.
    spec_callables = python_kind.callables(dag.jobs)
    dsn = _dsn(ctx)
    _log_dir(kw["log_dir"])  # before submitting: nothing would run a workflow left behind
    with db.connect(dsn) as conn:
        store.check_schema(conn)
        workflow_id = _submit(conn, dag, sources, kw["max_file_bytes"])
        click.echo(f"submitted workflow {workflow_id} {dag.name!r}: {len(dag.jobs)} jobs", err=True)
        config = _runner_config(
            f"run-{default_name()}", spec_callables, workflow_id=workflow_id, **kw
        )
        runner = Runner(dsn, config)
        printer = ProgressPrinter(conn, workflow_id, dsn=dsn)
        runner.on_tick = printer.tick
        runner.install_signal_handlers()
        try:
            runner.run()
        finally:
            with contextlib.suppress(*db.DB_ERRORS):
                printer.tick(force=True)
            printer.close()
    with db.connect_patiently(dsn, 60) as conn:  # the first may have been lost meanwhile
        click.echo(summary(conn, workflow_id))
        click.echo(f"logs: {config.log_dir / f'workflow-{workflow_id}'}")
        status = read.finished_status(conn, workflow_id)
    _exit(0 if status == "succeeded" else 1, runner)


# -- status and audit: answers from the SQL views (docs/sql.md) ---------------------------

_QUEUE_COLUMNS: list[Column] = [
    ("ready", lambda r: r["ready"]),
    ("claimable", lambda r: r["claimable"]),
    ("retrying", lambda r: r["retries_pending"]),
    ("next retry", lambda r: seconds(r["next_retry_in_seconds"])),
    ("oldest ready", lambda r: seconds(r["oldest_ready_seconds"])),
    ("running", lambda r: r["running"]),
    ("lease expired", lambda r: r["expired_leases"]),
    ("waiting", lambda r: r["waiting"]),
    ("workflows", lambda r: r["unfinished_workflows"]),
    ("runners", lambda r: r["live_runners"]),
    ("slots", lambda r: r["live_slots"]),
]
_RUNNER_COLUMNS: list[Column] = [
    ("runner", lambda r: r["runner"]),
    ("host", lambda r: r["host"]),
    ("state", lambda r: r["state"]),
    ("busy", lambda r: f"{r['busy']}/{r['slots']}"),
    ("heartbeat", lambda r: seconds(r["heartbeat_age_seconds"])),
    ("done 1h", lambda r: r["succeeded_last_hour"]),
    ("failed 1h", lambda r: r["failed_last_hour"]),
    ("done", lambda r: r["jobs_succeeded"]),
    ("failed", lambda r: r["jobs_failed"]),
]
_WORKFLOW_COLUMNS: list[Column] = [
    ("workflow", lambda r: r["workflow_id"]),
    ("name", lambda r: r["name"][:24]),
    ("status", lambda r: r["status"]),
    ("done", lambda r: f"{r['jobs_done']}/{r['jobs_total']}"),
    ("%", lambda r: r["percent_done"]),
    ("running", lambda r: r["running"]),
    ("ready", lambda r: r["ready"]),
    ("waiting", lambda r: r["waiting"]),
    ("failed", lambda r: r["failed"]),
    ("elapsed", lambda r: seconds(r["elapsed_seconds"])),
    ("eta", lambda r: seconds(r["eta_seconds"])),
]
_COUNT_COLUMNS: list[Column] = [
    (s, lambda r, s=s: r[s])
    for s in ("waiting", "ready", "running", "succeeded", "failed", "upstream_failed", "cancelled")
]
_JOB_COLUMNS: list[Column] = [
    ("job", lambda r: r["job_id"]),
    ("key", lambda r: r["key"]),
    ("status", lambda r: r["status"]),
    ("attempt", lambda r: f"{r['attempts']}/{r['max_attempts']}"),
    ("runner", lambda r: r["runner"]),
    ("duration", lambda r: seconds(r["duration_seconds"])),
    ("error", lambda r: (r["error"] or "")[:60] or None),
]
_FAILURE_COLUMNS: list[Column] = [
    ("jobs", lambda r: r["jobs"]),
    ("attempts", lambda r: r["attempts"]),
    ("error", lambda r: r["error"][:60]),
    ("e.g.", lambda r: r["example_keys"]),
]
_EVENT_COLUMNS: list[Column] = [
    ("event", lambda r: r["event_id"]),
    ("at", lambda r: timestamp(r["at"])),
    ("workflow", lambda r: r["workflow_id"]),
    ("job", lambda r: r["job_id"]),
    ("key", lambda r: r["job_key"]),
    ("attempt", lambda r: r["attempt"]),
    ("from", lambda r: r["from_status"]),
    ("to", lambda r: r["to_status"]),
    ("actor", lambda r: r["actor"]),
    ("reason", lambda r: r["reason"]),
]


@main.command("status")
@click.argument("workflow_id", type=int, required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--dead-after",
    type=Seconds(0.1),
    default=30.0,
    show_default=True,
    help="A runner silent this long shows as lost.",
)
@click.pass_context
def status_cmd(
    ctx: click.Context, workflow_id: int | None, as_json: bool, dead_after: float
) -> None:
    """Queue health, runners and recent workflows; or WORKFLOW_ID's progress and problem jobs."""
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        if workflow_id is None:
            data = view_rows.overview(conn, dead_after=dead_after)
        else:
            data = view_rows.workflow_status(conn, workflow_id)
            if data is None:
                raise BadInput(f"no workflow {workflow_id}")
    if as_json:
        _print_json(data)
    elif workflow_id is None:
        click.echo(table([data["queue"]], _QUEUE_COLUMNS))
        click.echo()
        click.echo(table(data["runners"], _RUNNER_COLUMNS) if data["runners"] else "no runners")
        click.echo()
        click.echo(
            table(data["workflows"], _WORKFLOW_COLUMNS) if data["workflows"] else "no workflows"
        )
    else:
        w = data["workflow"]
        eta = f", eta {seconds(w['eta_seconds'])}" if w["eta_seconds"] is not None else ""
        click.echo(
            f"workflow {w['workflow_id']} {w['name']!r}: {w['status']}, "
            f"{w['jobs_done']}/{w['jobs_total']} jobs done ({w['percent_done']}%), "
            f"elapsed {seconds(w['elapsed_seconds']) or '-'}{eta}"
        )
        click.echo(table([w], _COUNT_COLUMNS))
        if data["jobs"]:
            click.echo()
            click.echo(table(data["jobs"], _JOB_COLUMNS))
        if data["failures"]:
            click.echo()
            click.echo(table(data["failures"], _FAILURE_COLUMNS))


@main.command("audit")
@click.argument("workflow_id", type=int, required=False)
@click.option("--job", "job_id", type=int, help="One job's history (a job id, as in `status`).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--limit",
    type=click.IntRange(0),
    default=100,
    show_default=True,
    help="Show the last N events (0: all).",
)
@click.pass_context
def audit_cmd(
    ctx: click.Context, workflow_id: int | None, job_id: int | None, as_json: bool, limit: int
) -> None:
    """The event log, oldest first: of WORKFLOW_ID, of one --job, or the latest anywhere."""
    if workflow_id is not None and job_id is not None:
        raise BadInput("give a WORKFLOW_ID or --job, not both")
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        if workflow_id is not None and not view_rows.workflow_exists(conn, workflow_id):
            raise BadInput(f"no workflow {workflow_id}")
        rows = view_rows.history(conn, workflow_id=workflow_id, job_id=job_id, limit=limit)
    if job_id is not None and not rows:
        raise BadInput(f"no job {job_id}")
    if as_json:
        _print_json(rows)
    else:
        click.echo(table(rows, _EVENT_COLUMNS) if rows else "no events")


# -- model runs and the manager ----------------------------------------------------------


def _model_run_options(f):
    options = [
        click.argument("project_dir", type=click.Path()),
        click.argument("run_name"),
        click.option("--warm", is_flag=True, help="Skip jobs whose results exist (smif run -w)."),
        click.option("--priority", type=int, default=0, show_default=True),
        click.option(
            "--decide",
            metavar="MODULE:FUNCTION",
            help="Not smif: call MODULE:FUNCTION(history) for each next bundle's DAG spec "
            "(importable from PROJECT_DIR).",
        ),
        click.option(
            "--interface",
            type=click.Choice(["local_csv", "local_binary"]),
            default="local_csv",
            show_default=True,
            help="smif data interface.",
        ),
        click.option(
            "--in-process",
            is_flag=True,
            help="Run smif jobs as Python calls inside the runners instead of `smif step` "
            "processes (saves about a second of start-up per job); needs --shared-project.",
        ),
        click.option(
            "--shared-project",
            is_flag=True,
            help="Do not snapshot the project: runners and managers use PROJECT_DIR by its "
            "path (a shared filesystem), and results are written into its results/.",
        ),
    ]
    return _stack(f, options)


def _submit_model_run(conn, kw: dict) -> tuple[int, int]:
    if kw["decide"] and kw["warm"]:
        raise BadInput("--warm applies to smif model runs, not to --decide")
    if kw["decide"] and kw["shared_project"]:
        raise BadInput(
            "--shared-project applies to smif model runs: a --decide run always reads "
            "PROJECT_DIR by its path"
        )
    model_run_id, workflow_id = submit_model_run(
        conn,
        kw["project_dir"],
        kw["run_name"],
        actor=store.actor_name("cli"),
        decide=kw["decide"],
        warm=kw["warm"],
        priority=kw["priority"],
        interface=kw["interface"],
        in_process=kw["in_process"],
        shared_project=kw["shared_project"],
    )
    click.echo(
        f"submitted model run {model_run_id} {kw['run_name']!r}: bundle 0 is workflow "
        f"{workflow_id}",
        err=True,
    )
    return model_run_id, workflow_id


@main.group("modelrun")
def modelrun_group() -> None:
    """smif model runs (and generic decision loops) as a sequence of DAG fragments."""


@modelrun_group.command("submit")
@_model_run_options
@click.pass_context
def modelrun_submit(ctx: click.Context, **kw) -> None:
    """Record model run RUN_NAME of the smif project PROJECT_DIR and submit its first bundle.

    Runners run the jobs; a manager (`smifdb manager run`) submits the later bundles.
    Prints the model run id.
    """
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        model_run_id, _ = _submit_model_run(conn, kw)
    click.echo(model_run_id)


@modelrun_group.command("status")
@click.argument("run", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def modelrun_status(ctx: click.Context, run: str | None, as_json: bool) -> None:
    """List model runs, or show RUN (an id or a name) with its bundles and audit log."""
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        if run is None:
            rows = modelruns.listing(conn)
            if as_json:
                _print_json(rows)
            elif not rows:
                click.echo("no model runs")
            for r in [] if as_json else rows:
                click.echo(
                    f"{r['id']:>5} {r['name'][:28]:28} {r['kind']:6} {r['status']:10} "
                    f"{r['bundles']:>3} bundle(s) {r['jobs_finished']:>6}/{r['jobs']:<6} jobs"
                )
            return
        model_run = modelruns.get(conn, run)
        if as_json:
            detail = {
                **modelruns.listing(conn, model_run.id)[0],
                "options": model_run.options,
                "decide": model_run.decide,
                "bundles": modelruns.bundles(conn, model_run.id),
                "events": modelruns.events(conn, model_run.id),
            }
            _print_json(detail)
            return
        click.echo(model_run_summary(conn, model_run.id))
        for e in modelruns.events(conn, model_run.id):
            wf = f" workflow {e['workflow_id']}" if e["workflow_id"] else ""
            click.echo(f"  {e['at']:%Y-%m-%d %H:%M:%S} {e['to_status']:10}{wf} {e['reason']}")


@modelrun_group.command("cancel")
@click.argument("run")
@click.pass_context
def modelrun_cancel(ctx: click.Context, run: str) -> None:
    """Cancel model run RUN (an id or a name) and its unfinished bundle."""
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        model_run, fragments = modelruns.cancel(conn, run, actor=store.actor_name("cli"))
    if model_run.finished:
        click.echo(f"model run {model_run.id} already finished ({model_run.status})")
        sys.exit(1)
    click.echo(f"cancelled model run {model_run.id} and {fragments} unfinished bundle(s)")


@modelrun_group.command("export")
@click.argument("run")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Write into DEST even if it is not empty.")
@click.pass_context
def modelrun_export(ctx: click.Context, run: str, dest: Path, force: bool) -> None:
    """Write the results of model run RUN (an id or a name) to DEST, as serial `smif run`
    writes them under results/: DEST/<run name>/... Each file is verified against its hash
    and appears whole."""
    if dest.exists() and not dest.is_dir():
        raise BadInput(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise BadInput(f"{dest} is not empty: give an empty or new folder, or --force")
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        model_run = modelruns.get(conn, run)
        if model_run.kind != "smif":
            raise BadInput(f"model run {model_run.id} is not a smif model run: it has no results")
        if model_run.options.get("shared_project", True):
            raise BadInput(
                f"model run {model_run.id} ran with --shared-project: its results are in "
                f"{model_run.project_dir}/results, not in the database"
            )
        count = snapshot.export(conn, modelruns.result_files(conn, model_run.id), dest)
    click.echo(f"exported {count} file(s) of model run {model_run.id} to {dest}", err=True)


@modelrun_group.command("run")
@_model_run_options
@_runner_options
@click.pass_context
def modelrun_run(ctx: click.Context, **kw) -> None:
    """Submit a model run and run it to the end on this machine: a manager and N slots.

    The smifdb equivalent of `smif run`. Exit 0 only if the model run succeeded.
    """
    _setup_logging("warning")
    _check_timing(kw)
    _python_allow(kw["python_allow"])  # before submitting
    dsn = _dsn(ctx)
    if not (kw["python_in_thread"] or kw["smif_processes"] or kw["shared_project"]):
        # Its jobs run in workers: the zygote imports smif while the run is submitted.
        workers.prestart((*workers.default_preload(), *kw["preload"]))
    with db.connect(dsn) as conn:
        store.check_schema(conn)
        model_run_id, _ = _submit_model_run(conn, kw)
        manager = Manager(dsn, ManagerConfig(model_run_id=model_run_id, poll=0.5))
        # The decision module is the caller's own code, which this process runs anyway: the
        # jobs it writes may call into its package, in this model run only (all this claims).
        package = (kw["decide"] or "").partition(":")[0].split(".")[0]
        config = _runner_config(
            f"run-{default_name()}",
            (package,) if package else (),
            model_run_id=model_run_id,
            **kw,
        )
        runner = Runner(dsn, config)
        progress = ModelRunProgress(conn, model_run_id)

        def ended(_: int, status: str) -> None:
            manager.request_stop()
            runner.wake.set()

        def on_signal(signum: int, frame: object) -> None:
            manager.request_stop()
            runner.request_stop()

        manager.on_model_run_end = ended
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        worker = threading.Thread(target=runner.run, name="runner", daemon=True)
        worker.start()
        manager_thread = threading.Thread(target=manager.run, name="manager", daemon=True)
        manager_thread.start()
        try:
            while worker.is_alive():
                progress.tick()
                worker.join(0.25)
        finally:
            manager.request_stop()
            manager_thread.join(10)
            progress.close()
        click.echo(model_run_summary(conn, model_run_id))
        click.echo(f"logs: {config.log_dir}")
        status = read.model_run_finished_status(conn, model_run_id)
    _exit(0 if status == "succeeded" else 1, runner)


@main.group("manager")
def manager_group() -> None:
    """The manager: submits each model run's next bundle when the previous one is done."""


@manager_group.command("run")
@click.option("--poll", type=Seconds(0.05), default=2.0, show_default=True)
@click.option(
    "--dead-after",
    type=Seconds(0.1),
    default=30.0,
    show_default=True,
    help="A runner silent this long is dead and its jobs are rescued.",
)
@_wait_for_database
@_log_options
@click.pass_context
def manager_run(
    ctx: click.Context,
    poll: float,
    dead_after: float,
    wait_for_database: float,
    log_level: str,
    log_format: str,
) -> None:
    """Run until stopped. Stateless: run several, kill and restart any at any moment."""
    _setup_logging(log_level, log_format)
    dsn = _dsn(ctx)
    _check_database(dsn, wait_for_database)
    manager = Manager(dsn, ManagerConfig(poll=poll, dead_after=dead_after))
    manager.install_signal_handlers()
    sys.exit(manager.run())


# -- retention ----------------------------------------------------------------------------


class _Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx):
        try:
            return retention.parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@main.command("prune")
@click.option(
    "--older-than",
    type=_Duration(),
    required=True,
    help="Delete what finished longer ago than this: 30d, 12h, 90m, 45s, 2w (or 1d12h).",
)
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; change nothing.")
@click.option(
    "--archive-events",
    type=click.Path(dir_okay=False),
    help="Append the deleted events to FILE as JSON Lines, fsynced before each batch commits.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="Most workflows per transaction.",
)
@click.option(
    "--blob-grace",
    type=_Duration(),
    default="1h",
    show_default=True,
    help="Keep an unreferenced blob used more recently than this (an upload whose record "
    "has yet to commit).",
)
@click.pass_context
def prune_cmd(
    ctx: click.Context,
    older_than,
    dry_run: bool,
    archive_events: str | None,
    batch_size: int,
    blob_grace,
) -> None:
    """Delete finished workflows and model runs, with their jobs, edges, events and files,
    then the blobs nothing names any more.

    Never touches an unfinished workflow, nor any bundle of a model run that is still running
    or ended after the cutoff. Short transactions that never wait for a lock: safe while
    runners and managers work.
    """
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        if dry_run or not archive_events:
            report = retention.prune(
                conn, older_than, dry_run=dry_run, batch_size=batch_size, blob_grace=blob_grace
            )
        else:
            archive = retention.EventArchive(Path(archive_events))
            try:
                archive.open()
            except (OSError, retention.ArchiveInUse) as exc:
                raise BadInput(f"cannot write the archive: {exc}") from exc
            with archive:
                if archive.torn_bytes:
                    click.echo(
                        f"{archive_events}: cut off a torn last line ({archive.torn_bytes} "
                        "bytes) left by an interrupted prune; those events were not deleted",
                        err=True,
                    )
                report = retention.prune(
                    conn,
                    older_than,
                    archive=archive,
                    batch_size=batch_size,
                    blob_grace=blob_grace,
                )
    click.echo(report.summary())
    if report.archived:
        click.echo(f"archived {report.archived:,} events to {archive_events}")


# -- the HTTP API -------------------------------------------------------------------------


@main.group("api")
def api_group() -> None:
    """The HTTP API: the smif app's model-run API, workflows, jobs and runners."""


def _loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@api_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option(
    "--project",
    type=click.Path(file_okay=False, exists=True),
    help="The smif project whose model runs /api/v1/model_runs/ starts.",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    envvar="SMIFDB_API_ALLOWED_HOSTS",
    help="A Host header to answer (repeatable; '.example.org' allows its subdomains; also "
    "SMIFDB_API_ALLOWED_HOSTS, space-separated). Loopback names and the bind address are "
    "always allowed; needed to bind elsewhere.",
)
@click.option(
    "--public-url",
    help="Where clients reach this API (https://smifdb.example.org): the base of the URLs it "
    "hands out. Default: the address it listens on.",
)
@click.option(
    "--metrics-token",
    envvar="SMIFDB_METRICS_TOKEN",
    help="Require 'Authorization: Bearer TOKEN' on /metrics (also SMIFDB_METRICS_TOKEN, which "
    "keeps it out of ps). Default: /metrics is public.",
)
@click.option("--ssl-certfile", type=click.Path(dir_okay=False, exists=True), help="Serve TLS.")
@click.option("--ssl-keyfile", type=click.Path(dir_okay=False, exists=True))
@click.option(
    "--behind-proxy",
    is_flag=True,
    help="A TLS-terminating proxy on this host forwards to it: trust its X-Forwarded-For and "
    "-Proto (from FORWARDED_ALLOW_IPS, default 127.0.0.1).",
)
@_log_options
@click.pass_context
def api_serve(
    ctx: click.Context,
    host: str,
    port: int,
    workers: int,
    project: str | None,
    allowed_hosts: tuple[str, ...],
    public_url: str | None,
    metrics_token: str | None,
    ssl_certfile: str | None,
    ssl_keyfile: str | None,
    behind_proxy: bool,
    log_level: str,
    log_format: str,
) -> None:
    """Serve the API with uvicorn (stateless: run as many as you like behind a balancer).

    Every route but the login page, /openapi.json and /metrics needs credentials: create a
    user first (smifdb api user add). See docs/security.md.
    """
    import uvicorn

    from smifdb.api import server

    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise BadInput("--ssl-certfile and --ssl-keyfile go together")
    if public_url is not None and not public_url.startswith(("http://", "https://")):
        raise BadInput(f"--public-url {public_url!r} must start with http:// or https://")
    if not _loopback(host) and not allowed_hosts:
        raise BadInput(
            f"--host {host} serves beyond this machine: name the host names clients use with "
            "--allowed-host (a DNS-rebinding page could otherwise reach the API)"
        )
    _setup_logging(log_level, log_format)
    if not _loopback(host) and not ssl_certfile and not behind_proxy:
        logging.getLogger("smifdb.api").warning(
            "serving on %s without TLS: passwords and tokens cross the network in clear; "
            "use --ssl-certfile/--ssl-keyfile or a TLS proxy (--behind-proxy)",
            host,
        )
    dsn = _dsn(ctx)
    with db.connect(dsn) as conn:
        store.check_schema(conn)
    os.environ[server.DSN_VAR] = dsn
    os.environ[server.PROJECT_VAR] = str(Path(project).resolve()) if project else ""
    os.environ[server.SECURITY_VAR] = json.dumps(
        {
            "allowed_hosts": list(allowed_hosts),
            "bind_host": host,
            "public_url": public_url,
            "metrics_token": metrics_token,
        }
    )
    uvicorn.run(
        "smifdb.api.server:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        log_config=logs.uvicorn_config(log_level, log_format),  # also in every worker process
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        proxy_headers=behind_proxy,  # else a local client could spoof its address
        server_header=False,
    )


@api_group.group("user")
def api_user() -> None:
    """API users and their roles: viewer, operator, admin, runner (docs/security.md)."""


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        raise BadInput("a password must be at least 8 characters")
    return password


_ROLE = click.Choice(auth.ROLES)
_USER_COLUMNS: list[Column] = [
    ("user", lambda r: r["name"]),
    ("role", lambda r: r["role"]),
    ("api tokens", lambda r: r["api_tokens"]),
    ("last sign-in", lambda r: timestamp(r["last_login_at"])),
    ("created", lambda r: timestamp(r["created_at"])),
]
_TOKEN_COLUMNS: list[Column] = [
    ("id", lambda r: r["id"]),
    ("user", lambda r: r["user"]),
    ("role", lambda r: r["role"]),
    ("name", lambda r: r["name"]),
    ("created", lambda r: timestamp(r["issued_at"])),
    ("expires", lambda r: timestamp(r["expires_at"])),
]


def _print_rows(rows: list[dict], columns: list[Column], as_json: bool) -> None:
    if as_json:
        _print_json(rows)
    else:
        click.echo(table(rows, columns))


@api_user.command("add")
@click.argument("name")
@click.option("--role", type=_ROLE, default="operator", show_default=True)
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from standard input (for scripts) instead of prompting.",
)
@click.option(
    "--no-password", is_flag=True, help="No password: the user signs in with api tokens only."
)
@click.option("--update", is_flag=True, help="Change the password of an existing user.")
@click.pass_context
def api_user_add(
    ctx: click.Context, name: str, role: str, password_stdin: bool, no_password: bool, update: bool
) -> None:
    """Add a user (the password is stored as an scrypt hash)."""
    auth.check_name(name)
    if no_password and (password_stdin or update):
        raise BadInput("--no-password goes with neither --password-stdin nor --update")
    password = None if no_password else _read_password(password_stdin)
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        if update:
            auth.set_password(conn, name, password)
        else:
            auth.add_user(conn, name, password, role=role)
    click.echo(f"updated user {name}" if update else f"added user {name} ({role})")


@api_user.command("set-role")
@click.argument("name")
@click.argument("role", type=_ROLE)
@click.pass_context
def api_user_set_role(ctx: click.Context, name: str, role: str) -> None:
    """Change a user's role; their tokens and sessions are revoked."""
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        auth.set_role(conn, name, role)
    click.echo(f"user {name} is now {role}; their tokens were revoked")


@api_user.command("remove")
@click.argument("name")
@click.pass_context
def api_user_remove(ctx: click.Context, name: str) -> None:
    """Remove a user and revoke their tokens (what they submitted stays, owned by no one)."""
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        auth.remove_user(conn, name)
    click.echo(f"removed user {name}")


@api_user.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def api_user_list(ctx: click.Context, as_json: bool) -> None:
    """List users, their roles and when each last signed in."""
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        rows = auth.users(conn)
    _print_rows(rows, _USER_COLUMNS, as_json)


@api_group.group("token")
def api_token() -> None:
    """Long-lived API tokens for scripts and runners (Authorization: Bearer)."""


@api_token.command("create")
@click.option("--user", "user", required=True, help="Whose token: it acts with their role.")
@click.option("--expires", type=_Duration(), help="Lifetime: 90d, 12h, 2w… Default: never.")
@click.option("--name", "label", help="A label to tell tokens apart in `token list`.")
@click.pass_context
def api_token_create(ctx: click.Context, user: str, expires, label: str | None) -> None:
    """Print a new token once (only its hash is stored)."""
    seconds = expires.total_seconds() if expires is not None else None
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        token_id, token = auth.create_api_token(conn, user, name=label, seconds=seconds)
    click.echo(
        f"token {token_id} for {user} (shown once; revoke with `smifdb api token revoke "
        f"{token_id}`):",
        err=True,
    )
    click.echo(token)


@api_token.command("list")
@click.option("--user", "user", help="Only this user's tokens.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def api_token_list(ctx: click.Context, user: str | None, as_json: bool) -> None:
    """List api tokens (never the tokens themselves)."""
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        rows = auth.api_tokens(conn, user)
    _print_rows(rows, _TOKEN_COLUMNS, as_json)


@api_token.command("revoke")
@click.argument("token_id", type=click.IntRange(1, 2**63 - 1))
@click.pass_context
def api_token_revoke(ctx: click.Context, token_id: int) -> None:
    """Revoke an api token at once: the next request with it is refused."""
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        auth.revoke_api_token(conn, token_id)
    click.echo(f"revoked token {token_id}")


if __name__ == "__main__":
    main()
