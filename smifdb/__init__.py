"""smifdb: a PostgreSQL-backed workflow manager for smif model runs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg

from smifdb.spec import Checking, Dag, SpecError

__version__ = "0.1.0"
__all__ = ["Dag", "SpecError", "__version__", "submit"]


def submit(
    conn_or_dsn: psycopg.Connection | str,
    spec: Mapping[str, Any] | Dag,
    *,
    name: str | None = None,
    base: str | Path | None = None,
) -> int:
    """Validate ``spec`` and submit it as one new workflow; return the workflow id.

    Nothing is written unless the whole spec is valid (SpecError lists every problem). Its
    ``files:`` are taken from ``base`` (default: the current folder) and uploaded first.
    """
    from smifdb import db, store
    from smifdb.spec import source_files
    from smifdb.store import blobs
    from smifdb.store.submit import put_files, submit_checking, submit_dag

    checking = None if isinstance(spec, Dag) else Checking(spec, name=name)
    streamed = checking is not None and not checking.files  # checked as it is written
    if not streamed:  # its files are checked and stored before it is written
        dag = checking.dag() if checking is not None else spec
        sources = source_files(dag, Path(base or Path.cwd())) if dag.files else []

    def write(conn: psycopg.Connection) -> int:
        store.check_schema(conn)
        actor = store.actor_name("api")
        if streamed:
            return submit_checking(conn, checking, actor=actor)[0]
        entries = put_files(conn, sources, max_bytes=blobs.max_file_bytes()) if sources else []
        return submit_dag(conn, dag, actor=actor, files=entries)

    if isinstance(conn_or_dsn, str):
        with db.connect(conn_or_dsn) as conn:
            return write(conn)
    return write(conn_or_dsn)
