"""Which stored files a job reads, and which a workflow's jobs wrote.

The blobs themselves are smifdb.store.blobs'; these are the references that say where each
file goes: a workflow's own files, and its jobs' recorded outputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import psycopg

from smifdb.store.blobs import FileEntry, workflow_files

_OUTPUTS_BY_KEY = """
SELECT j.key, o.path, encode(o.sha256, 'hex'), o.size, o.mode
FROM jobs j JOIN job_outputs o ON o.job_id = j.id
WHERE j.workflow_id = %(workflow)s AND (%(keys)s::text[] IS NULL OR j.key = ANY(%(keys)s))
  AND (%(after)s::text IS NULL OR (j.key, o.path) > (%(after)s, %(after_path)s))
ORDER BY j.key, o.path
LIMIT %(limit)s
"""


def outputs_by_key(
    conn: psycopg.Connection,
    workflow_id: int,
    keys: Sequence[str] | None = None,
    *,
    after: tuple[str, str] | None = None,
    limit: int = 1_000_000,
) -> list[tuple[str, FileEntry]]:
    """(job key, file) of the recorded outputs of a workflow's jobs (those named, if given), in
    key and path order, after ``after`` (key, path): a page of them."""
    params = {
        "workflow": workflow_id,
        "keys": list(keys) if keys is not None else None,
        "after": after[0] if after else None,
        "after_path": after[1] if after else None,
        "limit": limit,
    }
    return [
        (key, FileEntry(path, sha, size, mode))
        for key, path, sha, size, mode in conn.execute(_OUTPUTS_BY_KEY, params)
    ]


_OUTPUT = """
SELECT o.path, encode(o.sha256, 'hex'), o.size, o.mode
FROM jobs j JOIN job_outputs o ON o.job_id = j.id
WHERE j.workflow_id = %s AND j.key = %s AND o.path = %s
"""


def output(conn: psycopg.Connection, workflow_id: int, key: str, path: str) -> FileEntry | None:
    """The recorded output ``path`` of job ``key``, if there is one."""
    row = conn.execute(_OUTPUT, [workflow_id, key, path]).fetchone()
    return FileEntry(*row) if row else None


_KNOWN_KEYS = "SELECT key FROM jobs WHERE workflow_id = %s AND key = ANY(%s)"


def unknown_keys(conn: psycopg.Connection, workflow_id: int, keys: Sequence[str]) -> list[str]:
    """Which of these job keys the workflow has no job of, in the order given."""
    known = {r[0] for r in conn.execute(_KNOWN_KEYS, [workflow_id, list(keys)])}
    return [k for k in dict.fromkeys(keys) if k not in known]


def iter_outputs(
    conn: psycopg.Connection, workflow_id: int, keys: Sequence[str] | None = None, page: int = 1000
) -> Iterator[tuple[str, FileEntry]]:
    """Every recorded output of a workflow's jobs (those named, if given), a keyset page
    per statement: no long transaction, memory of one page, however many there are."""
    after = None
    while True:
        found = outputs_by_key(conn, workflow_id, keys, after=after, limit=page)
        yield from found
        if len(found) < page:
            return
        after = (found[-1][0], found[-1][1].path)


def job_inputs(
    conn: psycopg.Connection, workflow_id: int, *, files: bool, inputs: Sequence[str]
) -> list[tuple[str, FileEntry]]:
    """What a job's folder holds before it runs, as (folder under the job's, file): the
    workflow's files at its top, and each named parent's outputs under the parent's key."""
    found: list[tuple[str, FileEntry]] = []
    if files:
        found += [("", entry) for entry in workflow_files(conn, workflow_id)]
    if inputs:
        found += outputs_by_key(conn, workflow_id, inputs)
    return found


def model_run_inputs(
    conn: psycopg.Connection, model_run_id: int
) -> tuple[list[FileEntry], list[FileEntry]]:
    """What a smif job's folder holds: its model run's project snapshot (not the results the
    snapshot was taken with), and the results stored since."""
    from smifdb import snapshot  # (it imports the spec, which imports the kinds)
    from smifdb.store import modelruns
    from smifdb.store.blobs import model_run_files

    project, _ = snapshot.split(model_run_files(conn, model_run_id))
    return project, modelruns.result_files(conn, model_run_id)
