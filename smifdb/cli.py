"""The ``smifdb`` command line."""

from __future__ import annotations

import json
import sys

import click
import psycopg

from smifdb import __version__, db, migrate, store
from smifdb.pgserver import Cluster, ServerError
from smifdb.spec import SpecError, load_file, load_text, parse
from smifdb.store.submit import submit_dag


class BadInput(click.ClickException):
    """Input the user can fix: exit status 2, like a usage error."""

    exit_code = 2


class SmifdbGroup(click.Group):
    """Turns smifdb's own errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SpecError as exc:
            raise BadInput(str(exc)) from exc
        except (ServerError, store.SchemaError) as exc:
            raise click.ClickException(str(exc)) from exc
        except psycopg.OperationalError as exc:
            raise click.ClickException(f"cannot reach the database: {exc}".strip()) from exc


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


def _dsn(ctx: click.Context, *, migrate_embedded: bool = True) -> str:
    return db.resolve_dsn(ctx.obj["dsn"], migrate_embedded=migrate_embedded)


# -- db ---------------------------------------------------------------------------------


@main.group("db")
def db_group() -> None:
    """Schema migrations and the embedded database."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Migrate the schema up to REVISION (default: head)."""
    dsn = _dsn(ctx, migrate_embedded=False)
    migrate.upgrade(dsn, revision)
    click.echo(f"schema at {migrate.current(dsn)}")


@db_group.command("downgrade")
@click.argument("revision", default="-1")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Migrate the schema down to REVISION (default: one step; 'base' removes everything)."""
    dsn = _dsn(ctx, migrate_embedded=False)
    migrate.downgrade(dsn, revision)
    click.echo(f"schema at {migrate.current(dsn) or 'base'}")


@db_group.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the schema revision of the database (and whether it is the newest)."""
    current = migrate.current(_dsn(ctx, migrate_embedded=False))
    head = migrate.head()
    note = "(head)" if current == head else f"(head is {head}: run `smifdb db upgrade`)"
    click.echo(f"{current or 'base'} {note}")


@db_group.command("start")
def db_start() -> None:
    """Start the embedded database (initialising and migrating it on first use)."""
    dsn = Cluster.embedded().start()
    migrate.ensure_current(dsn)
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
        click.echo(json.dumps(status, indent=2))
        return
    for key, value in status.items():
        click.echo(f"{key:12} {value}")


@db_group.command("url")
@click.pass_context
def db_url(ctx: click.Context) -> None:
    """Print the DSN in use, starting the embedded database if needed: psql "$(smifdb db url)"."""
    click.echo(_dsn(ctx))


# -- workflows --------------------------------------------------------------------------


@main.command("submit")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--name", help="Workflow name (default: the spec's 'name').")
@click.pass_context
def submit_cmd(ctx: click.Context, file: str, name: str | None) -> None:
    """Validate a YAML or JSON DAG FILE and submit it; print the new workflow id."""
    raw = load_text(sys.stdin.read(), "standard input") if file == "-" else load_file(file)
    dag = parse(raw, name=name)
    with db.connect(_dsn(ctx)) as conn:
        store.check_schema(conn)
        workflow_id = submit_dag(conn, dag, actor=store.actor_name("cli"))
    ready = sum(1 for j in dag.jobs if not j.after)
    click.echo(
        f"submitted workflow {workflow_id} {dag.name!r}: {len(dag.jobs)} jobs, "
        f"{len(dag.edges)} edges, {ready} ready",
        err=True,
    )
    click.echo(workflow_id)


if __name__ == "__main__":
    main()
